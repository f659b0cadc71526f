"""The analytics pass (issue 23; docs/analytics.md): the first worker rolls events up
into ``stat_hours`` as they arrive (``store.rollups``), a second or so behind them.

One process runs it (the verdict pass's rule); a second one would find the cursor's
row locked and wait its turn (``store.campaign_outcomes.hold_cursor``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from postwarden.store.availability import LogLimiter, is_unavailable
from postwarden.store.rollups import BATCH, Rollups

log = logging.getLogger("postwarden.control.analytics")
_limited = LogLimiter(log)

#: Seconds between looks when the last found nothing new.
INTERVAL = 1.0


class AnalyticsPass:
    def __init__(self, sessions: Any, *, interval: float = INTERVAL) -> None:
        self.rollups = Rollups(sessions, client_of=_client_of())
        self.interval = interval
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="analytics")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None

    async def run_once(self) -> int:
        """Roll up every event there is now; how many."""
        n = 0
        while True:
            got = await self.rollups.step()
            n += got
            if got < BATCH:
                return n

    async def _run(self) -> None:
        failing = 0
        while True:
            await asyncio.sleep(min(30.0, self.interval * 2**failing))
            try:
                await self.run_once()
                failing = 0
            except Exception as exc:
                failing = min(failing + 1, 5)
                if not is_unavailable(exc):
                    _limited(logging.WARNING, "analytics", "event=analytics_pass_failed", exc=exc)


def _client_of() -> Any:
    return None
