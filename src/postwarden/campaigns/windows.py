"""Send windows, and when a campaign's last message can go. Pure: time is passed in.

A **send window** is days of the week and a span of local clock time, in the
recipient's IANA time zone when it is known and valid, else the window's own (the
campaign's). JSON: ``{"days": ["mon", "tue"], "start": "09:00", "end": "17:00",
"timezone": "Europe/Berlin"}``; ``days`` may be ISO numbers (1 = Monday … 7 = Sunday)
or English names and defaults to every day; ``end`` may be ``"24:00"``, and an end
before the start wraps past midnight into the next day (``days`` names the day a
window opens on). The span is half open, [start, end).

Clock times are turned into instants per day, so DST changes behave: a start or end
that a DST gap skips takes the first instant after the gap; a repeated hour counts
once (the first time the clock shows a time is the one that counts).

:func:`predict_finish` answers the dry run's "when will it be done": it paces each
source of the pool by its warming plan's daily caps and its shaping rate, inside the
window, and says when the last message can be sent.
"""

from __future__ import annotations

import datetime as dt
import functools
import math
import zoneinfo
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction

from postwarden.warming.plans import Plan

DAY_NAMES = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_FULL_NAMES = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
_FIELDS = ("days", "start", "end", "timezone")
_DAY = dt.timedelta(days=1)
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


class WindowError(ValueError):
    """A send window refused: ``path`` is the field (``send_window.start``), ``reason`` why."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


@functools.cache
def _zones() -> frozenset[str]:
    return frozenset(zoneinfo.available_timezones())


@dataclass(frozen=True)
class SendWindow:
    days: frozenset[int]  # ISO weekdays, 1 = Monday
    start: int  # minutes after local midnight, 0 … 1439
    end: int  # minutes after local midnight, 0 … 1440 (24:00); below start: wraps
    timezone: str  # IANA name: the campaign's zone

    @property
    def zone(self) -> zoneinfo.ZoneInfo:
        return zoneinfo.ZoneInfo(self.timezone)

    @property
    def wraps(self) -> bool:
        return self.end < self.start

    def to_json(self) -> dict[str, object]:
        """The canonical JSON form (day names in week order)."""
        return {
            "days": [DAY_NAMES[d - 1] for d in sorted(self.days)],
            "start": _clock_text(self.start),
            "end": _clock_text(self.end),
            "timezone": self.timezone,
        }


def _clock_text(minutes: int) -> str:
    return f"{minutes // 60:02d}:{minutes % 60:02d}"


def parse_window(data: object, path: str = "send_window") -> SendWindow:
    """A window from its JSON form; :class:`WindowError` names the field that is wrong."""
    if not isinstance(data, Mapping):
        raise WindowError(path, "must be an object with days, start, end and timezone")
    for key in data:
        if key not in _FIELDS:
            raise WindowError(f"{path}.{key}", "unknown field (known: days, start, end, timezone)")
    for key in ("start", "end", "timezone"):
        if key not in data:
            raise WindowError(f"{path}.{key}", "required")
    days = _parse_days(data.get("days", list(DAY_NAMES)), f"{path}.days")
    start = _parse_clock(data["start"], f"{path}.start", allow_24=False)
    end = _parse_clock(data["end"], f"{path}.end", allow_24=True)
    if start == end:
        raise WindowError(
            f"{path}.end", "equals start: a window needs a length (00:00 to 24:00 is all day)"
        )
    tz = data["timezone"]
    if not isinstance(tz, str) or tz not in _zones():
        raise WindowError(
            f"{path}.timezone", f"{tz!r} is not an IANA time zone name (e.g. Europe/Berlin)"
        )
    return SendWindow(days, start, end, tz)


def _parse_days(value: object, path: str) -> frozenset[int]:
    if not isinstance(value, list) or not value:
        raise WindowError(path, "must be a non-empty list of days (mon … sun, or 1 … 7)")
    days = set()
    for i, item in enumerate(value):
        if isinstance(item, int) and not isinstance(item, bool) and 1 <= item <= 7:
            days.add(item)
        elif isinstance(item, str) and item.lower() in DAY_NAMES:
            days.add(DAY_NAMES.index(item.lower()) + 1)
        elif isinstance(item, str) and item.lower() in _FULL_NAMES:
            days.add(_FULL_NAMES.index(item.lower()) + 1)
        else:
            raise WindowError(
                f"{path}[{i}]", f"{item!r} is not a day (mon … sun, or ISO 1 = Monday … 7)"
            )
    return frozenset(days)


def _parse_clock(value: object, path: str, *, allow_24: bool) -> int:
    last = "24:00" if allow_24 else "23:59"
    bad = WindowError(path, f"{value!r} is not a time HH:MM from 00:00 to {last}")
    if not isinstance(value, str) or len(value) != 5 or value[2] != ":":
        raise bad
    hh, mm = value[:2], value[3:]
    if not (hh.isascii() and hh.isdigit() and mm.isascii() and mm.isdigit()):
        raise bad
    minutes = int(hh) * 60 + int(mm)
    if int(mm) > 59 or minutes > (1440 if allow_24 else 1439):
        raise bad
    return minutes


def resolve_zone(window: SendWindow, recipient_tz: str | None) -> tuple[zoneinfo.ZoneInfo, str]:
    """The zone a recipient's window is read in, and why the campaign's was used
    instead of the recipient's (``""`` when it was not, or none was given)."""
    if recipient_tz is None or recipient_tz == "":
        return window.zone, ""
    if recipient_tz in _zones():
        return zoneinfo.ZoneInfo(recipient_tz), ""
    return window.zone, f"unknown time zone {recipient_tz!r}: the campaign's used"


