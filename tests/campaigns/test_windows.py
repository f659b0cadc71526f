"""Send windows (edges, wrapping, DST in Berlin and New York, recipient zones, refused
input) and the dry run's finish-time prediction, against hand-computed figures."""

from __future__ import annotations

import datetime as dt
from zoneinfo import ZoneInfo

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from postwarden.campaigns.windows import (
    SendWindow,
    SourceLimit,
    WindowError,
    allowed,
    next_open,
    parse_window,
    predict_finish,
    resolve_zone,
    split_evenly,
)
from postwarden.warming.plans import make_plan


def utc(*args: int) -> dt.datetime:
    return dt.datetime(*args, tzinfo=dt.UTC)  # type: ignore[misc]


US = dt.timedelta(microseconds=1)


def window(start: str, end: str, tz: str = "Europe/Berlin", days: object = None) -> SendWindow:
    data: dict[str, object] = {"start": start, "end": end, "timezone": tz}
    if days is not None:
        data["days"] = days
    return parse_window(data)


WORKDAYS = ["mon", "tue", "wed", "thu", "fri"]


# --- The JSON form --------------------------------------------------------------------


def test_days_as_names_numbers_or_full_names_and_every_day_by_default() -> None:
    a = window("09:00", "17:00", days=["Mon", 2, "wednesday", "THU", 5, "fri"])
    assert a.days == frozenset({1, 2, 3, 4, 5})
    assert a.to_json() == {
        "days": WORKDAYS,
        "start": "09:00",
        "end": "17:00",
        "timezone": "Europe/Berlin",
    }
    assert parse_window(a.to_json()) == a
    every = window("22:00", "06:00")
    assert every.days == frozenset(range(1, 8)) and every.wraps
    assert window("00:00", "24:00").to_json()["end"] == "24:00"


OK = {"start": "09:00", "end": "17:00", "timezone": "UTC"}


@pytest.mark.parametrize(
    ("data", "path", "reason"),
    [
        ([], "send_window", "must be an object"),
        ({"start": "09:00", "end": "17:00"}, "send_window.timezone", "required"),
        ({"end": "17:00", "timezone": "UTC"}, "send_window.start", "required"),
        ({**OK, "tz": 1}, "send_window.tz", "unknown field"),
        ({**OK, "days": []}, "send_window.days", "non-empty"),
        ({**OK, "days": "mon"}, "send_window.days", "list"),
        ({**OK, "days": ["mon", "funday"]}, "send_window.days[1]", "'funday' is not a day"),
        ({**OK, "days": [0]}, "send_window.days[0]", "not a day"),
        ({**OK, "days": [8]}, "send_window.days[0]", "not a day"),
        ({**OK, "days": [True]}, "send_window.days[0]", "not a day"),
        ({**OK, "start": "9:00"}, "send_window.start", "HH:MM"),
        ({**OK, "start": "24:00"}, "send_window.start", "to 23:59"),
        ({**OK, "start": "12:60"}, "send_window.start", "HH:MM"),
        ({**OK, "start": "\u0660\u0669:\u0660\u0660"}, "send_window.start", "HH:MM"),
        ({**OK, "start": 900}, "send_window.start", "HH:MM"),
        ({**OK, "end": "24:01"}, "send_window.end", "to 24:00"),
        ({**OK, "end": "09:00"}, "send_window.end", "equals start"),
        ({**OK, "timezone": "Mars/Olympus"}, "send_window.timezone", "IANA"),
        ({**OK, "timezone": "Europe"}, "send_window.timezone", "IANA"),
        ({**OK, "timezone": "/etc/localtime"}, "send_window.timezone", "IANA"),
        ({**OK, "timezone": 1}, "send_window.timezone", "IANA"),
    ],
)
def test_refused_windows_name_the_field_and_the_reason(
    data: object, path: str, reason: str
) -> None:
    with pytest.raises(WindowError) as caught:
        parse_window(data)
    assert caught.value.path == path
    assert reason in caught.value.reason
    assert str(caught.value).startswith(f"{path}: ")


def test_the_field_path_follows_the_caller() -> None:
    with pytest.raises(WindowError) as caught:
        parse_window({**OK, "start": "x"}, "campaign.send_window")
    assert caught.value.path == "campaign.send_window.start"


