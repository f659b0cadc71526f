"""Token buckets: the broker's message and connection rates, and the fallback limits
a worker keeps while the broker is away. Pure: the clock is passed in."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class Bucket:
    """A token bucket: ``rate`` per second, holding at most ``burst``."""

    rate: float
    burst: float
    tokens: float
    stamp: float

    def refill(self, now: float) -> None:
        # ``now`` may be older than the stamp (read before the bucket was made): no
        # time has passed then, and none is taken back.
        if now > self.stamp:
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now

    def take(self, now: float, want: int) -> int:
        self.refill(now)
        n = min(want, int(self.tokens))
        self.tokens -= n
        return n

    def wait(self) -> float:
        """Seconds until one token is there."""
        return max(0.0, (1.0 - self.tokens) / self.rate)


@dataclass
class PacedBucket(Bucket):
    """A pair's message bucket: its wait ends by ``ready_at`` at the latest (when a
    backoff ends and the full rate is back), so a refusal's ``retry_at`` is honest."""

    ready_at: float = math.inf

    def wait(self) -> float:
        return min(super().wait(), max(0.0, self.ready_at - self.stamp))
