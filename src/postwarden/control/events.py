"""Copies a spool shard's event log into the control database (docs/decisions/0005).

Events flow one way: the spool writes them durably as recipients change state; this
copier, running beside the spool in the same process, reads them from the shard's
index (its own read-only SQLite connection, never the writer's) and writes them, with
the ``messages`` and ``message_recipients`` rows they imply and the shard's cursor, in
one transaction of the control database. A crash repeats at most the last batch's
read, never its write: the cursor moves in the same transaction as the rows.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import sqlite3
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import Table, and_, bindparam, case, func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession

from postwarden.bounces import feedback
from postwarden.config import BouncesConfig
from postwarden.store.availability import LogLimiter
from postwarden.store.feed import lock_events
from postwarden.store.models import Event, EventCursor, Message, Recipient
from postwarden.values import tenant_id

log = logging.getLogger("postwarden.control.events")
_limited = LogLimiter(log)

BATCH = 2000
RECIPIENTS: Table = Recipient.__table__  # type: ignore[assignment]
EVENTS: Table = Event.__table__  # type: ignore[assignment]
# Event type -> the recipient's state after it.
STATE_AFTER = {
    "accepted": "queued",
    "deferred": "deferred",
    "delivered": "delivered",
    "bounced": "bounced",
    "expired": "expired",
    "dropped": "dropped",
    "deleted": "deleted",
    "queued": "queued",
}
ATTEMPTS = {"deferred", "delivered", "bounced"}


def recipient_id(msg_id: str, rcpt_id: int | None) -> str | None:
    return f"{msg_id}.{rcpt_id}" if rcpt_id is not None else None


def tags_text(tags: list[str]) -> str:
    return "," + ",".join(tags) + "," if tags else ""


def _ts(value: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(value, dt.UTC)


async def insert_events(s: AsyncSession, events: list[dict[str, Any]]) -> None:
    """Insert event rows. On PostgreSQL with RETURNING, which makes SQLAlchemy write
    them as INSERTs of up to 1000 rows each ("insertmanyvalues", one compiled statement
    reused): the rollups' statement triggers (migration 0005) fire once per statement,
    and a plain executemany is one statement per row there (bench/copier.py). SQLite's
    executemany is one prepared statement run per row, its fastest way."""
    if s.get_bind().dialect.name == "postgresql":
        await s.execute(EVENTS.insert().returning(EVENTS.c.id), events)
    else:
        await s.execute(EVENTS.insert(), events)


def insert_ignore(session: AsyncSession, model: Any) -> Any:
    """INSERT … ON CONFLICT DO NOTHING for the session's database."""
    name = session.bind.dialect.name if session.bind is not None else "sqlite"
    mod = postgresql if name == "postgresql" else sqlite
    return mod.insert(model).on_conflict_do_nothing()