def test_instants_must_be_timezone_aware() -> None:
    w = window("09:00", "17:00")
    with pytest.raises(ValueError, match="timezone-aware"):
        allowed(w, dt.datetime(2026, 1, 5, 9))
    with pytest.raises(ValueError, match="timezone-aware"):
        next_open(w, dt.datetime(2026, 1, 5, 9))


# --- Edges and wrapping ------------------------------------------------------------------


def test_edges_are_exact_half_open() -> None:
    w = window("09:00", "17:00", days=WORKDAYS)  # Berlin in January: UTC+1
    mon_open, mon_close = utc(2026, 1, 5, 8), utc(2026, 1, 5, 16)
    assert allowed(w, mon_open) and allowed(w, mon_close - US)
    assert not allowed(w, mon_open - US) and not allowed(w, mon_close)
    assert next_open(w, mon_open) == mon_open
    assert next_open(w, mon_open - US) == mon_open
    assert next_open(w, utc(2026, 1, 5, 12, 34, 56)) == utc(2026, 1, 5, 12, 34, 56)
    assert next_open(w, mon_close) == utc(2026, 1, 6, 8)
    # Friday evening: the weekend is skipped.
    assert next_open(w, utc(2026, 1, 9, 16)) == utc(2026, 1, 12, 8)
    # An aware instant in another zone means the same instant.
    tokyo = dt.timezone(dt.timedelta(hours=9))
    assert next_open(w, dt.datetime(2026, 1, 5, 17, tzinfo=tokyo)) == mon_open


def test_a_window_ending_before_it_starts_wraps_past_midnight_from_its_day() -> None:
    w = window("22:00", "06:00", days=["fri"])  # Friday 22:00 to Saturday 06:00
    assert allowed(w, utc(2026, 1, 9, 21)) and allowed(w, utc(2026, 1, 10, 5) - US)
    assert not allowed(w, utc(2026, 1, 10, 5))
    assert not allowed(w, utc(2026, 1, 10, 21, 30))  # Saturday evening: not a window day
    assert not allowed(w, utc(2026, 1, 9, 2))  # Friday early: Thursday's window, not one
    assert next_open(w, utc(2026, 1, 10, 5)) == utc(2026, 1, 16, 21)
    assert next_open(w, utc(2026, 1, 10, 1)) == utc(2026, 1, 10, 1)


def test_whole_days_with_24_00() -> None:
    always = window("00:00", "24:00")
    assert all(allowed(always, utc(2026, 3, 29, h, 59)) for h in range(24))
    weekend = window("00:00", "24:00", days=["sat", "sun"])
    assert next_open(weekend, utc(2026, 1, 5, 10)) == utc(2026, 1, 9, 23)  # Sat 00:00 CET
    assert allowed(weekend, utc(2026, 1, 11, 23) - US) and not allowed(
        weekend, utc(2026, 1, 11, 23)
    )


# --- DST --------------------------------------------------------------------------------


def test_berlin_spring_forward_opens_after_the_gap() -> None:
    # 2026-03-29: 02:00 CET becomes 03:00 CEST at 01:00 UTC.
    w = window("02:30", "04:00")
    assert next_open(w, utc(2026, 3, 28, 3)) == utc(2026, 3, 29, 1)  # 03:00 CEST
    assert not allowed(w, utc(2026, 3, 29, 1) - US) and allowed(w, utc(2026, 3, 29, 1))
    assert not allowed(w, utc(2026, 3, 29, 2))  # 04:00 CEST
    assert next_open(w, utc(2026, 3, 27, 3)) == utc(2026, 3, 28, 1, 30)  # 02:30 CET
    # A window the gap swallows whole does not open that day.
    swallowed = window("02:00", "02:30", days=["sun"])
    assert next_open(swallowed, utc(2026, 3, 28)) == utc(2026, 4, 5, 0)  # 02:00 CEST
    # An end in the gap closes at the gap: 01:00 CET to 03:00 CEST is one hour.
    into = window("01:00", "02:30")
    assert allowed(into, utc(2026, 3, 29, 1) - US) and not allowed(into, utc(2026, 3, 29, 1))
    assert next_open(into, utc(2026, 3, 29, 1)) == utc(2026, 3, 29, 23)


