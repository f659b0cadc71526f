"""The one retry policy: exponential backoff with jitter, capped, ending in expiry.

Pure functions, no I/O: the scheduler calls them with the clock and a random source.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from postwarden.config import QueueConfig


@dataclass(frozen=True)
class RetryPolicy:
    """When to try a temporarily failed recipient again, and when to give up."""

    initial: float = 300.0
    factor: float = 2.0
    maximum: float = 4 * 3600.0
    jitter: float = 0.2
    max_age: float = 5 * 86400.0

    @classmethod
    def from_config(cls, cfg: QueueConfig) -> RetryPolicy:
        return cls(
            cfg.retry_initial, cfg.retry_factor, cfg.retry_max, cfg.retry_jitter, cfg.max_age
        )

    def delay(self, attempts: int, rng: random.Random | None = None) -> float:
        """Seconds to wait after the ``attempts``-th failed attempt (``attempts`` >= 1).

        ``initial * factor**(attempts-1)``, capped at ``maximum``, then spread by
        ``±jitter`` so that a burst deferred together does not retry together.
        """
        n = max(1, attempts)
        # Cap the exponent before computing it so huge attempt counts cannot overflow.
        base = self.initial * self.factor ** min(n - 1, 64)
        base = min(base, self.maximum)
        if self.jitter:
            r = (rng or random).random()
            base *= 1.0 + self.jitter * (2.0 * r - 1.0)
        return max(base, 0.0)

    def expired(self, created_at: float, now: float) -> bool:
        """Whether a recipient accepted at ``created_at`` is past ``max_age``: counted
        from acceptance, whatever the number of attempts (none, for mail that only
        ever waited for a shaping limit or met closed connections)."""
        return now >= created_at + self.max_age

    def after_temporary_failure(
        self, attempts: int, created_at: float, now: float, rng: random.Random | None = None
    ) -> tuple[str, float]:
        """Decide ``("deferred", next_attempt)`` or ``("expired", 0.0)``.

        ``attempts`` counts the attempt that just failed. A recipient whose age has
        reached ``max_age`` expires; otherwise the next attempt is never scheduled
        past the expiry time, so the last try happens right at ``max_age``.
        """
        expires_at = created_at + self.max_age
        if self.expired(created_at, now):
            return "expired", 0.0
        return "deferred", min(now + self.delay(attempts, rng), expires_at)
