"""Health: the rolling window, the weighted score and its tiers, and auto-pause only
with enough volume."""

from __future__ import annotations

import pytest

from postwarden.warming.health import Window, healthy_day, pause_reason, score, tier


def counts(
    attempted: int, delivered: int, bounced: int = 0, complained: int = 0, engaged: int = 0
) -> dict[str, int]:
    return {
        "attempted": attempted,
        "delivered": delivered,
        "bounced": bounced,
        "deferred": attempted - delivered - bounced,
        "complained": complained,
        "engaged": engaged,
    }


def test_score_weights_and_tiers() -> None:
    assert score(counts(0, 0)) == 100.0 and tier(100.0) == "excellent"
    assert score(counts(1000, 1000)) == 100.0
    # 2.5 % bounces: half the bounce part (35 % weight) -> 82.5; delivery 97.5 %: 75 of 15 %.
    assert score(counts(1000, 975, bounced=25)) == pytest.approx(
        0.35 * 50 + 35 + 0.15 * 75 + 15, abs=0.05
    )
    # Complaints at the pause rate take the whole complaint part.
    assert score(counts(1000, 1000, complained=1)) == pytest.approx(65.0)
    # Engagement known and half the good rate: half its part.
    assert score(counts(1000, 1000, engaged=50)) == pytest.approx(92.5)
    assert [tier(v) for v in (95, 75, 55, 35, 10)] == [
        "excellent",
        "good",
        "fair",
        "poor",
        "critical",
    ]


def test_pause_needs_volume_and_names_the_reason() -> None:
    assert pause_reason(counts(100, 80, bounced=20)) is None  # too little to judge
    assert "bounce rate 6.0%" in pause_reason(counts(1000, 940, bounced=60))  # type: ignore[operator]
    assert "complaint" in pause_reason(counts(1000, 1000, complained=2))  # type: ignore[operator]
    assert "delivery rate 85.0%" in pause_reason(counts(1000, 850))  # type: ignore[operator]
    assert pause_reason(counts(1000, 990, bounced=10)) is None
    assert healthy_day(counts(50, 50)) and not healthy_day(counts(50, 40, bounced=10))


def test_window_rolls() -> None:
    w = Window(span=3600)
    w.add(0, "attempted", 10)
    w.add(0, "delivered", 10)
    w.add(1800, "attempted", 5)
    assert w.totals(1800)["attempted"] == 15
    assert w.totals(3700)["attempted"] == 5  # the first minute left the hour
    assert w.totals(9000)["attempted"] == 0
    with pytest.raises(ValueError):
        w.add(0, "opened")


def test_a_pause_never_stands_next_to_a_good_health() -> None:
    # Delivery at 85 %: past its limit (the pause's reason) -> at most "fair", though
    # bounces and complaints are clean (the weights alone would say 85, "good").
    t = counts(1000, 850)
    assert pause_reason(t) is not None
    assert score(t) <= 65.0 and tier(score(t)) == "fair"
    # Throttling (deferred by answers about pace) is not in "attempted": no effect.
    assert score({**counts(100, 100), "throttled": 900}) == 100.0