def test_berlin_fall_back_counts_the_repeated_hour_once() -> None:
    # 2026-10-25: 03:00 CEST becomes 02:00 CET at 01:00 UTC; 02:xx happens twice.
    w = window("02:00", "02:30")
    assert next_open(w, utc(2026, 10, 24, 23)) == utc(2026, 10, 25, 0)  # first 02:00
    assert allowed(w, utc(2026, 10, 25, 0, 29)) and not allowed(w, utc(2026, 10, 25, 0, 30))
    assert not allowed(w, utc(2026, 10, 25, 1, 10))  # 02:10 again, CET: not a second time
    assert next_open(w, utc(2026, 10, 25, 0, 30)) == utc(2026, 10, 26, 1)  # 02:00 CET
    # A span over the change lasts what the clock says plus the repeated hour.
    night = window("22:00", "06:00", days=["sat"])
    assert next_open(night, utc(2026, 10, 24, 12)) == utc(2026, 10, 24, 20)  # 22:00 CEST
    assert allowed(night, utc(2026, 10, 25, 5) - US) and not allowed(night, utc(2026, 10, 25, 5))


def test_new_york_spring_forward_and_fall_back() -> None:
    ny = "America/New_York"
    # 2026-03-08: 02:00 EST becomes 03:00 EDT at 07:00 UTC.
    swallowed = window("02:15", "03:00", ny)
    assert next_open(swallowed, utc(2026, 3, 8, 5)) == utc(2026, 3, 9, 6, 15)  # 02:15 EDT
    office = window("09:00", "17:00", ny, WORKDAYS)
    assert next_open(office, utc(2026, 3, 6, 22)) == utc(2026, 3, 9, 13)  # Monday, EDT
    assert next_open(office, utc(2026, 3, 5, 22)) == utc(2026, 3, 6, 14)  # Friday, EST
    straddle = window("01:30", "04:00", ny)
    assert next_open(straddle, utc(2026, 3, 8, 5)) == utc(2026, 3, 8, 6, 30)  # 01:30 EST
    assert allowed(straddle, utc(2026, 3, 8, 8) - US) and not allowed(straddle, utc(2026, 3, 8, 8))
    # 2026-11-01: 02:00 EDT becomes 01:00 EST at 06:00 UTC.
    w = window("01:00", "01:30", ny)
    assert next_open(w, utc(2026, 11, 1, 4)) == utc(2026, 11, 1, 5)  # first 01:00, EDT
    assert allowed(w, utc(2026, 11, 1, 5, 29)) and not allowed(w, utc(2026, 11, 1, 6, 10))
    assert next_open(w, utc(2026, 11, 1, 5, 30)) == utc(2026, 11, 2, 6)  # 01:00 EST


# --- Recipient zones --------------------------------------------------------------------


def test_a_recipient_in_tokyo_reads_the_berlin_campaigns_window_in_tokyo() -> None:
    w = window("09:00", "17:00", days=WORKDAYS)
    monday_10_tokyo = utc(2026, 1, 5, 1)  # 02:00 in Berlin
    assert allowed(w, monday_10_tokyo, "Asia/Tokyo")
    assert not allowed(w, monday_10_tokyo, None)
    assert next_open(w, monday_10_tokyo, None) == utc(2026, 1, 5, 8)
    # 18:00 on Monday in Tokyo is 10:00 in Berlin.
    assert next_open(w, utc(2026, 1, 5, 9), "Asia/Tokyo") == utc(2026, 1, 6, 0)
    assert next_open(w, utc(2026, 1, 5, 9), None) == utc(2026, 1, 5, 9)
    # Friday 17:00 in Tokyo: Monday 09:00 JST.
    assert next_open(w, utc(2026, 1, 9, 8), "Asia/Tokyo") == utc(2026, 1, 12, 0)


