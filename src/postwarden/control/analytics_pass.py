"""The analytics pass (issue 23; docs/analytics.md): the first worker rolls events up
into ``stat_hours`` as they arrive (``store.rollups``), a second or so behind them, and
copies the shaping broker's changes (response-rule actions, rate steps down and up;
``shaping.service`` op ``changes``) into the appliance's counts by provider site.

One process runs it (the verdict pass's rule); a second one would find the cursor's
row locked and wait its turn (``store.campaign_outcomes.hold_cursor``). The broker's
changes are read after a cursor of their own (``event_cursors`` row
``shaping:<epoch>``, moved in the transaction that counts them): a restart of this
process never counts one twice; a restart of the broker starts a new epoch.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

from sqlalchemy import delete, select, update

from postwarden.control import stop_task
from postwarden.store.availability import LogLimiter, is_unavailable
from postwarden.store.campaign_outcomes import new_cursor
from postwarden.store.models import EventCursor
from postwarden.store.rollups import ALL, BATCH, Key, Rollups, add_counts, hour_of, site_label

log = logging.getLogger("postwarden.control.analytics")
_limited = LogLimiter(log)

#: Seconds between looks when the last found nothing new.
INTERVAL = 1.0


#: Seconds between reads of the shaping broker's changes.
SHAPING_EVERY = 30.0
#: The metric each kind of change counts in.
CHANGE_METRIC = {"action": "throttle_actions", "down": "rate_down", "up": "rate_up"}


def change_keys(change: dict[str, Any]) -> list[Key]:
    """The appliance's counts one broker change adds one to: whole, by site and by
    source."""
    kind = change.get("kind")
    metric = CHANGE_METRIC.get(str(change.get("direction") if kind == "rate" else kind))
    if metric is None:
        return []
    hour = hour_of(dt.datetime.fromtimestamp(float(change.get("at") or 0), dt.UTC))
    out: list[Key] = [(ALL, "tenant", "", "", "", hour, metric)]
    site, source = site_label(change.get("site")), str(change.get("source") or "")[:255]
    if site:
        out.append((ALL, "tenant", "", "site", site, hour, metric))
    if source:
        out.append((ALL, "tenant", "", "source", source, hour, metric))
    return out


class AnalyticsPass:
    def __init__(
        self,
        sessions: Any,
        *,
        interval: float = INTERVAL,
        shaping: Callable[..., Awaitable[dict[str, Any]]] | None = None,
    ) -> None:
        self.sessions = sessions
        self.rollups = Rollups(sessions, client_of=_client_of())
        self.interval = interval
        #: The broker's op (the plane's shaping_command; None: no MTA in this process).
        self.shaping = shaping
        self._shaping_at = 0.0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="analytics")

    async def stop(self) -> None:
        await stop_task(self._task)
        self._task = None

    async def run_once(self) -> int:
        """Roll up every event there is now; how many."""
        n = 0
        while True:
            got = await self.rollups.step()
            n += got
            if got < BATCH:
                return n

    async def read_changes(self) -> int:
        """Count the broker's changes not counted yet; how many."""
        if self.shaping is None:
            return 0
        answer = await self.shaping(op="changes", after=0, limit=1)
        epoch = str(answer.get("epoch") or "")
        shard = f"shaping:{epoch}"
        async with self.sessions() as s:
            after = await s.scalar(select(EventCursor.last_id).where(EventCursor.shard == shard))
        after = int(after or 0)
        n = 0
        while int(answer.get("last_seq") or 0) > after:
            answer = await self.shaping(op="changes", after=after, epoch=epoch)
            if str(answer.get("epoch") or "") != epoch:
                return n  # the broker restarted meanwhile: the next read starts over
            changes = [c for c in answer.get("changes") or () if int(c.get("seq", 0)) > after]
            if not changes:
                break
            counts: Counter[Key] = Counter()
            for c in changes:
                counts.update(change_keys(c))
            last = max(int(c["seq"]) for c in changes)
            async with self.sessions() as s:
                await add_counts(s, counts)
                await s.execute(new_cursor(s, 0, shard))
                await s.execute(
                    update(EventCursor)
                    .where(EventCursor.shard == shard, EventCursor.last_id < last)
                    .values(last_id=last)
                )
                # An earlier broker's cursor is done with.
                await s.execute(
                    delete(EventCursor).where(
                        EventCursor.shard.like("shaping:%"), EventCursor.shard != shard
                    )
                )
                await s.commit()
            n += len(changes)
            after = last
        return n

    async def _run(self) -> None:
        failing = 0
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(min(30.0, self.interval * 2**failing))
            try:
                await self.run_once()
                if self.shaping is not None and loop.time() - self._shaping_at >= SHAPING_EVERY:
                    self._shaping_at = loop.time()
                    with contextlib.suppress(ConnectionError, TimeoutError):
                        await self.read_changes()
                failing = 0
            except Exception as exc:
                failing = min(failing + 1, 5)
                if not is_unavailable(exc):
                    _limited(logging.WARNING, "analytics", "event=analytics_pass_failed", exc=exc)


def _client_of() -> Any:
    from postwarden.engagement.clients import client_of

    return client_of
