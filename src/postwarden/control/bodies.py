"""How many bytes of request bodies a process holds at once (``control.max_body_memory``).

Four 60 MB bodies read at once took a worker from 250 MB to 900 MB. Each request
reserves its body's size (the Content-Length when given, else as chunks come) for as
long as it is handled; a reservation that would pass the budget waits a moment for
others to finish and is then refused (503 with Retry-After). One request alone is
always let in, so a body up to the per-route limit can be sent on an idle appliance.
"""

from __future__ import annotations

import asyncio
import time


class BodyBudget:
    def __init__(self, limit: int, wait: float = 2.0) -> None:
        self.limit = limit
        self.wait = wait  # seconds a reservation may wait for room
        self.in_use = 0
        self.holders = 0  # requests holding a reservation
        self._freed = asyncio.Condition()

    def _fits(self, n: int, mine: int) -> bool:
        # ``mine``: what the asking request holds already (it may be alone).
        others = self.in_use - mine
        return self.in_use + n <= self.limit or (others == 0 and self.holders <= 1)

    async def reserve(self, n: int, mine: int = 0) -> bool:
        """Add ``n`` bytes to a request's reservation (``mine`` bytes so far); False
        when there is no room within ``wait`` seconds."""
        if n <= 0:
            return True
        async with self._freed:
            deadline = time.monotonic() + self.wait
            while not self._fits(n, mine):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                try:
                    await asyncio.wait_for(self._freed.wait(), left)
                except TimeoutError:
                    return False
            if mine == 0:
                self.holders += 1
            self.in_use += n
            return True

    async def release(self, n: int) -> None:
        if n <= 0:
            return
        async with self._freed:
            self.in_use -= n
            self.holders -= 1
            self._freed.notify_all()