@pytest.mark.parametrize("bad", ["Mars/Olympus", "Europe", "../../etc/passwd", "Asia/Tokyo "])
def test_an_unknown_recipient_zone_falls_back_to_the_campaigns(bad: str) -> None:
    w = window("09:00", "17:00", days=WORKDAYS)
    zone, why = resolve_zone(w, bad)
    assert zone.key == "Europe/Berlin" and repr(bad) in why and "campaign" in why
    at = utc(2026, 1, 5, 1)  # open in Tokyo, closed in Berlin
    assert allowed(w, at, bad) is False
    assert next_open(w, at, bad) == next_open(w, at, None) == utc(2026, 1, 5, 8)
    assert resolve_zone(w, "Asia/Tokyo")[0].key == "Asia/Tokyo"
    assert resolve_zone(w, "Asia/Tokyo")[1] == resolve_zone(w, None)[1] == ""


# --- The property: next_open is open, and nothing before it is ------------------------

ZONES = [
    "Europe/Berlin",
    "America/New_York",
    "Asia/Tokyo",
    "Australia/Lord_Howe",  # a half-hour DST shift
    "America/Santiago",  # DST changes at midnight
    "Asia/Kathmandu",  # UTC+05:45
]
# Each zone's DST changes in 2026 (none in Tokyo or Kathmandu): instants are drawn
# around them, and window edges near the local hours they happen at.
CHANGES = {
    "Europe/Berlin": [utc(2026, 3, 29, 1), utc(2026, 10, 25, 1)],
    "America/New_York": [utc(2026, 3, 8, 7), utc(2026, 11, 1, 6)],
    "Australia/Lord_Howe": [utc(2026, 4, 4, 15), utc(2026, 10, 3, 15, 30)],
    "America/Santiago": [utc(2026, 4, 5, 3), utc(2026, 9, 6, 4)],
    "Asia/Tokyo": [utc(2026, 6, 1)],
    "Asia/Kathmandu": [utc(2026, 6, 1)],
}
EDGES = [0, 15, 30, 60, 90, 105, 120, 135, 150, 165, 180, 1380, 1410, 1425, 1440]
DAY_US = 86400 * 10**6


@st.composite
def cases(draw: st.DrawFn) -> tuple[SendWindow, str | None, dt.datetime]:
    """A window, a recipient zone (None: the window's) and an instant near a DST change
    of the zone in force, often near one of the window's edges."""
    zone = draw(st.sampled_from(ZONES))
    minutes = st.one_of(st.integers(0, 1440), st.sampled_from(EDGES))
    start = draw(minutes.filter(lambda m: m < 1440))
    end = draw(minutes.filter(lambda m: m != start))
    own = draw(st.booleans())
    tz = zone if own else draw(st.sampled_from(ZONES))
    w = SendWindow(frozenset(draw(st.sets(st.integers(1, 7), min_size=1))), start, end, tz)
    base = draw(st.sampled_from(CHANGES[zone]))
    if draw(st.booleans()):
        after = base + dt.timedelta(microseconds=draw(st.integers(-4 * DAY_US, 4 * DAY_US)))
    else:
        local = dt.datetime.combine(base.astimezone(ZoneInfo(zone)).date(), dt.time())
        local += dt.timedelta(
            days=draw(st.integers(-2, 2)), minutes=draw(st.sampled_from([start, end]))
        )
        local += dt.timedelta(seconds=draw(st.integers(-90, 90)))
        after = local.replace(tzinfo=ZoneInfo(zone)).astimezone(dt.UTC)
    return w, None if own else zone, after


def wall_clock_open(w: SendWindow, clock: dt.datetime) -> bool:
    """The window read off a wall clock that never goes back (``clock``: the latest
    local time shown so far): the repeated hour is not shown twice, and a time a gap
    skips is passed when the clock jumps over it. An oracle independent of the module's
    per-day instants."""
    now = (clock - clock.replace(hour=0, minute=0, second=0, microsecond=0)).total_seconds()
    today, start, end = clock.isoweekday(), w.start * 60, w.end * 60
    if not w.wraps:
        return today in w.days and start <= now < end
    yesterday = (today - 2) % 7 + 1
    return (today in w.days and now >= start) or (yesterday in w.days and now < end)


BERLIN = "Europe/Berlin"


