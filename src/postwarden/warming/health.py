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

A warming sender's early days hold far fewer than ``min_volume`` attempts (50 on day
1 of the conservative plan), and that is when list problems show. So for a sender on
a plan the minimum is scaled to the day's cap: ``min_volume_share`` (40 %) of it, at
least ``min_volume_floor`` (20), never more than ``min_volume``. Below ``min_volume``
a rate over its limit pauses only when the counts make it plain: a one-sided
binomial test, the chance of seeing that many bounces (complaints, undelivered) if
the true rate were at the limit, under ``small_count_alpha`` (1 %). So 12 bounces of
40 pause on day 1; 3 of 40 (7.5 %, as likely as not from a clean list's noise) do
not.
"""

from __future__ import annotations

import math
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
    # A warming sender's minimum: this share of the day's cap, at least the floor
    # (never above min_volume); below min_volume, the binomial test's level.
    min_volume_share: float = 0.4
    min_volume_floor: int = 20
    small_count_alpha: float = 0.01
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


def min_volume(th: Thresholds, cap: int | None = None) -> int:
    """Attempts in the window before the auto-pause judges: ``th.min_volume``, or for
    a sender on a warming day with ``cap``, that cap's share (at least the floor)."""
    if cap is None:
        return th.min_volume
    return min(th.min_volume, max(th.min_volume_floor, math.ceil(th.min_volume_share * cap)))


def binomial_tail(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p): how likely ``k`` or more of ``n`` are, at
    rate ``p``."""
    if k <= 0:
        return 1.0
    if k > n or p <= 0.0:
        return 0.0
    if p >= 1.0:
        return 1.0
    lp, lq, ln = math.log(p), math.log1p(-p), math.lgamma(n + 1)
    total = sum(
        math.exp(ln - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * lp + (n - i) * lq)
        for i in range(k, n + 1)
    )
    return min(1.0, total)


def pause_reason(
    t: dict[str, int], th: Thresholds = Thresholds(), cap: int | None = None
) -> str | None:
    """Why the window says pause, or None (too little volume says nothing). ``cap``:
    the sender's warming cap today (None when not warming), which scales the minimum
    volume (:func:`min_volume`); under ``th.min_volume`` a rate over its limit must
    also pass a one-sided binomial test (:func:`binomial_tail`)."""
    att = t["attempted"]
    if att < min_volume(th, cap):
        return None
    small = att < th.min_volume
    r = rates(t)

    def plain(share: float, limit: float, n: int) -> bool:
        """Not the noise of small counts: a rate at the limit seldom gives as many."""
        return not small or binomial_tail(round(share * n), n, limit) <= th.small_count_alpha

    b, c, d = r["bounce"], r["complaint"], r["delivery"]
    if b is not None and b > th.pause_bounce_rate and plain(b, th.pause_bounce_rate, att):
        return f"bounce rate {b:.1%} above {th.pause_bounce_rate:.1%}"
    if (
        c is not None
        and c > th.pause_complaint_rate
        and plain(c, th.pause_complaint_rate, t["delivered"])
    ):
        return f"complaint rate {c:.2%} above {th.pause_complaint_rate:.2%}"
    if (
        d is not None
        and d < th.pause_delivery_rate
        and plain(1 - d, 1 - th.pause_delivery_rate, att)
    ):
        return f"delivery rate {d:.1%} below {th.pause_delivery_rate:.1%}"
    return None


def healthy_day(t: dict[str, int], th: Thresholds = Thresholds()) -> bool:
    """Whether a day's outcomes let a warming plan move to its next day."""
    r = rates(t)
    return not (
        (r["bounce"] is not None and r["bounce"] > th.pause_bounce_rate)
        or (r["complaint"] is not None and r["complaint"] > th.pause_complaint_rate)
        or (r["delivery"] is not None and r["delivery"] < th.pause_delivery_rate)
    )
