"""Figures from counts (issue 23; docs/api.md "Analytics"): rates, time to deliver,
provider deliverability and the A/B significance figure.

Every function takes counts by metric name as the rollups keep them
(``store.rollups``: ``delivered``, ``bounced_hard``, ``opened_unique``, ``ttd:60`` …)
and answers plain values. A rate whose denominator is 0 is None (nothing to say), not
0; rates are rounded to 4 decimals.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from postwarden.campaigns.abtest import decide

#: Rates: name → (numerator, denominator), metric names of the rollups.
RATES: dict[str, tuple[str, str]] = {
    "delivery_rate": ("delivered", "accepted"),
    "bounce_rate": ("bounced", "accepted"),
    "hard_bounce_rate": ("bounced_hard", "accepted"),
    "complaint_rate": ("complained", "delivered"),
    "unsubscribe_rate": ("unsubscribed", "delivered"),
    "unique_open_rate": ("opened_unique", "delivered"),
    "click_rate": ("clicked_unique", "delivered"),
    "click_to_open_rate": ("clicked_unique", "opened_unique"),
}

#: What a delivery attempt ended in, for a provider: the attempts are their sum.
ATTEMPTS = ("delivered", "deferred", "bounced", "expired")

#: The significance level of the A/B figure.
ALPHA = 0.05

DIGITS = 4


def ratio(numerator: int, denominator: int) -> float | None:
    """``numerator / denominator`` to 4 decimals; None when the denominator is 0."""
    if denominator <= 0:
        return None
    return round(numerator / denominator, DIGITS)


def rates(counts: Mapping[str, int]) -> dict[str, float | None]:
    """Every rate of :data:`RATES` (absent metrics count 0)."""
    return {
        name: ratio(counts.get(num, 0), counts.get(den, 0)) for name, (num, den) in RATES.items()
    }


def ttd_buckets(
    counts: Mapping[str, int], bounds: Sequence[float]
) -> list[tuple[float, float, int]]:
    """The time-to-deliver histogram as (lower, upper, count) in bound order: ``ttd:b``
    holds deliveries in (previous bound, b] seconds (the first from 0), ``ttd:inf``
    those above the last bound (its upper edge is infinite)."""
    out = []
    lower = 0.0
    for b in bounds:
        out.append((lower, float(b), int(counts.get(f"ttd:{b}", 0))))
        lower = float(b)
    out.append((lower, math.inf, int(counts.get("ttd:inf", 0))))
    return out


def ttd_quantile(counts: Mapping[str, int], q: float, bounds: Sequence[float]) -> float | None:
    """The ``q`` quantile (0 < q <= 1) of the time to deliver, in seconds, estimated
    from the histogram: the bucket that holds the rank ``q x total``, and inside it a
    straight line from its lower to its upper bound (deliveries assumed spread evenly
    in it, Prometheus's histogram_quantile). In the open bucket above the last bound
    the answer is that bound (all that is known: at least this long). None when
    nothing was delivered. Rounded to the millisecond."""
    if not 0 < q <= 1:
        raise ValueError(f"q must be in (0, 1], got {q}")
    buckets = ttd_buckets(counts, bounds)
    total = sum(n for *_, n in buckets)
    if total <= 0:
        return None
    rank = q * total
    seen = 0
    for lower, upper, n in buckets:
        if n > 0 and seen + n >= rank:
            if math.isinf(upper):
                return lower
            return round(lower + (upper - lower) * (rank - seen) / n, 3)
        seen += n
    return buckets[-1][0]  # not reached: the last bucket with counts holds rank = total


@dataclass(frozen=True)
class Deliverability:
    """A provider site's (or a source's, a sending domain's) delivery figures."""

    attempts: int
    delivered: int
    deferred: int
    bounced: int
    expired: int
    blocked: int
    acceptance_rate: float | None
    deferral_rate: float | None
    block_rate: float | None
    median_ttd_seconds: float | None
    p90_ttd_seconds: float | None


def deliverability(counts: Mapping[str, int], bounds: Sequence[float]) -> Deliverability:
    """Attempts are every delivery attempt's end: delivered + deferred + bounced +
    expired; the acceptance, deferral and block rates are delivered, deferred and
    blocked (a bounce of the ``BLOCKS`` categories: the sender refused, not the
    address) over attempts."""
    got = {m: int(counts.get(m, 0)) for m in (*ATTEMPTS, "blocked")}
    attempts = sum(got[m] for m in ATTEMPTS)
    return Deliverability(
        attempts=attempts,
        delivered=got["delivered"],
        deferred=got["deferred"],
        bounced=got["bounced"],
        expired=got["expired"],
        blocked=got["blocked"],
        acceptance_rate=ratio(got["delivered"], attempts),
        deferral_rate=ratio(got["deferred"], attempts),
        block_rate=ratio(got["blocked"], attempts),
        median_ttd_seconds=ttd_quantile(counts, 0.5, bounds),
        p90_ttd_seconds=ttd_quantile(counts, 0.9, bounds),
    )


# -- A/B significance -------------------------------------------------------------

#: The A/B figures: a metric of the answer → the rollups' metric counted as success.
AB_METRICS = {"unique_clicks": "clicked_unique", "unique_opens": "opened_unique"}


@dataclass(frozen=True)
class Significance:
    """The chi-squared test of independence on variants x {success, not} over their
    deliveries (``campaigns.abtest.decide``, the test the A/B decision uses):
    ``p_value`` and whether it is below :data:`ALPHA`; ``best``, the variant with the
    highest rate."""

    metric: str
    p_value: float
    significant: bool
    best: str


def _table(variants: Mapping[str, Mapping[str, int]], success: str) -> dict[str, tuple[int, int]]:
    # A success without a delivery counted (a click on mail whose delivery event is
    # not rolled up yet) would be more successes than sends: capped.
    out = {}
    for name, counts in variants.items():
        sends = int(counts.get("delivered", 0))
        out[name] = (sends, min(sends, int(counts.get(success, 0))))
    return out


def _best(table: Mapping[str, tuple[int, int]]) -> str | None:
    ranked = [(s / n, name) for name, (n, s) in table.items() if n > 0]
    return max(ranked)[1] if ranked else None


def significance(
    variants: Mapping[str, Mapping[str, int]], metric: str = "unique_clicks"
) -> Significance | None:
    """The test over every variant (with more than two, also the best against the
    runner-up, as ``decide`` does); None with fewer than two variants, or before any
    delivery."""
    success = AB_METRICS[metric]
    table = _table(variants, success)
    best = _best(table)
    if len(table) < 2 or best is None:
        return None
    v = decide(table, metric="opens" if success == "opened_unique" else "clicks",
               min_sample=1, allow_opens=True)  # fmt: skip
    return Significance(metric, v.p_value, v.p_value < ALPHA and v.significant, best)


def against_best(
    variants: Mapping[str, Mapping[str, int]], metric: str = "unique_clicks"
) -> dict[str, float | None]:
    """Each variant's p-value in a 2 x 2 test against the best variant (None for the
    best itself, and for every variant when there is no best: nothing delivered)."""
    success = AB_METRICS[metric]
    table = _table(variants, success)
    best = _best(table)
    out: dict[str, float | None] = {}
    for name in table:
        if best is None or name == best:
            out[name] = None
            continue
        pair = {best: table[best], name: table[name]}
        out[name] = decide(pair, metric="opens" if success == "opened_unique" else "clicks",
                           min_sample=1, allow_opens=True).p_value  # fmt: skip
    return out