@settings(max_examples=30, deadline=None)
@given(case=cases())
# The cases the module once got wrong, or could: inside a wrap after midnight, a start
# in the spring gap, the second pass of a repeated hour, the instant a window closes.
@example(case=(SendWindow(frozenset({5}), 1320, 360, BERLIN), None, utc(2026, 1, 10, 1)))
@example(case=(SendWindow(frozenset({7}), 150, 240, BERLIN), None, utc(2026, 3, 29, 0, 40)))
@example(case=(SendWindow(frozenset({7}), 120, 150, BERLIN), None, utc(2026, 10, 25, 1, 10)))
@example(case=(SendWindow(frozenset({1}), 540, 1020, BERLIN), "Asia/Tokyo", utc(2026, 1, 5, 8)))
def test_next_open_is_open_and_nothing_before_it_is(
    case: tuple[SendWindow, str | None, dt.datetime],
) -> None:
    w, recipient, after = case
    zone = ZoneInfo(recipient or w.timezone)
    first = next_open(w, after, recipient)
    assert first >= after and allowed(w, first, recipient)
    if first > after:
        assert not allowed(w, first - US, recipient)
    # Every minute from ``after`` to ``first`` is closed, by the module and by a wall
    # clock (started three hours earlier, so that it has seen any repeated hour).
    minute = after.replace(second=0, microsecond=0)
    seen = [minute + dt.timedelta(minutes=i) for i in range(-180, 1)]
    clock = max(t.astimezone(zone).replace(tzinfo=None, fold=0) for t in seen)
    probes = [after, *(minute + dt.timedelta(minutes=i) for i in range(1, 8 * 1440))]
    for t in [p for p in probes if p < first] + [first]:
        clock = max(clock, t.astimezone(zone).replace(tzinfo=None, fold=0))
        assert wall_clock_open(w, clock) is (t == first), (t, clock)
        if t < first:
            assert not allowed(w, t, recipient), t


# --- Finish-time prediction ---------------------------------------------------------------

DOUBLING = make_plan("doubling", [1_000, 2_000, 4_000, 8_000, 16_000])


def test_warming_alone_finishes_on_the_day_the_cumulative_cap_passes_the_count() -> None:
    # 1 000 + 2 000 + 4 000 = 7 000 < 10 000 <= 7 000 + 8 000: day 4, at its midnight.
    p = predict_finish(utc(2026, 1, 5), 10_000, [SourceLimit("ip1", DOUBLING)])
    assert p.finish == utc(2026, 1, 8) and p.unsent == 0
    assert p.per_day == (
        (dt.date(2026, 1, 5), 1_000),
        (dt.date(2026, 1, 6), 2_000),
        (dt.date(2026, 1, 7), 4_000),
        (dt.date(2026, 1, 8), 3_000),
    )


def test_a_source_mid_plan_with_part_of_its_day_spent() -> None:
    # Day 2 (cap 2 000) with 500 gone: 1 500 now, 4 000 tomorrow, the rest the day after.
    src = SourceLimit("ip1", DOUBLING, plan_day=2, sent_today=500)
    p = predict_finish(utc(2026, 1, 5, 12), 10_000, [src])
    assert p.finish == utc(2026, 1, 7)
    assert [n for _, n in p.per_day] == [1_500, 4_000, 4_500]


def test_a_shaping_rate_inside_an_office_hours_window() -> None:
    # 600/min = 10/s; 09:00-17:00 is 288 000 a day. Monday 288 000, then 212 000 more
    # from Tuesday 09:00 CET: the last at 09:00 + 21 199.9 s = 14:53:19.9 CET.
    w = window("09:00", "17:00", days=WORKDAYS)
    src = SourceLimit("ip1", per_minute=600)
    p = predict_finish(utc(2026, 1, 5, 7), 500_000, [src], w)
    assert p.finish == dt.datetime(2026, 1, 6, 14, 53, 19, 900_000, tzinfo=w.zone)
    assert p.per_day == ((dt.date(2026, 1, 5), 288_000), (dt.date(2026, 1, 6), 212_000))
    # Started at 16:00 on a Friday: an hour (36 000) that day, Monday for the rest.
    late = predict_finish(utc(2026, 1, 9, 15), 100_000, [src], w)
    assert late.per_day == ((dt.date(2026, 1, 9), 36_000), (dt.date(2026, 1, 12), 64_000))
    assert late.finish == dt.datetime(2026, 1, 12, 10, 46, 39, 900_000, tzinfo=w.zone)


