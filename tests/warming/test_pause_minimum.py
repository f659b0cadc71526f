"""The auto-pause on a warming sender's early days (issue 17, item 7): the minimum
volume scales with the day's cap, and small counts pause only when they are plain
(a one-sided binomial test), not on a clean list's noise."""

from __future__ import annotations

import math

from postwarden.warming.book import WarmingBook, plan_from
from postwarden.warming.health import Thresholds, binomial_tail, min_volume, pause_reason
from tests.warming.test_health import counts


def test_the_minimum_follows_the_days_cap_within_floor_and_setting() -> None:
    th = Thresholds()  # min_volume 500, share 40 %, floor 20
    assert min_volume(th) == 500  # not warming: the setting
    assert min_volume(th, 50) == 20  # conservative day 1: 40 % of 50
    assert min_volume(th, 30) == 20  # the floor
    assert min_volume(th, 224) == 90  # conservative day 4
    assert min_volume(th, 100_000) == 500  # never above the setting
    assert min_volume(Thresholds(min_volume=10), 50) == 10


def test_binomial_tail_against_the_sum_by_hand() -> None:
    n, p = 40, 0.05
    by_hand = sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(3, n + 1))
    assert math.isclose(binomial_tail(3, n, p), by_hand, rel_tol=1e-9)
    assert binomial_tail(0, 5, 0.5) == 1.0 and binomial_tail(6, 5, 0.5) == 0.0
    assert binomial_tail(1, 5, 0.0) == 0.0
    assert 0 < binomial_tail(2500, 5000, 0.4) < 1e-30  # large counts do not overflow


def test_small_counts_pause_only_when_plain() -> None:
    th = Thresholds()
    assert pause_reason(counts(40, 28, bounced=12), th) is None  # not warming: too few
    assert "bounce rate 30.0%" in (pause_reason(counts(40, 28, bounced=12), th, cap=50) or "")
    # 3 of 40 (7.5 %): over the limit, but a 5 % list gives as many one time in three.
    assert pause_reason(counts(40, 37, bounced=3), th, cap=50) is None
    assert pause_reason(counts(19, 10, bounced=9), th, cap=50) is None  # under the floor
    # Complaints count per delivered message: 2 of 40 at a limit of 0.1 % are plain.
    assert pause_reason(counts(40, 40, complained=1), th, cap=50) is None
    assert "complaint" in (pause_reason(counts(40, 40, complained=2), th, cap=50) or "")
    assert "delivery rate 70.0%" in (pause_reason(counts(40, 28), th, cap=50) or "")
    # From the setting's volume on, the rate alone decides, as before.
    assert "bounce rate 6.0%" in (pause_reason(counts(1000, 940, bounced=60), th, cap=50) or "")


def test_a_conservative_day_1_auto_pauses_on_a_bad_list() -> None:
    wall = 1_772_442_000.0  # a fixed moment (09:00 UTC: no rollover)
    book = WarmingBook("UTC", Thresholds(), wall=lambda: wall)  # pause_min_volume 500
    book.start("source:ip3", plan_from("conservative"))
    assert book.progress("source:ip3")["cap"] == 50
    # 40 messages of the day's 50, 30 % bounced: paused (with 500 needed, never).
    for i in range(40):
        bounced = int(i % 10 < 3)
        book.outcomes("source:ip3", {"attempted": 1, "bounced": bounced, "delivered": 1 - bounced})
    why = book.is_paused("source:ip3")
    assert why.startswith("auto: bounce rate") and book.remaining("source:ip3") == 0
    # A clean list on the same day: not paused by one or two bounces.
    book.start("source:ip4", plan_from("conservative"))
    book.outcomes("source:ip4", {"attempted": 40, "bounced": 2, "delivered": 38})
    assert not book.is_paused("source:ip4")