class EventCopier:
    def __init__(
        self,
        spool_path: Path,
        sessions: Any,
        *,
        interval: float = 0.5,
        bounces: BouncesConfig | None = None,
        metrics: Any = None,
        on_suppressed: Callable[[list[tuple[int, str]]], Any] | None = None,
        on_copied: Callable[[int], None] | None = None,
    ) -> None:
        self.spool_path = Path(spool_path)
        # Failures feed suppressions here, in the transaction that copies their events.
        self.bounces = bounces or BouncesConfig()
        #: Called with (tenant id, address) of each suppression the copy wrote.
        self.on_suppressed = on_suppressed
        self.metrics = metrics
        #: Called with the id up to which the shard's events are committed in the
        #: control database (the spool may prune those).
        self.on_copied = on_copied
        self.shard = ""  # the spool's id (its index's meta table), read on first use
        self.sessions = sessions
        self.interval = interval
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._conn: sqlite3.Connection | None = None
        # Reads run in threads; one that a cancelled task left running must end before
        # the connection closes (an open read keeps the spool from checkpointing).
        self._conn_lock = threading.Lock()
        # msg id -> (tenant id, tags text), for the events after "accepted".
        self._msgs: OrderedDict[str, tuple[int | None, str]] = OrderedDict()
        self.copied = 0
        self.suppressed: list[tuple[int, str]] = []

    def reconfigure(self, bounces: BouncesConfig) -> None:
        """A reloaded configuration's bounce settings, for the next copy."""
        self.bounces = bounces

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="event-copier")

    def notify(self, _events: list[dict[str, Any]]) -> None:
        """A spool event listener: new events are committed, copy soon."""
        self._wake.set()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        try:
            while await self.copy_once() == BATCH:  # what the spool wrote last
                pass
        except Exception as exc:
            _limited(logging.WARNING, "event_copy_stop", "event=event_copy_failed at=stop",
                     exc=exc)  # fmt: skip
        await asyncio.to_thread(self._close_conn)

    def _close_conn(self) -> None:
        with self._conn_lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    async def _run(self) -> None:
        failing = 0  # copies failed in a row: the next waits longer (up to 5 s)
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.interval * 4)
            await asyncio.sleep(self.interval)  # gather a batch
            if failing:
                await asyncio.sleep(min(5.0, 0.25 * 2**failing))
            self._wake.clear()
            try:
                while await self.copy_once() == BATCH:
                    pass
                failing = 0
            except Exception as exc:
                # The events wait in the spool's log (never pruned before they are
                # copied) and are copied when the database is back.
                failing = min(failing + 1, 10)
                _limited(logging.WARNING, "event_copy", "event=event_copy_failed", exc=exc)

    def _connect(self) -> sqlite3.Connection:
        with self._conn_lock:
            return self._connect_locked()

    def _connect_locked(self) -> sqlite3.Connection:
        if self._conn is None:
            uri = f"file:{self.spool_path / 'index.db'}?mode=ro"
            self._conn = sqlite3.connect(uri, uri=True, check_same_thread=False)
            row = self._conn.execute("SELECT value FROM meta WHERE key = 'spool_id'").fetchone()
            self.shard = f"spool:{row[0]}" if row else str(self.spool_path.resolve())
        return self._conn

    def _read(self, after: int) -> list[tuple[Any, ...]]:
        with self._conn_lock:
            return (
                self._connect_locked()
                .execute(
                    "SELECT id, ts, type, msg_id, rcpt_id, rcpt, detail FROM events WHERE id > ?"
                    " ORDER BY id LIMIT ?",
                    (after, BATCH),
                )
                .fetchall()
            )

    async def copy_once(self) -> int:
        """Copy the next batch; the number of events copied."""
        if self._conn is None:
            await asyncio.to_thread(self._connect)
        async with self.sessions() as s:
            cur = await s.get(EventCursor, self.shard)
            if cur is None:
                # A cursor from before spools had ids was kept under the path: adopt it.
                old = await s.get(EventCursor, str(self.spool_path.resolve()))
                if old is not None and old.shard != self.shard:
                    cur = EventCursor(shard=self.shard, last_id=old.last_id)
                    s.add(cur)
                    await s.delete(old)
            after = cur.last_id if cur is not None else 0
            if after and self.on_copied is not None:
                self.on_copied(after)  # committed in an earlier run
            rows = await asyncio.to_thread(self._read, after)
            if not rows:
                return 0
            try:
                await lock_events(s)  # event ids visible in the order drawn (PostgreSQL)
                await self._write(s, rows)
                if cur is None:
                    s.add(EventCursor(shard=self.shard, last_id=rows[-1][0]))
                else:
                    cur.last_id = rows[-1][0]
                await s.commit()
            except BaseException:
                # What _write learnt of these messages was never committed: forget it,
                # so the retry writes their rows again.
                self._msgs.clear()
                raise
        self.copied += len(rows)
        if self.on_copied is not None:
            self.on_copied(rows[-1][0])
        if self.suppressed and self.on_suppressed is not None:
            self.on_suppressed(self.suppressed)
        return len(rows)

    async def _lookup(self, s: AsyncSession, msg_ids: set[str]) -> None:
        missing = [m for m in msg_ids if m not in self._msgs]
        for i in range(0, len(missing), 500):
            got = (
                await s.execute(
                    select(Message.id, Message.tenant_id, Message.tags).where(
                        Message.id.in_(missing[i : i + 500])
                    )
                )
            ).all()
            for mid, tenant, tags in got:
                self._remember(mid, tenant, tags_text(tags or []))

    def _remember(self, msg_id: str, tenant: int | None, tags: str) -> None:
        self._msgs[msg_id] = (tenant, tags)
        self._msgs.move_to_end(msg_id)
        while len(self._msgs) > 20_000:
            self._msgs.popitem(last=False)

    async def _write(self, s: AsyncSession, rows: list[tuple[Any, ...]]) -> None:
        messages: list[dict[str, Any]] = []
        recipients: list[dict[str, Any]] = []
        events: list[dict[str, Any]] = []
        updates: dict[str, dict[str, Any]] = {}
        parsed = []
        for eid, ts, kind, msg_id, rcpt_id, rcpt, detail_text in rows:
            detail = json.loads(detail_text or "{}")
            parsed.append((eid, ts, kind, msg_id, rcpt_id, rcpt, detail))
            if kind == "accepted" and msg_id not in self._msgs:
                tenant = tenant_id(detail.get("tenant"))
                meta = detail.get("meta") or {}
                tags = list(meta.get("tags") or [])
                self._remember(msg_id, tenant, tags_text(tags))
                if "mail_from" in detail and tenant is not None:  # its first recipient
                    messages.append(
                        {
                            "id": msg_id,
                            "tenant_id": tenant,
                            "created_at": _ts(ts),
                            "mail_from": str(detail.get("mail_from", ""))[:320],
                            "subject": str(meta.get("subject", ""))[:300],
                            "source": meta.get("source", "smtp"),
                            "tags": tags,
                            "meta": meta.get("metadata") or {},
                        }
                    )
        await self._lookup(s, {p[3] for p in parsed if p[3] not in self._msgs})
        new_rcpts: dict[str, dict[str, Any]] = {}
        for _eid, ts, kind, msg_id, rcpt_id, rcpt, detail in parsed:
            tenant, tags_csv = self._msgs.get(msg_id, (None, ""))
            if tenant is None:
                # Mail without a tenant (a trusted network's relay) is nobody's to see
                # through the API: its events stay in the spool's log only.
                continue
            rid = recipient_id(msg_id, rcpt_id)
            detail.pop("meta", None)
            events.append(
                {
                    "tenant_id": tenant,
                    "ts": _ts(ts),
                    "type": kind,
                    "message_id": msg_id,
                    "recipient_id": rid,
                    "recipient": (rcpt or "")[:320] or None,
                    "tags": tags_csv,
                    "detail": detail,
                }
            )
            if rid is None:
                continue
            if kind == "accepted":
                new_rcpts[rid] = {
                    "id": rid,
                    "message_id": msg_id,
                    "tenant_id": tenant,
                    "address": (rcpt or "")[:320],
                    "state": "queued",
                    "attempts": 0,
                    "last_response": "",
                    "updated_at": _ts(ts),
                }
            elif kind in STATE_AFTER:
                # One UPDATE per recipient and batch (its latest state), all sent as
                # one executemany; rows inserted just before (here, or by the API at
                # injection) are updated the same way.
                u = updates.setdefault(rid, {"rid": rid, "n": 0, "last_response": None})
                u["state"] = STATE_AFTER[kind]
                u["updated_at"] = _ts(ts)
                u["n"] += kind in ATTEMPTS
                resp = detail.get("response") or detail.get("reason")
                if resp:
                    u["last_response"] = str(resp)[:2000]
        recipients = list(new_rcpts.values())
        if messages:
            await s.execute(insert_ignore(s, Message), messages)
        if recipients:
            await s.execute(insert_ignore(s, Recipient), recipients)
        if updates:
            await s.execute(
                update(RECIPIENTS)
                .where(RECIPIENTS.c.id == bindparam("rid"))
                .values(
                    # A bounce report (bounces.processor) can be written before the
                    # copy of the delivery it is about: "delivered" never undoes it.
                    state=case(
                        (
                            and_(
                                RECIPIENTS.c.state == "bounced",
                                bindparam("state") == "delivered",
                            ),
                            RECIPIENTS.c.state,
                        ),
                        else_=bindparam("state"),
                    ),
                    updated_at=bindparam("updated_at"),
                    attempts=RECIPIENTS.c.attempts + bindparam("n"),
                    last_response=func.coalesce(
                        bindparam("last_response"), RECIPIENTS.c.last_response
                    ),
                ),
                list(updates.values()),
            )
        if events:
            await insert_events(s, events)
        await self._feedback(s, events)

    async def _feedback(self, s: AsyncSession, events: list[dict[str, Any]]) -> None:
        """Failures during delivery into suppressions, in the copy's transaction: the
        bounce policy is bounces.feedback's; this counts and logs what it wrote."""
        written = await feedback.apply_failures(s, self.bounces, events)
        for w in written:
            if self.metrics is not None:
                self.metrics.bounce_suppressions.labels(w.reason).inc()
            log.info(
                "event=suppressed reason=%s tenant=%s msg=%s category=%s",
                w.reason,
                w.tenant_id,
                w.message_id,
                w.category,
            )
        self.suppressed = [(w.tenant_id, w.address) for w in written]