def _utc(instant: dt.datetime, name: str) -> dt.datetime:
    if instant.tzinfo is None or instant.utcoffset() is None:
        raise ValueError(f"{name} must be timezone-aware, got {instant.isoformat()}")
    return instant.astimezone(dt.UTC)


def _instant(day: dt.date, minute: int, zone: zoneinfo.ZoneInfo) -> dt.datetime:
    """The UTC instant of local ``day`` at ``minute``: the first of a repeated time; for
    a time a DST gap skips, the first instant after the gap."""
    day, minute = (day + _DAY, 0) if minute == 1440 else (day, minute)
    naive = dt.datetime.combine(day, dt.time(minute // 60, minute % 60))
    first = naive.replace(tzinfo=zone).astimezone(dt.UTC)
    if first.astimezone(zone).replace(tzinfo=None) == naive:
        return first
    # Skipped: fold=0 reads it with the offset before the gap (an instant after it),
    # fold=1 with the one after (an instant before it); the transition lies between.
    lo = int(naive.replace(tzinfo=zone, fold=1).timestamp())
    hi = int(first.timestamp())
    after = first.astimezone(zone).utcoffset()
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if dt.datetime.fromtimestamp(mid, zone).utcoffset() == after:
            hi = mid
        else:
            lo = mid
    return dt.datetime.fromtimestamp(hi, dt.UTC)


def openings(
    window: SendWindow, after_utc: dt.datetime, zone: zoneinfo.ZoneInfo
) -> Iterator[tuple[dt.datetime, dt.datetime]]:
    """The window's open spans [open, close) in ``zone`` from ``after_utc`` on, in
    order, the first clipped to start at ``after_utc``; endless."""
    after = _utc(after_utc, "after_utc")
    day = after.astimezone(zone).date() - _DAY  # a wrapping window opened the day before
    while True:
        if day.isoweekday() in window.days:
            opens = _instant(day, window.start, zone)
            closes = _instant(day + _DAY if window.wraps else day, window.end, zone)
            if closes > after and opens < closes:
                yield max(opens, after), closes
        day += _DAY


def next_open(
    window: SendWindow, after_utc: dt.datetime, recipient_tz: str | None = None
) -> dt.datetime:
    """The first instant at or after ``after_utc`` at which the window allows sending
    (UTC). An unknown recipient zone falls back to the campaign's (:func:`resolve_zone`)."""
    zone, _ = resolve_zone(window, recipient_tz)
    return next(openings(window, after_utc, zone))[0]


def allowed(window: SendWindow, instant_utc: dt.datetime, recipient_tz: str | None = None) -> bool:
    """Whether the window allows sending at ``instant_utc``; zones as :func:`next_open`."""
    return next_open(window, instant_utc, recipient_tz) == _utc(instant_utc, "instant_utc")


# --- Finish-time prediction -----------------------------------------------------------


@dataclass(frozen=True)
class SourceLimit:
    """What paces one source of the pool: its warming plan (on ``plan_day`` at the
    start, ``sent_today`` already counted against that day's cap) and its shaping rate."""

    name: str
    plan: Plan | None = None
    plan_day: int = 1
    sent_today: int = 0
    per_minute: float | None = None
    per_hour: float | None = None

    def __post_init__(self) -> None:
        if self.plan_day < 1 or self.sent_today < 0:
            raise ValueError(f"source {self.name}: plan_day starts at 1, sent_today at 0")
        for rate in (self.per_minute, self.per_hour):
            if rate is not None and not (rate > 0 and math.isfinite(rate)):
                raise ValueError(f"source {self.name}: a rate must be positive, got {rate}")

    def rate(self) -> Fraction | None:
        """Messages per second: the lower of the two rates; None when neither is set."""
        rates = [Fraction(r) / s for r, s in ((self.per_minute, 60), (self.per_hour, 3600)) if r]
        return min(rates, default=None)


@dataclass(frozen=True)
class Prediction:
    finish: dt.datetime | None  # when the last message can be sent; None: not by the horizon
    per_day: tuple[tuple[dt.date, int], ...]  # by local date: the window's zone, else warming's
    per_source: Mapping[str, dt.datetime | None]  # each source's last message
    unsent: int  # messages the horizon left over


def split_evenly(recipients: int, sources: Sequence[SourceLimit]) -> dict[str, int]:
    """``recipients`` over the sources in equal shares, the first ones one more."""
    if recipients < 0:
        raise ValueError(f"recipients: {recipients} is negative")
    if recipients and not sources:
        raise ValueError("recipients but no sources to send them from")
    share, extra = divmod(recipients, len(sources) or 1)
    return {s.name: share + (i < extra) for i, s in enumerate(sources)}


def predict_finish(
    start_utc: dt.datetime,
    recipients: int | Mapping[str, int],
    sources: Sequence[SourceLimit],
    window: SendWindow | None = None,
    *,
    warming_tz: str = "UTC",
    horizon_days: int = 732,
) -> Prediction:
    """When the last of ``recipients`` can be sent from ``start_utc``: a count split
    evenly over ``sources``, or a count per source name. Each source sends as fast as
    its shaping rate allows (a steady pace; none: at once) inside the window (read in
    the campaign's zone) and up to its plan's cap each warming day (days roll over at
    midnight in ``warming_tz``, every day assumed healthy). Zero recipients: the start."""
    start = _utc(start_utc, "start_utc")
    counts = split_evenly(recipients, sources) if isinstance(recipients, int) else dict(recipients)
    names = {s.name for s in sources}
    if len(names) != len(sources):
        raise ValueError("sources: names must be unique")
    for name, n in counts.items():
        if name not in names:
            raise ValueError(f"recipients: {name!r} is not one of the sources")
        if n < 0:
            raise ValueError(f"recipients: {name!r} has a negative count")
    wzone = zoneinfo.ZoneInfo(warming_tz)
    horizon = start + horizon_days * _DAY
    per_day: dict[dt.date, int] = {}
    per_source: dict[str, dt.datetime | None] = {}
    unsent = 0
    for src in sources:
        last, left = _pace(start, counts.get(src.name, 0), src, window, wzone, horizon, per_day)
        per_source[src.name] = last
        unsent += left
    lasts = [t for t in per_source.values() if t is not None]
    finish = None if unsent else max(lasts, default=start)
    return Prediction(finish, tuple(sorted(per_day.items())), per_source, unsent)


def _pace(
    start: dt.datetime,
    n: int,
    src: SourceLimit,
    window: SendWindow | None,
    wzone: zoneinfo.ZoneInfo,
    horizon: dt.datetime,
    per_day: dict[dt.date, int],
) -> tuple[dt.datetime | None, int]:
    """One source's sends, added to ``per_day``: its last send and what is left."""
    rate = src.rate()
    day_zone = window.zone if window else wzone
    plan_day, used, plan_date = src.plan_day, src.sent_today, start.astimezone(wzone).date()
    paced = _seconds(start)  # the earliest the next message may go (Fraction seconds)
    cursor, last = start, None
    while n > 0 and cursor < horizon:
        opens, closes = next(openings(window, cursor, window.zone)) if window else (cursor, horizon)
        today = opens.astimezone(wzone).date()
        if today != plan_date:  # warming days passed: one plan day each (healthy)
            plan_day, used, plan_date = plan_day + (today - plan_date).days, 0, today
        end = min(closes, horizon, _next_midnight(opens, wzone), _next_midnight(opens, day_zone))
        cap = src.plan.cap(plan_day) if src.plan else None
        first = max(_seconds(opens), paced)
        budget = n if cap is None else min(n, max(0, cap - used))
        if budget and first < _seconds(end):
            fit = math.ceil((_seconds(end) - first) * rate) if rate else budget
            sent = min(budget, fit)
            at = first + (sent - 1) / rate if rate else first
            paced = at + 1 / rate if rate else at
            last = _datetime(at)
            date = opens.astimezone(day_zone).date()
            per_day[date] = per_day.get(date, 0) + sent
            n, used = n - sent, used + sent
        cursor = end
    return last, n


def _next_midnight(instant: dt.datetime, zone: zoneinfo.ZoneInfo) -> dt.datetime:
    return _instant(instant.astimezone(zone).date() + _DAY, 0, zone)


def _seconds(instant: dt.datetime) -> Fraction:
    return Fraction((instant - _EPOCH) // dt.timedelta(microseconds=1), 1_000_000)


def _datetime(seconds: Fraction) -> dt.datetime:
    # Up to the next microsecond: never earlier than the pace allows.
    return _EPOCH + dt.timedelta(microseconds=math.ceil(seconds * 1_000_000))
