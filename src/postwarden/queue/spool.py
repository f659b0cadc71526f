"""The durable spool: message bodies in append-only segment files, state in SQLite.

Layout under ``spool.path``::

    segments/000000000001.seg   append-only records: one per accepted message
    index.db                    SQLite (WAL): messages, recipients, events, segments

Durability protocol (group commit, one writer thread):

1. every message waiting to be stored is appended to the current segment, then the
   segment is ``fdatasync``'d once for the whole batch;
2. the index rows (message, recipients, ``accepted`` events) for the batch go in one
   SQLite transaction committed with ``synchronous=FULL`` (the WAL is fsync'd);
3. only then are the callers' futures resolved, so the SMTP ``250`` (or the HTTP
   ``2xx``) is written after both fsyncs that cover the message.

State changes after acceptance (leases, delivery results, events) are committed
with ``synchronous=NORMAL``: they survive a process crash (the WAL is in the page
cache) and, after a power loss, at worst a delivered recipient is delivered again —
at-least-once, never lost.

A crash leaves recipients that were leased for delivery in state ``active``;
:meth:`Spool.open` puts them back to ``queued`` and counts them: those are the only
recipients that can be delivered twice.

Bodies are never kept in memory while a message waits: they are read back from the
segment (``pread``) when a delivery attempt needs them. A segment file is removed
when no live message refers to it any more.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import json
import logging
import os
import queue
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from postwarden.queue.records import OPERATOR_ACTIONS, insert_event, operator_action, settle_message
from postwarden.queue.schema import SCHEMA, SCHEMA_VERSION, upgrade
from postwarden.queue.segments import Segments, is_no_space, spool_error
from postwarden.queue.shards import IDEMPOTENCY_KEEP
from postwarden.values import (
    ACTIVE,
    DEFERRED,
    DROPPED,
    FINAL_STATES,
    LANES,
    QUEUED,
    Envelope,
    Lease,
    Outcome,
    SpoolError,
    StoredMessage,
    domain_of,
)

log = logging.getLogger("postwarden.spool")


def new_message_id() -> str:
    """A sortable, unique queue id: 12 hex digits of milliseconds + 10 random hex digits.

    The random part comes from the OS (under a microsecond): ids travel in the
    Message-ID of every message, and a bounce without a return-path token is matched
    by its id, so the ids of other messages must not be predictable from those seen."""
    return f"{int(time.time() * 1000):012x}{secrets.randbits(40):010x}"


@dataclass
class _Op:
    kind: str
    args: tuple[Any, ...]
    future: asyncio.Future[Any] | None
    loop: asyncio.AbstractEventLoop | None


class Spool:
    """The durable spool. Create, then ``await open()``; all writes go through one thread."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        segment_size: int = 64 * 1024 * 1024,
        fsync: bool = True,
        max_batch: int = 1024,
        event_retention: float = 0.0,
        upkeep_interval: float = 10.0,
        prune_batch: int = 2000,
        on_events: Callable[[list[dict[str, Any]]], None] | None = None,
    ) -> None:
        self.path = Path(path)
        self.segment_dir = self.path / "segments"
        self.segment_size = segment_size
        self.fsync = fsync
        self.max_batch = max_batch
        self._ops: queue.SimpleQueue[_Op | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._db: sqlite3.Connection | None = None
        self.segments = Segments(self.segment_dir, size=segment_size, fsync=fsync)
        self.recovered_inflight = 0
        # The tenant bulk leasing moved past last (writer thread only).
        self._bulk_after: str | None = None
        self.closed = True
        # Observers of committed events (metrics, logs); called on the event loop.
        # Called on the event loop with each batch of committed events (the copier).
        self.on_events = on_events
        self.stats = {
            "batches": 0, "stored": 0, "fsyncs": 0,
            "upkeeps": 0, "events_pruned": 0, "segments_reclaimed": 0,
        }  # fmt: skip
        # Upkeep (writer thread, between batches): empty segments go; events older than
        # ``event_retention`` (0: kept for ever) that the event copier has copied go,
        # ``prune_batch`` at a time so that a backlog never holds the writer for long.
        self.event_retention = event_retention
        self.upkeep_interval = upkeep_interval
        self.prune_batch = prune_batch
        # The highest event id the control plane has durably copied (see mark_copied);
        # None until the copier says: nothing is pruned before that.
        self.copied_through: int | None = None

    # ------------------------------------------------------------------ lifecycle

    async def open(self) -> None:
        """Open (or create) the spool, recover from a crash, start the writer thread."""
        await asyncio.to_thread(self._open_sync)
        self.closed = False
        self._thread = threading.Thread(target=self._writer, name="spool-writer", daemon=True)
        self._thread.start()

    def _open_sync(self) -> None:
        self.segment_dir.mkdir(parents=True, exist_ok=True)
        self._db = self._connect()
        db = self._db
        upgrade(db)  # first: the schema's indexes name columns older schemas lack
        db.executescript(SCHEMA)
        db.execute(
            "INSERT OR IGNORE INTO meta(key, value) VALUES ('schema_version', ?)",
            (str(SCHEMA_VERSION),),
        )
        # Who this spool is, wherever it is mounted: the control plane's event cursor
        # is kept per spool id, not per path.
        db.execute(
            "INSERT OR IGNORE INTO meta(key, value) VALUES ('spool_id', ?)",
            (secrets.token_hex(16),),
        )
        now = time.time()
        # Leases do not survive a restart: whatever was active may or may not have
        # reached its destination, so it is tried again (and counted).
        cur = db.execute(
            "UPDATE recipients SET state = ?, updated_at = ?, wait_reason = NULL WHERE state = ?",
            (QUEUED, now, ACTIVE),
        )
        self.recovered_inflight = cur.rowcount
        if self.recovered_inflight:
            db.execute(
                "INSERT INTO meta(key, value) VALUES ('recovered_inflight_total', ?) "
                "ON CONFLICT(key) DO UPDATE SET value = CAST(value AS INTEGER) + ?",
                (str(self.recovered_inflight), self.recovered_inflight),
            )
            log.warning("event=spool_recovered inflight=%d", self.recovered_inflight)
        self.segments.open(db)

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(
            self.path / "index.db", isolation_level=None, check_same_thread=False, timeout=30
        )
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("PRAGMA busy_timeout=30000")
        return db

    async def close(self) -> None:
        """Flush pending operations, checkpoint the WAL and stop the writer."""
        if self.closed:
            return
        self.closed = True
        self._ops.put(None)
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
        self.segments.drop_read_fds()

    def _close_sync(self) -> None:
        self.segments.close()
        if self._db is not None:
            try:
                # A reader just finishing (a copier's, another process's) makes the
                # checkpoint report busy: try again for up to a second.
                for _ in range(20):
                    busy = self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
                    if not busy or not busy[0]:
                        break
                    time.sleep(0.05)
            except sqlite3.Error as exc:
                # A full disk, say: the WAL stays, and the next open replays it.
                log.warning("event=spool_checkpoint_failed error=%r", str(exc))
            finally:
                self._db.close()
                self._db = None

    # ------------------------------------------------------------------ public API

    async def store(
        self, envelope: Envelope, data: bytes, *, lease: bool = False, msg_id: str | None = None
    ) -> StoredMessage:
        """Store a message durably; returns once it and its envelope are fsync'd.

        With ``lease=True`` the recipients go straight to ``active`` and come back as
        leases, so the scheduler can start delivery without another round trip.
        """
        if envelope.lane not in LANES:
            raise ValueError(f"unknown lane {envelope.lane!r} (expected one of {LANES})")
        return await self._submit("store", envelope, data, lease, msg_id or new_message_id())

    async def lease_due(
        self, now: float, limit: int, *, bulk_limit: int | None = None
    ) -> list[Lease]:
        """Mark up to ``limit`` due, unheld recipients ``active`` and return them.

        The high lane comes first, in next_attempt order. The bulk lane gets the room
        left (at most ``bulk_limit`` recipients when given), shared across the tenants
        that have due bulk mail: each gets an equal share (rounded up), and the share
        of a tenant that has less is handed on to those that have more, so a tenant
        with a huge campaign cannot starve one with a small one. Within a tenant,
        next_attempt order. When there are more such tenants than room, successive
        calls take them in turn.
        """
        if limit <= 0:
            return []
        return await self._submit("lease", now, limit, bulk_limit)

    async def record(self, outcomes: Sequence[Outcome]) -> None:
        """Apply outcomes (state + event), removing messages whose last recipient is done."""
        if outcomes:
            await self._submit("record", list(outcomes))

    async def act(self, action: str, msg_id: str | None = None) -> int:
        """An operator action (:data:`OPERATOR_ACTIONS`) on one message or all (None);
        the number of recipients changed."""
        if action not in OPERATOR_ACTIONS:
            raise ValueError(f"unknown action {action!r}")
        return int(await self._submit("act", action, msg_id))

    def mark_copied(self, last_id: int) -> None:
        """The event copier has committed every event up to ``last_id`` elsewhere: those
        may be pruned once older than ``event_retention``. Any thread."""
        if self.copied_through is None or last_id > self.copied_through:
            self.copied_through = last_id

    async def run(self, fn: Callable[[sqlite3.Connection], Any]) -> Any:
        """Run ``fn(db)`` in the writer thread inside a transaction; returns its result."""
        return await self._submit("call", fn)

    def read_body(self, lease: Lease) -> bytes:
        """Read a message's bytes back from its segment (blocking ``pread``)."""
        return self.read_location(lease.segment, lease.body_offset, lease.body_length)

    def read_location(self, segment: int, offset: int, length: int) -> bytes:
        return self.segments.read(segment, offset, length)

    def segment_fd(self, segment: int) -> contextlib.AbstractContextManager[int]:
        """A read-only fd of a segment (:meth:`Segments.fd`)."""
        return self.segments.fd(segment)

    def _unlink_segment(self, seg: int) -> None:
        self.segments.unlink(seg)

    # ------------------------------------------------------------------ plumbing

    def _submit(self, kind: str, *args: Any) -> asyncio.Future[Any]:
        if self.closed:
            raise SpoolError("spool is closed")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        self._ops.put(_Op(kind, args, fut, loop))
        return fut

    def _writer(self) -> None:
        stop = False
        next_upkeep = time.monotonic() + self.upkeep_interval
        while not stop:
            wait = next_upkeep - time.monotonic()
            if wait <= 0:
                next_upkeep = time.monotonic() + self._upkeep()
                continue
            try:
                op = self._ops.get(timeout=wait)
            except queue.Empty:
                continue
            if op is None:
                break
            batch = [op]
            while len(batch) < self.max_batch:
                try:
                    nxt = self._ops.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                batch.append(nxt)
            self._run_batch(batch)
        self._close_sync()

    def _run_batch(self, batch: list[_Op]) -> None:
        assert self._db is not None
        results: list[tuple[_Op, Any, BaseException | None]] = []
        committed_events: list[dict[str, Any]] = []
        stores = [op for op in batch if op.kind == "store"]
        placed: dict[Hashable, tuple[int, int, int]] = {}
        try:
            if stores:
                records = [(id(op), op.args[0], op.args[1], op.args[3]) for op in stores]
                placed = self.segments.append(records)
        except Exception as exc:  # an I/O error fails the stores, not the others
            if is_no_space(exc):  # expected while the disk is full: no traceback each time
                log.warning("event=spool_full stage=segment messages=%d error=%r",
                            len(stores), str(exc))  # fmt: skip
            else:
                log.exception("event=spool_write_failed messages=%d", len(stores))
            for op in stores:
                results.append((op, None, spool_error("spool write failed", exc)))
            batch = [op for op in batch if op.kind != "store"]
            stores = []
        db = self._db
        try:
            db.execute(
                "PRAGMA synchronous=FULL" if stores and self.fsync else "PRAGMA synchronous=NORMAL"
            )
            db.execute("BEGIN IMMEDIATE")
            unlink: list[int] = []
            for op in batch:
                db.execute("SAVEPOINT op")
                res: Any
                try:
                    if op.kind == "store":
                        res = self._do_store(op, placed[id(op)], committed_events, unlink)
                    elif op.kind == "lease":
                        res = self._do_lease(*op.args)
                    elif op.kind == "record":
                        self._do_record(op.args[0], committed_events, unlink)
                        res = None
                    elif op.kind == "call":
                        res = op.args[0](db)
                    elif op.kind == "act":
                        res = self._do_act(op.args[0], op.args[1], committed_events, unlink)
                    else:  # pragma: no cover
                        raise SpoolError(f"unknown op {op.kind}")
                    db.execute("RELEASE op")
                    results.append((op, res, None))
                except Exception as exc:
                    db.execute("ROLLBACK TO op")
                    db.execute("RELEASE op")
                    log.exception("event=spool_op_failed kind=%s", op.kind)
                    results.append((op, None, spool_error("spool index", exc)
                                    if is_no_space(exc) else exc))  # fmt: skip
            db.execute("COMMIT")
            if stores:
                self.stats["fsyncs"] += 1
            for seg in unlink:
                self._unlink_segment(seg)
        except Exception as exc:
            if is_no_space(exc):
                log.warning("event=spool_full stage=index error=%r", str(exc))
            else:
                log.exception("event=spool_commit_failed")
            try:
                db.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            # The stores' records stay in the segment, never indexed (and the segment's end is
            # past them): nothing refers to them, and restart drops them with the file.
            failed = spool_error("spool commit failed", exc)
            results = [(op, None, failed if err is None else err) for op, _, err in results]
            committed_events = []
        self.stats["batches"] += 1
        self.stats["stored"] += len(stores)
        self._resolve(results, committed_events)

    def _resolve(
        self, results: list[tuple[_Op, Any, BaseException | None]], events: list[dict[str, Any]]
    ) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Op, Any, BaseException | None]]] = {}
        for item in results:
            if item[0].loop is not None:
                by_loop.setdefault(item[0].loop, []).append(item)
        on_events = self.on_events

        def deliver(items: list[tuple[_Op, Any, BaseException | None]], evs: list[Any]) -> None:
            for op, res, exc in items:
                fut = op.future
                if fut is None or fut.done():
                    continue
                if exc is not None:
                    fut.set_exception(exc)
                else:
                    fut.set_result(res)
            if evs and on_events is not None:
                try:
                    on_events(evs)
                except Exception:
                    log.exception("event=event_listener_failed")

        first = True
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(deliver, items, events if first else [])
            except RuntimeError:  # loop closed: nobody waits any more
                pass
            first = False

    # ------------------------------------------------------------------ operations

    def _do_store(
        self, op: _Op, where: tuple[int, int, int], events: list[dict[str, Any]],
        unlink: list[int],
    ) -> StoredMessage:  # fmt: skip
        assert self._db is not None
        db = self._db
        envelope, _data, lease, msg_id = op.args
        seg, offset, length = where
        now = time.time()
        rcpts = list(envelope.rcpt_tos)
        drops = envelope.drops
        live = sum(1 for r in rcpts if r not in drops)
        db.execute(
            "INSERT INTO messages(id, segment, body_offset, body_length, mail_from, client_ip,"
            " helo, auth, tenant, smtputf8, body_8bit, received_at, remaining, pool, lane)"
            " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (
                msg_id, seg, offset, length, envelope.mail_from, envelope.client_ip,
                envelope.helo, envelope.auth, envelope.tenant, int(envelope.smtputf8),
                int(envelope.body_8bit), envelope.received_at, live, envelope.pool,
                envelope.lane,
            ),
        )  # fmt: skip
        db.execute("UPDATE segments SET live = live + 1 WHERE id = ?", (seg,))
        state = ACTIVE if lease else QUEUED
        lane, tenant = envelope.lane, envelope.tenant or ""
        ids: list[int] = []
        leases: list[Lease] = []
        for i, rcpt in enumerate(rcpts):
            domain = domain_of(rcpt)
            dropped = drops.get(rcpt)
            cur = db.execute(
                "INSERT INTO recipients(msg_id, rcpt, domain, state, next_attempt, created_at,"
                " updated_at, last_response, lane, tenant) VALUES (?,?,?,?,?,?,?,?,?,?)",
                (msg_id, rcpt, domain, DROPPED if dropped else state, now,
                 envelope.received_at, now, dropped, lane, tenant),
            )  # fmt: skip
            rid = int(cur.lastrowid or 0)
            ids.append(rid)
            if lease and not dropped:
                leases.append(
                    Lease(
                        rid, msg_id, rcpt, domain, 0, envelope.received_at, envelope.mail_from,
                        seg, offset, length, envelope.smtputf8, envelope.body_8bit,
                        envelope.tenant, envelope.pool, lane,
                    )
                )  # fmt: skip
            detail: dict[str, Any] = {"size": length, "client_ip": envelope.client_ip}
            if envelope.auth:
                detail["auth"] = envelope.auth
            if envelope.tenant:
                detail["tenant"] = envelope.tenant
            if i == 0:
                detail["mail_from"] = envelope.mail_from
                if envelope.meta:
                    detail["meta"] = dict(envelope.meta)
            events.append(self._event(now, "accepted", msg_id, rid, rcpt, detail))
            if dropped:
                events.append(self._event(now, DROPPED, msg_id, rid, rcpt,
                                          {"reason": dropped, "stage": "acceptance"}))  # fmt: skip
        if envelope.idempotency is not None:
            key, request_hash, part = envelope.idempotency
            answer = [[r, rid, drops.get(r)] for r, rid in zip(rcpts, ids, strict=True)]
            db.execute(
                "INSERT OR REPLACE INTO idempotency(tenant, key, part, request_hash, msg_id,"
                " answer, created_at) VALUES (?,?,?,?,?,?,?)",
                (envelope.tenant or "", key, part, request_hash, msg_id, json.dumps(answer), now),
            )
        if live == 0:
            self._remove_if_done(msg_id, unlink)
        return StoredMessage(msg_id, tuple(ids), tuple(leases), dict(drops))

    def _event(
        self, ts: float, kind: str, msg_id: str, rid: int | None, rcpt: str | None,
        detail: dict[str, Any],
    ) -> dict[str, Any]:  # fmt: skip
        assert self._db is not None
        return insert_event(self._db, ts, kind, msg_id, rid, rcpt, detail)

    def _do_act(
        self, action: str, msg_id: str | None, events: list[dict[str, Any]], unlink: list[int]
    ) -> int:
        assert self._db is not None
        done, emptied = operator_action(self._db, action, msg_id, time.time())
        events += done
        self._reclaim(emptied, unlink)
        return len(done)

    def _reclaim(self, emptied: Iterable[int], unlink: list[int]) -> None:
        """Segments with no live message: their rows go now (in the caller's
        transaction), their files once it commits; never the one being written."""
        assert self._db is not None
        for seg in emptied:
            if not self.segments.writing(seg):
                self._db.execute("DELETE FROM segments WHERE id = ?", (seg,))
                unlink.append(seg)

    # Each query below names the partial index it must use (INDEXED BY: without
    # statistics the planner would rather take recipients_state and sort; with it, a
    # query the index cannot serve fails instead of scanning) and spells out the
    # index's condition (see _RECIPIENTS_INDEXES), lane included.
    _LEASE_COLUMNS = (
        "SELECT r.id, r.msg_id, r.rcpt, r.domain, r.attempts, r.created_at, m.mail_from,"
        " m.segment, m.body_offset, m.body_length, m.smtputf8, m.body_8bit, m.tenant, m.pool,"
        " r.lane"
    )
    # The high lane, in next_attempt order.
    _LEASE_HIGH_SQL = (
        _LEASE_COLUMNS + " FROM recipients r INDEXED BY recipients_due_high"
        " JOIN messages m ON m.id = r.msg_id"
        " WHERE r.state IN ('queued', 'deferred') AND r.held = 0 AND r.lane = 0"
        " AND r.next_attempt <= ? ORDER BY r.next_attempt LIMIT ?"
    )
    # One tenant's bulk mail, in next_attempt order.
    _LEASE_BULK_SQL = (
        _LEASE_COLUMNS + " FROM recipients r INDEXED BY recipients_due_bulk"
        " JOIN messages m ON m.id = r.msg_id"
        " WHERE r.state IN ('queued', 'deferred') AND r.held = 0 AND r.lane = 1"
        " AND r.tenant = ? AND r.next_attempt <= ? ORDER BY r.next_attempt LIMIT ?"
    )
    # The tenants with due bulk mail, in order, by a loose index scan of
    # recipients_due_bulk: one seek per tenant to the next tenant with pending bulk
    # mail (due or not: a next_attempt filter inside the step would walk every index
    # entry of a tenant whose mail is all deferred), then one seek to see whether it
    # has due mail. O(tenants · log n), however much mail each tenant has.
    _DUE_BULK_TENANTS_SQL = (
        "WITH RECURSIVE t(tenant) AS ("
        " SELECT MIN(tenant) FROM recipients INDEXED BY recipients_due_bulk"
        " WHERE state IN ('queued', 'deferred') AND held = 0 AND lane = 1"
        " UNION ALL"
        " SELECT (SELECT MIN(r.tenant) FROM recipients r INDEXED BY recipients_due_bulk"
        " WHERE r.state IN ('queued', 'deferred') AND r.held = 0 AND r.lane = 1"
        " AND r.tenant > t.tenant) FROM t WHERE t.tenant IS NOT NULL"
        ") SELECT t.tenant FROM t WHERE t.tenant IS NOT NULL AND EXISTS (SELECT 1"
        " FROM recipients r INDEXED BY recipients_due_bulk"
        " WHERE r.state IN ('queued', 'deferred') AND r.held = 0 AND r.lane = 1"
        " AND r.tenant = t.tenant AND r.next_attempt <= ?)"
    )

    def _do_lease(self, now: float, limit: int, bulk_limit: int | None = None) -> list[Lease]:
        assert self._db is not None
        db = self._db
        rows = self._take(db.execute(self._LEASE_HIGH_SQL, (now, limit)), now)
        room = limit - len(rows)
        if bulk_limit is not None:
            room = min(room, bulk_limit)
        if room > 0:
            rows += self._lease_bulk(now, room)
        return [
            Lease(
                r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8], r[9], bool(r[10]),
                bool(r[11]), r[12], r[13], r[14],
            )
            for r in rows
        ]  # fmt: skip

    def _lease_bulk(self, now: float, room: int) -> list[Any]:
        """Up to ``room`` due bulk recipients, shared fairly across tenants."""
        assert self._db is not None
        db = self._db
        tenants = [r[0] for r in db.execute(self._DUE_BULK_TENANTS_SQL, (now,))]
        if not tenants:
            return []
        # Round robin across calls, so that rounding up the shares (or having fewer
        # recipients than tenants) does not favour the same tenants every time: start
        # after the tenant the last call moved past. (Python orders str by code point,
        # SQLite TEXT by UTF-8 bytes: the same order.)
        after = self._bulk_after
        if after is not None:
            k = bisect.bisect_right(tenants, after)
            tenants = tenants[k:] + tenants[:k]
        if len(tenants) > room:
            # One recipient each for the first ``room`` tenants; the others come first
            # next time.
            tenants = tenants[:room]
            self._bulk_after = tenants[-1]
        else:
            self._bulk_after = tenants[0]
        rows: list[Any] = []
        while room > 0 and tenants:
            share = -(-room // len(tenants))  # ceil
            more = []
            for tenant in tenants:
                want = min(share, room)
                if want <= 0:
                    break
                got = self._take(db.execute(self._LEASE_BULK_SQL, (tenant, now, want)), now)
                rows += got
                room -= len(got)
                if len(got) == want:  # may have more: in the next round's share
                    more.append(tenant)
            tenants = more
        return rows

    def _take(self, cursor: sqlite3.Cursor, now: float) -> list[Any]:
        """Fetch the cursor's recipient rows and mark them ``active`` (leased)."""
        assert self._db is not None
        rows = cursor.fetchall()
        if rows:
            self._db.executemany(
                "UPDATE recipients SET state = 'active', updated_at = ? WHERE id = ?",
                [(now, r[0]) for r in rows],
            )
        return rows

    def _do_record(
        self, outcomes: Iterable[Outcome], events: list[dict[str, Any]], unlink: list[int]
    ) -> None:
        assert self._db is not None
        db = self._db
        now = time.time()
        finished: dict[str, int] = {}
        for o in outcomes:
            if o.state in FINAL_STATES:
                # Only a recipient still pending may finish; an operator's delete
                # racing a delivery must not be counted twice.
                cur = db.execute(
                    "UPDATE recipients SET state = ?, last_response = ?, updated_at = ?,"
                    " attempts = attempts + ?, wait_reason = NULL WHERE id = ? AND state IN"
                    " ('queued','active','deferred')",
                    (o.state, o.response, now, int(o.counted_attempt), o.rcpt_id),
                )
                if cur.rowcount:
                    finished[o.msg_id] = finished.get(o.msg_id, 0) + 1
            else:
                cur = db.execute(
                    "UPDATE recipients SET state = ?, last_response = ?, next_attempt = ?,"
                    " updated_at = ?, attempts = attempts + ?, wait_reason = ? WHERE id = ?"
                    " AND state IN ('queued','active','deferred')",
                    (o.state, o.response or None, o.next_attempt or now, now,
                     int(o.counted_attempt), o.wait_reason, o.rcpt_id),
                )  # fmt: skip
            if cur.rowcount and (o.event or o.counted_attempt or o.state != QUEUED):
                detail = dict(o.detail or {})
                if o.response:
                    detail.setdefault("response", o.response)
                if o.state == DEFERRED:
                    detail.setdefault("next_attempt", o.next_attempt)
                row = db.execute(
                    "SELECT rcpt FROM recipients WHERE id = ?", (o.rcpt_id,)
                ).fetchone()
                events.append(
                    self._event(now, o.event or o.state, o.msg_id, o.rcpt_id,
                                row[0] if row else None, detail)
                )  # fmt: skip
        for msg_id, n in finished.items():
            self._remove_if_done(msg_id, unlink, n)

    def _remove_if_done(self, msg_id: str, unlink: list[int], finished: int = 0) -> None:
        assert self._db is not None
        seg = settle_message(self._db, msg_id, finished)
        if seg is not None:
            self._reclaim([seg], unlink)

    # ------------------------------------------------------------------ upkeep

    def _upkeep(self) -> float:
        """One round of upkeep; returns the seconds until the next (sooner while a
        backlog of events to prune remains)."""
        db = self._db
        assert db is not None
        unlink: list[int] = []
        try:
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("BEGIN IMMEDIATE")
            try:
                # Segments emptied behind the writer's back (the queue commands) or
                # whose removal failed before.
                dead = [r[0] for r in db.execute("SELECT id FROM segments WHERE live <= 0")]
                self._reclaim(dead, unlink)
                pruned = self._prune_events(db)
                self._prune_idempotency(db)
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        except Exception as exc:
            log.warning("event=spool_upkeep_failed error=%r", str(exc))
            return self.upkeep_interval
        for seg in unlink:
            self._unlink_segment(seg)
        if unlink:
            log.info("event=spool_segments_reclaimed count=%d", len(unlink))
        self.stats["upkeeps"] += 1
        self.stats["segments_reclaimed"] += len(unlink)
        self.stats["events_pruned"] += pruned
        if pruned:
            log.debug("event=spool_events_pruned count=%d", pruned)
        return 0.05 if pruned >= self.prune_batch else self.upkeep_interval

    def _prune_idempotency(self, db: sqlite3.Connection) -> int:
        cur = db.execute(
            "DELETE FROM idempotency WHERE rowid IN (SELECT rowid FROM idempotency"
            " WHERE created_at < ? LIMIT ?)",
            (time.time() - IDEMPOTENCY_KEEP, self.prune_batch),
        )
        return max(cur.rowcount, 0)

    def _prune_events(self, db: sqlite3.Connection) -> int:
        """Delete up to ``prune_batch`` events that are copied and old enough."""
        copied = self.copied_through
        if self.event_retention <= 0 or copied is None:
            return 0
        newest = db.execute("SELECT MAX(id) FROM events").fetchone()[0]
        if newest is None:
            return 0
        # The newest event always stays: event ids are rowids, and an empty table
        # would hand out ids the copier has already moved past.
        upto = min(copied, int(newest) - 1)
        cur = db.execute(
            "DELETE FROM events WHERE id IN (SELECT id FROM events WHERE id <= ? AND ts < ?"
            " ORDER BY id LIMIT ?)",
            (upto, time.time() - self.event_retention, self.prune_batch),
        )
        return max(cur.rowcount, 0)
