"""Retention of the control database: events, message records, tracking hits and
analytics' hourly counts older than ``database.event_retention`` /
``database.message_retention`` / ``database.tracking_retention`` /
``database.analytics_retention`` go, in small batches.

At a million messages an hour these tables grow by millions of rows an hour. One
process prunes (the appliance, or worker 0 of a supervisor's), off the hot path: a
DELETE of at most ``database.prune_batch`` rows per transaction, picked through the
index on the time column (migration 0003), with a pause between batches so that the
event copier and the API never wait long on it. Suppressions are not touched: they
have their own expiry.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
from collections.abc import Callable
from typing import Any

from sqlalchemy import delete, func, select

from postwarden.config import DatabaseConfig
from postwarden.store.analytics_models import StatHour
from postwarden.store.availability import LogLimiter
from postwarden.store.engagement_models import TrackingHit
from postwarden.store.models import Event, Message, Recipient

log = logging.getLogger("postwarden.store.retention")
_limited = LogLimiter(log)

PAUSE = 0.05  # seconds between batches: others' transactions get their turn


def cutoffs(cfg: DatabaseConfig, now: dt.datetime) -> dict[str, dt.datetime | None]:
    """What is old enough to go, per kind (None: kept for ever)."""

    def before(seconds: float) -> dt.datetime | None:
        return now - dt.timedelta(seconds=seconds) if seconds > 0 else None

    return {
        "events": before(cfg.event_retention),
        "messages": before(cfg.message_retention),
        "tracking_hits": before(cfg.tracking_retention),
        "stat_hours": before(cfg.analytics_retention),
    }


FIRST_PRUNE_DELAY = 60.0


class Pruner:
    def __init__(
        self,
        cfg: DatabaseConfig,
        sessions: Any,
        *,
        on_pruned: Callable[[str, int], None] | None = None,
        clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
    ) -> None:
        self.cfg = cfg
        self.sessions = sessions
        self.on_pruned = on_pruned  # (table, rows) after each batch: the metric
        self.clock = clock
        self._task: asyncio.Task[None] | None = None

    def reconfigure(self, cfg: DatabaseConfig) -> None:
        """A reloaded configuration's retention, for the next pruning."""
        self.cfg = cfg

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="control-retention")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        # The first run a minute after start (or sooner with a shorter interval): a
        # start, or a restart after a crash, has better things to do first.
        await asyncio.sleep(min(FIRST_PRUNE_DELAY, self.cfg.prune_interval))
        while True:
            try:
                await self.run_once()
            except Exception as exc:
                _limited(logging.WARNING, "prune", "event=prune_failed", exc=exc)
            await asyncio.sleep(self.cfg.prune_interval)

    async def run_once(self) -> dict[str, int]:
        """Prune everything now past retention; rows deleted per table."""
        cut = cutoffs(self.cfg, self.clock())
        done = {"events": 0, "messages": 0, "message_recipients": 0, "tracking_hits": 0,
                "stat_hours": 0}  # fmt: skip
        if cut["events"] is not None:
            done["events"] = await self._drain(self._events_batch, cut["events"], "events")
        if cut["messages"] is not None:
            done["messages"] = await self._drain(self._messages_batch, cut["messages"], "messages")
        if cut["tracking_hits"] is not None:
            done["tracking_hits"] = await self._drain(
                self._hits_batch, cut["tracking_hits"], "tracking_hits"
            )
        if cut["stat_hours"] is not None:
            while (n := await self._stats_batch(cut["stat_hours"])) >= 0:
                done["stat_hours"] += n
                await asyncio.sleep(PAUSE)
        if any(done.values()):
            log.info(
                "event=control_pruned events=%d messages=%d tracking_hits=%d stat_hours=%d",
                done["events"],
                done["messages"],
                done["tracking_hits"],
                done["stat_hours"],
            )
        return done

    async def _drain(self, batch: Any, before: dt.datetime, table: str) -> int:
        total = 0
        while True:
            n = await batch(before)
            total += n
            if n < self.cfg.prune_batch:
                return total
            await asyncio.sleep(PAUSE)

    async def _events_batch(self, before: dt.datetime) -> int:
        async with self.sessions() as s:
            ids = select(Event.id).where(Event.ts < before).limit(self.cfg.prune_batch)
            ids_list = list((await s.execute(ids)).scalars())
            if ids_list:
                await s.execute(delete(Event).where(Event.id.in_(ids_list)))
                await s.commit()
        self._count("events", len(ids_list))
        return len(ids_list)

    async def _hits_batch(self, before: dt.datetime) -> int:
        async with self.sessions() as s:
            stmt = select(TrackingHit.id).where(TrackingHit.at < before)
            ids = list((await s.execute(stmt.limit(self.cfg.prune_batch))).scalars())
            if ids:
                await s.execute(delete(TrackingHit).where(TrackingHit.id.in_(ids)))
                await s.commit()
        self._count("tracking_hits", len(ids))
        return len(ids)

    async def _stats_batch(self, before: dt.datetime) -> int:
        """The counts of the oldest hour before ``before`` (found by the index on
        ``hour``; a whole hour at a time, so that none is left half counted); -1 when
        there is none."""
        async with self.sessions() as s:
            oldest = await s.scalar(select(func.min(StatHour.hour)).where(StatHour.hour < before))
            if oldest is None:
                return -1
            result = await s.execute(delete(StatHour).where(StatHour.hour == oldest))
            await s.commit()
        n = int(getattr(result, "rowcount", 0) or 0)
        self._count("stat_hours", n)
        return n

    async def _messages_batch(self, before: dt.datetime) -> int:
        """A batch of messages with their recipients (``message_id`` is indexed)."""
        async with self.sessions() as s:
            stmt = select(Message.id).where(Message.created_at < before)
            ids = list((await s.execute(stmt.limit(self.cfg.prune_batch))).scalars())
            if not ids:
                return 0
            rcpts = await s.execute(delete(Recipient).where(Recipient.message_id.in_(ids)))
            await s.execute(delete(Message).where(Message.id.in_(ids)))
            await s.commit()
        self._count("messages", len(ids))
        self._count("message_recipients", int(getattr(rcpts, "rowcount", 0) or 0))
        return len(ids)

    def _count(self, table: str, n: int) -> None:
        if n and self.on_pruned is not None:
            self.on_pruned(table, n)
