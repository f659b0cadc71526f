"""Figures from the rollups' counts (analytics.figures): rates, time to deliver,
provider deliverability and the A/B significance figure."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from postwarden.analytics.figures import (
    against_best,
    deliverability,
    rates,
    ratio,
    significance,
    ttd_buckets,
    ttd_quantile,
)
from postwarden.store.rollups import TTD_BOUNDS, ttd_metric


def test_ratio_is_none_without_a_denominator_and_has_four_decimals() -> None:
    assert ratio(1, 3) == 0.3333
    assert ratio(2, 3) == 0.6667
    assert ratio(0, 5) == 0.0
    assert ratio(5, 0) is None


def test_rates_from_counts() -> None:
    counts = {"accepted": 200, "delivered": 180, "bounced": 12, "bounced_hard": 8,
              "complained": 1, "unsubscribed": 3, "opened_unique": 90, "clicked_unique": 27,
              "opened": 400}  # fmt: skip
    assert rates(counts) == {
        "delivery_rate": 0.9,
        "bounce_rate": 0.06,
        "hard_bounce_rate": 0.04,
        "complaint_rate": 0.0056,
        "unsubscribe_rate": 0.0167,
        "unique_open_rate": 0.5,
        "click_rate": 0.15,
        "click_to_open_rate": 0.3,
    }
    # Nothing accepted, nothing delivered: no rate at all, not a rate of 0.
    assert set(rates({}).values()) == {None}
    assert rates({"accepted": 4})["delivery_rate"] == 0.0
    assert rates({"delivered": 4})["click_to_open_rate"] is None


def test_time_to_deliver_interpolates_inside_its_bucket() -> None:
    # Two deliveries in (30, 60]: the median is half way, the p90 at 90 % of it.
    assert ttd_quantile({"ttd:60": 2}, 0.5, TTD_BOUNDS) == 45.0
    assert ttd_quantile({"ttd:60": 2}, 0.9, TTD_BOUNDS) == 57.0
    counts = {"ttd:1": 1, "ttd:5": 1, "ttd:10": 2}
    assert ttd_quantile(counts, 0.5, TTD_BOUNDS) == 5.0  # the 2nd of 4: top of (1, 5]
    assert ttd_quantile(counts, 0.9, TTD_BOUNDS) == 9.0  # 3.6th: 80 % into (5, 10]
    assert ttd_quantile({"ttd:1": 4}, 0.5, TTD_BOUNDS) == 0.5  # the first from 0
    # Above the last bound: all that is known is "at least a day".
    assert ttd_quantile({"ttd:inf": 3}, 0.5, TTD_BOUNDS) == 86400
    assert ttd_quantile({"ttd:60": 1, "ttd:inf": 9}, 0.9, TTD_BOUNDS) == 86400
    assert ttd_quantile({}, 0.5, TTD_BOUNDS) is None
    with pytest.raises(ValueError):
        ttd_quantile({"ttd:1": 1}, 0, TTD_BOUNDS)


@given(
    st.lists(st.floats(min_value=0, max_value=200_000, allow_nan=False), min_size=1,
             max_size=60),
    st.sampled_from([0.5, 0.9, 0.99]),
)  # fmt: skip
def test_the_quantile_estimate_lies_within_the_bucket_of_the_true_one(
    seconds: list[float], q: float
) -> None:
    counts: dict[str, int] = {}
    for s in seconds:
        counts[ttd_metric(s)] = counts.get(ttd_metric(s), 0) + 1
    got = ttd_quantile(counts, q, TTD_BOUNDS)
    assert got is not None
    # The rank-th smallest time (the rank the estimate looks for) and its bucket.
    true = sorted(seconds)[max(0, math.ceil(q * len(seconds)) - 1)]
    lower, upper = _edges(ttd_metric(true))
    assert lower <= got <= (upper if upper != math.inf else lower)


def _edges(metric: str) -> tuple[float, float]:
    edges = {f"ttd:{up:g}": (low, up) for low, up, _ in ttd_buckets({}, TTD_BOUNDS)}
    edges["ttd:inf"] = (float(TTD_BOUNDS[-1]), math.inf)
    return edges[metric]


def test_provider_deliverability() -> None:
    d = deliverability({"delivered": 90, "deferred": 6, "bounced": 3, "expired": 1,
                        "blocked": 2, "ttd:5": 45, "ttd:10": 45}, TTD_BOUNDS)  # fmt: skip
    assert (d.attempts, d.delivered, d.deferred, d.bounced, d.expired, d.blocked) == (
        100, 90, 6, 3, 1, 2)  # fmt: skip
    assert (d.acceptance_rate, d.deferral_rate, d.block_rate) == (0.9, 0.06, 0.02)
    assert d.median_ttd_seconds == 5.0
    assert d.p90_ttd_seconds == 9.0  # rank 81: 36 of 45 into (5, 10]
    none = deliverability({}, TTD_BOUNDS)
    assert none.attempts == 0 and none.acceptance_rate is None and none.median_ttd_seconds is None


def test_ab_significance_is_the_chi_squared_test_of_the_ab_decision() -> None:
    variants = {"a": {"delivered": 1000, "clicked_unique": 100, "opened_unique": 400},
                "b": {"delivered": 1000, "clicked_unique": 150, "opened_unique": 420}}  # fmt: skip
    s = significance(variants)
    assert s is not None
    # scipy.stats.chi2_contingency([[100, 900], [150, 850]]) (Yates's correction)
    assert (s.metric, s.best, s.significant) == ("unique_clicks", "b", True)
    assert s.p_value == pytest.approx(0.0009229943590897624, rel=1e-12)
    opens = significance(variants, "unique_opens")
    assert opens is not None and opens.best == "b" and not opens.significant
    assert opens.p_value == pytest.approx(0.3876896054051314, rel=1e-12)
    assert against_best(variants) == {"a": pytest.approx(0.0009229943590897624), "b": None}


def test_ab_significance_with_three_variants_needs_the_best_to_beat_the_runner_up() -> None:
    variants = {name: {"delivered": 1000, "clicked_unique": c}
                for name, c in (("a", 100), ("b", 150), ("c", 120))}  # fmt: skip
    s = significance(variants)
    assert s is not None and s.best == "b"
    # Overall p 0.0029 < 0.05, but b against c (the runner-up) gives p 0.058.
    assert s.p_value == pytest.approx(0.00285818464494882, rel=1e-12)
    assert not s.significant
    p = against_best(variants)
    assert p["b"] is None
    assert p["c"] == pytest.approx(0.057746841509689, rel=1e-12)
    assert p["a"] == pytest.approx(0.0009229943590897624, rel=1e-12)


def test_no_significance_without_two_variants_or_deliveries() -> None:
    assert significance({}) is None
    assert significance({"a": {"delivered": 10, "clicked_unique": 1}}) is None
    assert significance({"a": {}, "b": {}}) is None
    assert against_best({"a": {}, "b": {}}) == {"a": None, "b": None}
    # More unique clicks than deliveries counted yet: capped, not an error.
    s = significance({"a": {"delivered": 2, "clicked_unique": 5}, "b": {"delivered": 2}})
    assert s is not None and s.best == "a"
    assert s.p_value == pytest.approx(0.31731050786291115, rel=1e-12)  # [[2, 0], [0, 2]]
