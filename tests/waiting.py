"""Waiting on a condition instead of sleeping a fixed time.

A fixed sleep either wastes time (the change feed caught up long ago) or is too short
on a loaded machine (a flaky failure). ``eventually`` polls the condition that the
sleep stood in for and fails, saying what it waited for and what it last saw, only
when the condition is still false after ``timeout`` seconds: a generous bound that a
passing run never comes near.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


async def eventually(
    condition: Callable[[], T | Awaitable[T]],
    timeout: float = 10.0,
    what: str = "the condition",
    *,
    interval: float = 0.02,
) -> T:
    """Call ``condition`` (sync or async) until it returns something truthy; return that.

    On timeout raise ``AssertionError`` naming ``what`` and the last value returned."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value  # type: ignore[return-value]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}: {value!r}")
        await asyncio.sleep(interval)
