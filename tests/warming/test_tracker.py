"""A warming source stops at its cap, resumes the next local day, holds its day after
an unhealthy one, and a pause lasts until resumed (a driven clock)."""

from __future__ import annotations

import datetime as dt
from zoneinfo import ZoneInfo

from postwarden.warming.plans import BUILTIN, make_plan
from postwarden.warming.tracker import Tracker

BERLIN = ZoneInfo("Europe/Berlin")


def at(y: int, m: int, d: int, h: int, tz: ZoneInfo = BERLIN) -> float:
    return dt.datetime(y, m, d, h, tzinfo=tz).timestamp()


def test_cap_then_next_day() -> None:
    t = Tracker(BUILTIN["conservative"], BERLIN)
    t.rollover(at(2026, 11, 25, 9), healthy=True)
    assert t.remaining(at(2026, 11, 25, 9)) == 50
    t.record(50)
    assert t.remaining(at(2026, 11, 25, 23)) == 0
    # 23:30 UTC is already the next day in Berlin.
    t.rollover(dt.datetime(2026, 11, 25, 23, 30, tzinfo=dt.UTC).timestamp(), healthy=True)
    assert t.day == 2 and t.sent_today == 0 and t.remaining(at(2026, 11, 26, 1)) == 82


def test_unhealthy_day_holds_and_pause_is_sticky() -> None:
    t = Tracker(BUILTIN["moderate"], BERLIN)
    t.rollover(at(2026, 11, 25, 9), healthy=True)
    t.record(100)
    t.rollover(at(2026, 11, 26, 9), healthy=False)
    assert t.day == 1 and t.remaining(at(2026, 11, 26, 9)) == 100
    t.pause("bounce rate 6.0% above 5.0%")
    t.rollover(at(2026, 11, 27, 9), healthy=True)
    assert t.remaining(at(2026, 11, 27, 9)) == 0  # still paused on a new day
    t.resume()
    assert t.remaining(at(2026, 11, 27, 9)) == 205  # day 2 of moderate
    assert [h[1] for h in t.history] == [1, 1]


def test_site_fraction_caps_its_site_only() -> None:
    t = Tracker(make_plan("p", {1: 1000, 2: 2000}, {"gmail": 0.2}), BERLIN)
    t.rollover(at(2026, 11, 25, 9), healthy=True)
    t.record(200, "gmail")
    assert t.remaining(at(2026, 11, 25, 9), "gmail") == 0
    assert t.remaining(at(2026, 11, 25, 9), "yahoo") == 800
    t.rollover(at(2026, 11, 26, 9), healthy=True)
    t.rollover(at(2026, 11, 27, 9), healthy=True)
    assert t.remaining(at(2026, 11, 27, 9)) is None  # plan done: warm
