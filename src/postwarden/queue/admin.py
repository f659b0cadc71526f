"""Operator actions on the spool index, for ``postwarden queue ...`` and ``events``.

These open the index with their own SQLite connection (WAL allows it while the
appliance runs). State changes only touch recipients that are not being delivered
right now (``active``), so an operator never races a delivery attempt; each change is
an event.

A spool path may hold several shards, one per worker (see
:func:`postwarden.queue.shards.shard_paths`); :class:`QueueAdmin` reads and changes all
of them. Message ids are unique across shards; recipient and event ids are only unique
within their shard, so every event returned carries its shard's number (``"shard"``),
and following the event log keeps one cursor per shard.
"""

from __future__ import annotations

import builtins
import heapq
import itertools
import json
import sqlite3
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from postwarden.queue import describe
from postwarden.queue.records import operator_action
from postwarden.queue.shards import shard_number, shard_paths
from postwarden.values import PENDING_STATES

Row = dict[str, Any]
# ``after`` for :meth:`QueueAdmin.events` and :meth:`QueueAdmin.tail`: an event id
# applied to every shard (0: from the start), or one per shard number.
After = int | Mapping[int, int]


_TABLES = ("messages", "recipients", "events", "segments")


def _connect(path: Path) -> sqlite3.Connection | None:
    """A connection to a shard's index, or None while its worker is still creating it."""
    db = sqlite3.connect(path / "index.db", isolation_level=None, timeout=30)
    db.row_factory = sqlite3.Row
    db.execute("PRAGMA busy_timeout=30000")
    found = db.execute(
        "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name IN (?,?,?,?)",
        _TABLES,
    ).fetchone()[0]
    if found == len(_TABLES):
        return db
    db.close()
    return None


def _merge(streams: Iterable[builtins.list[Row]], *keys: str, limit: int) -> builtins.list[Row]:
    """The first ``limit`` rows of streams each already ordered by ``keys``."""
    merged = heapq.merge(*streams, key=lambda r: tuple(r[k] for k in keys))
    return builtins.list(itertools.islice(merged, max(limit, 0)))


