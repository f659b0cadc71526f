"""Pools: each source's recent share of a pool's mail per site (:class:`Balancer`).
Whether a source address is fit to send from (``postwarden sources check``) is a DNS
question: :mod:`postwarden.dns.sources`.

Which source of a pool a connection leaves from is the shaping broker's choice
(:meth:`postwarden.shaping.broker.Broker.choose`): the one furthest behind its
weighted share, as the balancer counts it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

# ---------------------------------------------------------------------- balancing

#: Seconds after which a message counts half as much in a source's share (2 minutes:
#: the last few minutes of mail to a site decide; what was sent an hour ago does not).
HALF_LIFE = 120.0
_FORGET = 1e-3
#: How far (relative) a source may run ahead of its weighted share while a source
#: behind it waits for a free slot.
TOLERANCE = 0.05  # a decayed count below this, with no connection open, is dropped


@dataclass
class _Count:
    value: float = 0.0  # messages, decayed to ``stamp``
    stamp: float = 0.0
    open: int = 0  # connections open now


@dataclass
class Balancer:
    """Each source's share of a pool's mail to one provider site, over a decaying
    window. Pure; the clock is passed in.

    Counts are kept per (pool, site, source) and halve every ``half_life`` seconds, so
    what a source carried to one site does not hold it back at another, and a source
    back from a suspension catches up on a few minutes' deficit, not a day's. The
    broker gives a connection to the source whose :meth:`behind` is lowest: the
    messages it sent lately plus those its open connections are expected to carry,
    per unit of weight (decay scales every source of a site alike, so only the order
    of recent and older mail changes the choice, never the weights)."""

    half_life: float = HALF_LIFE
    counts: dict[tuple[str, str, str], _Count] = field(default_factory=dict)
    per_conn: dict[tuple[str, str], float] = field(default_factory=dict)  # running mean
    _ops: int = 0

    def _decayed(self, c: _Count, now: float) -> float:
        if now <= c.stamp or not c.value:
            return c.value
        return c.value * math.exp2(-(now - c.stamp) / self.half_life)

    def _get(self, pool: str, site: str, source: str, now: float) -> _Count:
        c = self.counts.get((pool, site, source))
        if c is None:
            c = self.counts[(pool, site, source)] = _Count(stamp=now)
        else:
            c.value, c.stamp = self._decayed(c, now), max(now, c.stamp)
        return c

    def sent(self, pool: str, site: str, source: str, now: float) -> float:
        """Messages ``source`` carried for ``pool`` to ``site`` lately (decayed)."""
        c = self.counts.get((pool, site, source))
        return 0.0 if c is None else self._decayed(c, now)

    def behind(self, pool: str, site: str, source: str, weight: int, now: float) -> float:
        """Recent messages plus what open connections will carry, per unit of weight:
        the lowest is furthest behind its share."""
        c = self.counts.get((pool, site, source))
        if c is None:
            return 0.0
        est = self.per_conn.get((pool, site), 1.0)
        return (self._decayed(c, now) + c.open * est) / max(weight, 1)

    def within(
        self, pool: str, site: str, source: str, weight: int, lead: float, now: float
    ) -> bool:
        """Whether ``source`` may open one more connection while a source behind it
        (its :meth:`behind` is ``lead``) waits for a slot: only while it is not ahead
        of that one by more than ``TOLERANCE`` (and a connection's worth, so that an
        empty count does not stall), which keeps the pool's weights when connection
        limits bind."""
        est = self.per_conn.get((pool, site), 1.0)
        return self.behind(pool, site, source, weight, now) <= lead * (1 + TOLERANCE) + est / max(
            weight, 1
        )

    def add(self, pool: str, site: str, source: str, n: float, now: float) -> None:
        """Count ``n`` messages for ``source`` (sent, or its share kept waiting)."""
        self._get(pool, site, source, now).value += n

    def opened(self, pool: str, site: str, source: str, now: float) -> None:
        self._get(pool, site, source, now).open += 1

    def closed(self, pool: str, site: str, source: str, sent: int, now: float) -> None:
        """A connection ended after ``sent`` messages."""
        c = self._get(pool, site, source, now)
        c.open = max(0, c.open - 1)
        c.value += sent
        k = (pool, site)
        self.per_conn[k] = 0.9 * self.per_conn.get(k, 1.0) + 0.1 * max(1, sent)
        self._ops += 1
        if self._ops % 1000 == 0:
            self.prune(now)

    def prune(self, now: float) -> None:
        """Forget what has decayed to nothing (sites mail went to long ago)."""
        for k, c in list(self.counts.items()):
            if not c.open and self._decayed(c, now) < _FORGET:
                del self.counts[k]
        live = {(p, s) for p, s, _src in self.counts}
        for ps in [ps for ps in self.per_conn if ps not in live]:
            del self.per_conn[ps]
