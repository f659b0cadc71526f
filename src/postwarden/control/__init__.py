"""The control plane: HTTP API, auth, tenants' data (docs/decisions/0005)."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any


class ControlPlaneError(RuntimeError):
    """The control plane cannot start (database not migrated, unreadable key…)."""


async def stop_task(task: asyncio.Task[Any] | None) -> None:
    """Cancel one of the control plane's background loops and wait until it has ended
    (what it raised on the way out was its own to log)."""
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