class QueueAdmin:
    """Read and change the queue (every shard of it) from outside the appliance."""

    def __init__(self, spool_path: str | Path) -> None:
        self.root = Path(spool_path)
        # shard number -> connection, in shard order (worker 0 first)
        self.shards: dict[int, sqlite3.Connection] = {}
        self._wait_column: dict[int, bool] = {}
        self._open_new_shards()
        if not self.shards:
            raise FileNotFoundError(f"no spool index at {self.root / 'index.db'}")

    def _open_new_shards(self) -> builtins.list[int]:
        """Open the shards that appeared since the last call; returns their numbers."""
        new = []
        for path in shard_paths(self.root):
            k = shard_number(self.root, path)
            if k not in self.shards and (db := _connect(path)) is not None:
                self.shards[k] = db
                # A shard of schema 3 (its appliance not restarted since an upgrade of
                # the software) has no wait_reason yet: read and act without it.
                columns = {r[1] for r in db.execute("PRAGMA table_info(recipients)")}
                self._wait_column[k] = "wait_reason" in columns
                new.append(k)
        return new

    def close(self) -> None:
        for db in self.shards.values():
            db.close()

    def list(
        self, state: str | None = None, limit: int = 100, *, every: bool = False
    ) -> builtins.list[Row]:
        """Recipients in the queue, oldest message first: those that wait (``queued``,
        ``deferred``, ``active``; held ones included), or ``every`` one still in the
        index (the finished recipients of messages with others pending too), or
        those in ``state`` (``held``: the held ones). Each row says ``why`` in words
        (:func:`postwarden.queue.describe.why`)."""
        where = ""
        args: builtins.list[Any] = []
        if state == "held":
            where = " WHERE r.held = 1"
        elif state:
            where = " WHERE r.state = ?"
            args.append(state)
        elif not every:
            where = f" WHERE r.state IN ({','.join('?' * len(PENDING_STATES))})"
            args += PENDING_STATES
        args.append(limit)
        per_shard = []
        for k, db in self.shards.items():
            wait = "r.wait_reason" if self._wait_column[k] else "NULL"
            sql = (
                "SELECT r.msg_id, r.id AS rcpt_id, r.rcpt, r.state, r.held, r.attempts,"  # noqa: S608
                f" r.next_attempt, r.last_response, {wait} AS wait_reason, m.mail_from,"
                " m.received_at FROM recipients r JOIN messages m ON m.id = r.msg_id"
                f"{where} ORDER BY m.received_at, r.id LIMIT ?"
            )
            per_shard.append([dict(r) for r in db.execute(sql, args)])
        rows = _merge(per_shard, "received_at", "rcpt_id", limit=limit)
        now = time.time()
        for r in rows:
            r["why"] = describe.why(r, now)
        return rows

    def summary(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for db in self.shards.values():
            for st, n in db.execute("SELECT state, COUNT(*) FROM recipients GROUP BY state"):
                out[st] = out.get(st, 0) + n
        out["held"] = self._count("SELECT COUNT(*) FROM recipients WHERE held=1")
        out["messages"] = self._count("SELECT COUNT(*) FROM messages")
        return out

    def _count(self, sql: str) -> int:
        return sum(int(db.execute(sql).fetchone()[0]) for db in self.shards.values())

    def _shard_of(self, msg_id: str) -> tuple[int, sqlite3.Row] | None:
        for k, db in self.shards.items():
            msg = db.execute("SELECT * FROM messages WHERE id = ?", (msg_id,)).fetchone()
            if msg is not None:
                return k, msg
        return None

    def show(self, msg_id: str) -> dict[str, Any] | None:
        found = self._shard_of(msg_id)
        rcpts: builtins.list[Row] = []
        if found is not None:
            wait = "wait_reason" if self._wait_column[found[0]] else "NULL AS wait_reason"
            rcpts = [
                dict(r)
                for r in self.shards[found[0]].execute(
                    "SELECT id, rcpt, state, held, attempts, next_attempt, last_response,"  # noqa: S608
                    f" {wait} FROM recipients WHERE msg_id = ? ORDER BY id",
                    (msg_id,),
                )
            ]
            now = time.time()
            for r in rcpts:
                r["why"] = describe.why(r, now)
        events = self.events(msg_id=msg_id, limit=10_000)
        if found is None and not events:
            return None
        return {
            "id": msg_id,
            "shard": found[0] if found else events[0]["shard"],
            "message": dict(found[1]) if found else None,
            "recipients": rcpts,
            "events": events,
            "in_queue": found is not None,
        }

    # -- the event log

    def _cursors(self, after: After | None) -> dict[int, int]:
        if after is None:
            return self.last_event_ids()
        if isinstance(after, int):
            return dict.fromkeys(self.shards, after)
        return {k: after.get(k, 0) for k in self.shards}

    def _shard_events(
        self, k: int, after: int, msg_id: str | None, limit: int, *, upto: int | None = None
    ) -> builtins.list[Row]:
        """Events of shard ``k`` past ``after``: the first ``limit``, or with ``upto``,
        the last ``limit`` up to that id (oldest first either way)."""
        sql = "SELECT * FROM events WHERE id > ?"
        args: builtins.list[Any] = [after]
        if upto is not None:
            sql += " AND id <= ?"
            args.append(upto)
        if msg_id:
            sql += " AND msg_id = ?"
            args.append(msg_id)
        sql += " ORDER BY id DESC LIMIT ?" if upto is not None else " ORDER BY id LIMIT ?"
        args.append(limit)
        out = []
        for r in self.shards[k].execute(sql, args):
            d = dict(r)
            d["detail"] = json.loads(d["detail"] or "{}")
            d["shard"] = k
            out.append(d)
        if upto is not None:
            out.reverse()
        return out

    def events(
        self, *, msg_id: str | None = None, after: After = 0, limit: int = 100
    ) -> builtins.list[Row]:
        """Up to ``limit`` events of every shard, oldest first (by timestamp).

        ``after`` is an event id applied in every shard (ids are per shard, so a
        single id other than 0 only makes sense with one shard), or a mapping from
        shard number to the last event id seen there (shards not in it: from the start).
        """
        cursors = self._cursors(after)
        per_shard = [self._shard_events(k, c, msg_id, limit) for k, c in cursors.items()]
        # Within a shard the log is in id (commit) order; merging keeps that order,
        # so a cursor per shard never skips an event.
        return _merge(per_shard, "ts", limit=limit)

    def recent(
        self, limit: int = 100, *, msg_id: str | None = None
    ) -> tuple[builtins.list[Row], dict[int, int]]:
        """The newest ``limit`` events of every shard (of one message), oldest first,
        and the per-shard cursors they were read up to: following from those
        (:meth:`tail` ``after=``) misses nothing and repeats nothing."""
        cursors = self.last_event_ids()
        per_shard = [
            self._shard_events(k, 0, msg_id, max(limit, 0), upto=c) for k, c in cursors.items()
        ]
        merged = builtins.list(heapq.merge(*per_shard, key=lambda r: r["ts"]))
        return merged[max(len(merged) - limit, 0) :], cursors

    def last_event_ids(self) -> dict[int, int]:
        """The newest event id of each shard (0 when it has none)."""
        return {
            k: int(db.execute("SELECT COALESCE(MAX(id), 0) FROM events").fetchone()[0])
            for k, db in self.shards.items()
        }

    def last_event_id(self) -> int:
        """The highest event id in any shard (see :meth:`last_event_ids` for cursors)."""
        return max(self.last_event_ids().values())

    def tail(
        self, poll: float = 0.5, after: After | None = None, *, msg_id: str | None = None
    ) -> Iterator[Row]:
        """Follow the event log of every shard (of one message): from now
        (``after=None``), from the start (``after=0``) or from per-shard cursors
        (:meth:`recent` returns some). Shards that appear later are followed from
        their first event."""
        return self._follow(self._cursors(after), poll, msg_id)

    def history(self, msg_id: str | None = None) -> Iterator[Row]:
        """Every event of every shard (of one message), from the first, read a page
        at a time; ends at the newest."""
        return self._follow(self._cursors(0), None, msg_id)

    def _follow(
        self, cursors: dict[int, int], poll: float | None, msg_id: str | None
    ) -> Iterator[Row]:
        """Page through the log from ``cursors``: at its end, wait ``poll`` seconds
        for more (or stop, when ``poll`` is None)."""
        while True:
            batch = self.events(msg_id=msg_id, after=cursors, limit=1000)
            for ev in batch:
                cursors[ev["shard"]] = ev["id"]
                yield ev
            if not batch:
                if poll is None:
                    return
                for k in self._open_new_shards():
                    cursors[k] = 0
                time.sleep(poll)

    # -- actions
    #
    # The state changes are the spool's own (postwarden.queue.records.operator_action),
    # run here on this process's connection in one transaction per shard. A delete
    # that empties a segment leaves its file to the running appliance, which unlinks
    # it at its next upkeep (or at its next start).

    def _act(self, action: str, msg_id: str | None) -> int:
        if msg_id in (None, "ALL"):
            return sum(self._act_in(k, action, None) for k in self.shards)
        found = self._shard_of(msg_id)
        if found is None:
            return 0
        return self._act_in(found[0], action, msg_id)

    def _act_in(self, k: int, action: str, msg_id: str | None) -> int:
        db = self.shards[k]
        db.execute("BEGIN IMMEDIATE")
        try:
            events, _emptied = operator_action(
                db, action, msg_id, time.time(), wait_column=self._wait_column[k]
            )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return len(events)

    def act_on(self, action: str, msg_ids: Iterable[str]) -> int:
        """``action`` on each of ``msg_ids`` (those no longer in the queue are
        skipped), in one transaction per shard: how many recipients it changed."""
        wanted = set(msg_ids)
        done = 0
        for k, db in self.shards.items():
            if not wanted:
                break
            has = "SELECT 1 FROM messages WHERE id = ?"
            here = [m for m in wanted if db.execute(has, (m,)).fetchone()]
            if not here:
                continue
            db.execute("BEGIN IMMEDIATE")
            try:
                for m in here:
                    events, _emptied = operator_action(
                        db, action, m, time.time(), wait_column=self._wait_column[k]
                    )
                    done += len(events)
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            wanted.difference_update(here)
        return done

    def hold(self, msg_id: str | None) -> int:
        return self._act("hold", msg_id)

    def release(self, msg_id: str | None) -> int:
        return self._act("release", msg_id)

    def flush(self, msg_id: str | None = None) -> int:
        return self._act("flush", msg_id)

    def delete(self, msg_id: str | None) -> int:
        return self._act("delete", msg_id)
