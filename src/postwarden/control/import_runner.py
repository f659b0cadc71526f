"""The background runner of contact imports and data-source pulls (issue 20).

Every control process runs one (the control plane starts and stops it); the database
decides who does what. An import is claimed with a compare-and-set on its state, owner
and lease (``store.imports.claim``), renewed with each committed batch: two runners
never run the same import, and one whose process died is taken over once its lease
has passed (at once when it ran on this host and its process is gone). A data source
that is due is claimed by moving its next run forward (``control.data_sources``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from postwarden.control import stop_task
from postwarden.store.availability import LogLimiter, is_unavailable
from postwarden.store.imports import (
    LEASE,
    claim,
    forget_runner,
    prune_finished,
    reap_uploads,
    run_import,
    runner_name,
)

log = logging.getLogger("postwarden.control.imports")
_limited = LogLimiter(log)
#: Seconds between looks for work when nobody wakes the runner.
POLL = 1.0


class ImportRunner:
    def __init__(
        self,
        sessions: Callable[[], Any],
        batch: int,
        pull_due: Callable[[], Awaitable[int]] | None = None,
    ) -> None:
        self.sessions = sessions
        self.batch = batch
        # Starts the data-source pulls that are due; how many it started.
        self.pull_due = pull_due
        self.name = runner_name()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        # When uploads cut off and old imports were last looked for (monotonic).
        self._reaped = 0.0

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name="imports")

    def wake(self) -> None:
        """Look for work now (an import was just queued)."""
        self._wake.set()

    async def stop(self) -> None:
        await stop_task(self._task)
        self._task = None
        forget_runner(self.name)

    async def run_once(self) -> int:
        """Pull the data sources that are due, then run every import there is to run:
        how many imports ran."""
        if time.monotonic() - self._reaped > LEASE:
            await reap_uploads(self.sessions)
            await prune_finished(self.sessions)
            self._reaped = time.monotonic()
        if self.pull_due is not None:
            await self.pull_due()
        ran = 0
        while (iid := await claim(self.sessions, self.name)) is not None:
            log.info("event=import_started import=%d runner=%s", iid, self.name)
            outcome = await run_import(self.sessions, iid, self.name, self.batch)
            log.info("event=import_ended import=%d outcome=%s", iid, outcome)
            ran += 1
        return ran

    async def _loop(self) -> None:
        # The first look one poll after the start, or at a wake (an upload).
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), POLL)
        self._wake.clear()
        while True:
            try:
                await self.run_once()
            except Exception as exc:
                level = logging.WARNING if is_unavailable(exc) else logging.ERROR
                _limited(level, "import_runner", "event=import_runner_failed", exc=exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), POLL)
            self._wake.clear()
