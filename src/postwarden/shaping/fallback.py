"""Conservative limits a worker applies on its own while the shaping broker is away.

The broker (decision 0006) is the only place that knows the appliance-wide budgets;
when a worker's connection to it drops, the worker keeps delivering, but never
unlimited: at most ``connections`` connections per (source, site) in this worker and
``rate`` messages per second per (source, site), from a source the broker chose
before when there is one. Mail of a sending domain that is warming waits for the
broker (its caps are counted there). Pure policy: the clock is passed in.
"""

from __future__ import annotations

from collections.abc import Sequence

from postwarden.shaping.buckets import Bucket
from postwarden.shaping.grants import Choice, Grant

#: Connections per (source, site) in one worker while the broker is away.
FALLBACK_CONNECTIONS = 1
#: Messages per second per (source, site) in one worker while the broker is away.
FALLBACK_RATE = 1.0
#: How soon a refused caller should ask again.
FALLBACK_RETRY = 0.25


class LocalLimits:
    def __init__(
        self, connections: int = FALLBACK_CONNECTIONS, rate: float = FALLBACK_RATE
    ) -> None:
        self.connections = connections
        self.rate = rate
        self.slots: dict[tuple[str, str], int] = {}
        self._buckets: dict[tuple[str, str], Bucket] = {}

    def _tokens(self, key: tuple[str, str], want: int, now: float) -> int:
        b = self._buckets.get(key)
        if b is None:  # a burst of one message
            b = self._buckets[key] = Bucket(self.rate, 1.0, 1.0, now)
        return b.take(now, want)

    def choose(self, candidates: Sequence[str], site: str, want: int, now: float) -> Choice:
        """A slot for the first candidate source with one free here (``candidates``
        in order of preference), with the tokens there are."""
        for source in candidates:
            key = (source, site)
            if self.slots.get(key, 0) < self.connections:
                self.slots[key] = self.slots.get(key, 0) + 1
                tokens = self._tokens(key, max(1, want), now)
                return Choice(True, source=source, tokens=tokens, metered=True)
        if not candidates:
            return Choice(
                False,
                reason="broker unavailable and no source to use",
                retry_at=now + 1.0,
                kind="broker_unavailable",
            )
        return Choice(
            False,
            reason="broker unavailable: local connection limit",
            retry_at=now + FALLBACK_RETRY,
            kind="connection_limit",
        )

    def take(self, source: str, site: str, want: int, now: float) -> Grant:
        n = self._tokens((source, site), max(1, want), now)
        if n:
            return Grant(True, tokens=n)
        wait = self._buckets[(source, site)].wait() if self.rate > 0 else 1.0
        return Grant(
            False,
            reason="broker unavailable: local message rate",
            retry_at=now + max(wait, 0.001),
            kind="message_rate",
        )

    def release(self, source: str, site: str) -> None:
        key = (source, site)
        n = self.slots.get(key, 0) - 1
        if n > 0:
            self.slots[key] = n
        else:
            self.slots.pop(key, None)