def test_the_lower_of_two_rates_applies() -> None:
    # 100/min but 3 600/h: one a second. 7 200 messages take two hours, less one second.
    src = SourceLimit("ip1", per_minute=100, per_hour=3_600)
    p = predict_finish(utc(2026, 1, 5), 7_200, [src])
    assert p.finish == utc(2026, 1, 5, 2) - dt.timedelta(seconds=1)


def test_warming_rate_and_window_together() -> None:
    # 1/min, 09:00-17:00 UTC weekdays (480 a day), caps 300 then 600 then warm:
    # Mon 300 (the cap), Tue 480 (the window), Wed 480, Thu 240, the last at 12:59.
    plan = make_plan("short", [300, 600])
    w = window("09:00", "17:00", "UTC", WORKDAYS)
    p = predict_finish(utc(2026, 1, 5), 1_500, [SourceLimit("ip1", plan, per_minute=1)], w)
    assert [n for _, n in p.per_day] == [300, 480, 480, 240]
    assert p.finish == utc(2026, 1, 8, 12, 59)


def test_recipients_split_evenly_and_the_slowest_source_finishes_last() -> None:
    sources = [SourceLimit("ip1", DOUBLING), SourceLimit("ip2", per_hour=3_600)]
    assert split_evenly(10_001, sources) == {"ip1": 5_001, "ip2": 5_000}
    p = predict_finish(utc(2026, 1, 5), 10_001, sources)
    # ip1: 1 000 + 2 000 + 4 000 >= 5 001 on day 3; ip2: 5 000 at 1/s from midnight.
    assert p.per_source == {"ip1": utc(2026, 1, 7), "ip2": utc(2026, 1, 5, 1, 23, 19)}
    assert p.finish == utc(2026, 1, 7)
    assert p.per_day[0] == (dt.date(2026, 1, 5), 6_000)
    # A count per source instead of an even split.
    given_counts = predict_finish(utc(2026, 1, 5), {"ip1": 1_000, "ip2": 9_000}, sources)
    assert given_counts.per_source["ip1"] == utc(2026, 1, 5)
    assert given_counts.finish == utc(2026, 1, 5, 2, 29, 59)


def test_warming_days_roll_over_in_the_warming_zone() -> None:
    # Tokyo's midnight is 15:00 UTC: day 2 of the plan starts then.
    p = predict_finish(
        utc(2026, 1, 5), 3_000, [SourceLimit("ip1", DOUBLING)], warming_tz="Asia/Tokyo"
    )
    assert p.finish == utc(2026, 1, 5, 15)
    assert p.per_day == ((dt.date(2026, 1, 5), 1_000), (dt.date(2026, 1, 6), 2_000))


def test_beyond_the_horizon_no_finish_and_what_is_left() -> None:
    p = predict_finish(utc(2026, 1, 5), 10_000, [SourceLimit("ip1", per_hour=1)], horizon_days=2)
    assert p.finish is None and p.unsent == 10_000 - 48
    assert p.per_source == {"ip1": utc(2026, 1, 6, 23)}


def test_nothing_to_send_and_refused_inputs() -> None:
    src = SourceLimit("ip1", DOUBLING)
    assert predict_finish(utc(2026, 1, 5), 0, [src]).finish == utc(2026, 1, 5)
    assert predict_finish(utc(2026, 1, 5), 0, []).finish == utc(2026, 1, 5)
    with pytest.raises(ValueError, match="no sources"):
        predict_finish(utc(2026, 1, 5), 10, [])
    with pytest.raises(ValueError, match="negative"):
        predict_finish(utc(2026, 1, 5), -1, [src])
    with pytest.raises(ValueError, match="'ip9' is not one of the sources"):
        predict_finish(utc(2026, 1, 5), {"ip9": 10}, [src])
    with pytest.raises(ValueError, match="unique"):
        predict_finish(utc(2026, 1, 5), 10, [src, src])
    with pytest.raises(ValueError, match="timezone-aware"):
        predict_finish(dt.datetime(2026, 1, 5), 10, [src])
    with pytest.raises(ValueError, match="positive"):
        SourceLimit("ip1", per_minute=0)
    with pytest.raises(ValueError, match="plan_day"):
        SourceLimit("ip1", DOUBLING, plan_day=0)
