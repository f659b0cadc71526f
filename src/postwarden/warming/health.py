"""Sender health for warming: a rolling window of outcomes, a 0-100 score, and the
auto-pause rule. Pure policy; time is passed in.

Score (per source and per sending domain): bounce 35 %, complaint 35 %, delivery 15 %,
engagement 15 %. Each part is 100 at its best and falls linearly to 0 at its limit:

* bounces: 0 % → 100, at or above ``pause_bounce_rate`` (5 %) → 0;
* complaints: 0 % → 100, at or above ``pause_complaint_rate`` (0.1 %) → 0;
* delivery: 100 % → 100, at or below ``pause_delivery_rate`` (90 %) → 0;
* engagement (opens and clicks per delivered message, when tracking knows them):
  ``engagement_good`` (10 %) or more → 100, none → 0; unknown → 100 (no penalty
  before tracking exists).

Tiers: excellent ≥ 90, good ≥ 70, fair ≥ 50, poor ≥ 30, critical below. A window
past any pause threshold scores at most 65 ("fair"): the score and the pause read
the same figures and never disagree.

Auto-pause: over the window, once at least ``min_volume`` messages were attempted, a
bounce rate above 5 %, a complaint rate above 0.1 % or a delivery rate below 90 %
pauses the source or domain. A pause is sticky: only an operator resumes it.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

#: ``throttled``: deferred by an answer about pace (a refused connection or greeting,
#: a 421); counted on its own, never in ``attempted``: a provider slowing a sender
#: down says nothing of its list, and neither the score nor the pause weighs it.
KINDS = (
    "attempted",
    "delivered",
    "bounced",
    "deferred",
    "complained",
    "engaged",
    "throttled",
)

#: The highest score of a window past a pause threshold (bounces, complaints,
#: delivery): "fair" at best, so a pause never stands next to a good health.
PAST_LIMIT_SCORE = 65.0


@dataclass(frozen=True)
class Thresholds:
    pause_bounce_rate: float = 0.05
    pause_complaint_rate: float = 0.001
    pause_delivery_rate: float = 0.90
    min_volume: int = 500
    window: float = 86400.0  # seconds
    engagement_good: float = 0.10


@dataclass
class Window:
    """Outcome counts over the last ``span`` seconds, in one-minute buckets."""

    span: float = 86400.0
    bucket: float = 60.0
    _buckets: deque[tuple[float, dict[str, int]]] = field(default_factory=deque)

    def add(self, now: float, kind: str, n: int = 1) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown outcome {kind!r}")
        start = now - now % self.bucket
        if not self._buckets or self._buckets[-1][0] != start:
            self._buckets.append((start, dict.fromkeys(KINDS, 0)))
        self._buckets[-1][1][kind] += n
        self._trim(now)

    def _trim(self, now: float) -> None:
        while self._buckets and self._buckets[0][0] <= now - self.span - self.bucket:
            self._buckets.popleft()

    def totals(self, now: float) -> dict[str, int]:
        self._trim(now)
        out = dict.fromkeys(KINDS, 0)
        for start, counts in self._buckets:
            if start > now - self.span - self.bucket:
                for k, v in counts.items():
                    out[k] += v
        return out


def rates(t: dict[str, int]) -> dict[str, float | None]:
    att, dlv = t["attempted"], t["delivered"]
    return {
        "bounce": t["bounced"] / att if att else None,
        "delivery": dlv / att if att else None,
        "complaint": t["complained"] / dlv if dlv else None,
        "engagement": t["engaged"] / dlv if dlv and t["engaged"] else None,
    }


def _falling(value: float, limit: float) -> float:
    """100 at 0, 0 at ``limit`` and beyond."""
    return max(0.0, 100.0 * (1 - value / limit))


def score(t: dict[str, int], th: Thresholds = Thresholds()) -> float:
    """The health score, 0-100 (100 when nothing was attempted yet)."""
    r = rates(t)
    bounce = 100.0 if r["bounce"] is None else _falling(r["bounce"], th.pause_bounce_rate)
    complaint = (
        100.0 if r["complaint"] is None else _falling(r["complaint"], th.pause_complaint_rate)
    )
    if r["delivery"] is None:
        delivery = 100.0
    else:
        span = 1.0 - th.pause_delivery_rate
        delivery = max(0.0, min(100.0, 100.0 * (r["delivery"] - th.pause_delivery_rate) / span))
    engagement = (
        100.0
        if r["engagement"] is None
        else min(100.0, 100.0 * r["engagement"] / th.engagement_good)
    )
    value = 0.35 * bounce + 0.35 * complaint + 0.15 * delivery + 0.15 * engagement
    if not healthy_day(t, th):  # the figures the pause reads: past a limit is not good
        value = min(value, PAST_LIMIT_SCORE)
    return round(value, 1)


def tier(value: float) -> str:
    for name, floor in (("excellent", 90), ("good", 70), ("fair", 50), ("poor", 30)):
        if value >= floor:
            return name
    return "critical"


def pause_reason(t: dict[str, int], th: Thresholds = Thresholds()) -> str | None:
    """Why the window says pause, or None (too little volume says nothing)."""
    if t["attempted"] < th.min_volume:
        return None
    r = rates(t)
    if r["bounce"] is not None and r["bounce"] > th.pause_bounce_rate:
        return f"bounce rate {r['bounce']:.1%} above {th.pause_bounce_rate:.1%}"
    if r["complaint"] is not None and r["complaint"] > th.pause_complaint_rate:
        return f"complaint rate {r['complaint']:.2%} above {th.pause_complaint_rate:.2%}"
    if r["delivery"] is not None and r["delivery"] < th.pause_delivery_rate:
        return f"delivery rate {r['delivery']:.1%} below {th.pause_delivery_rate:.1%}"
    return None


def healthy_day(t: dict[str, int], th: Thresholds = Thresholds()) -> bool:
    """Whether a day's outcomes let a warming plan move to its next day."""
    r = rates(t)
    return not (
        (r["bounce"] is not None and r["bounce"] > th.pause_bounce_rate)
        or (r["complaint"] is not None and r["complaint"] > th.pause_complaint_rate)
        or (r["delivery"] is not None and r["delivery"] < th.pause_delivery_rate)
    )
