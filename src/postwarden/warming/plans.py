"""Warming plans: how many messages a new source IP or sending domain may send per day.

Pure policy, no I/O. A plan is a few anchor days with volumes; the days in between
are interpolated geometrically (each day multiplies the last by the same factor, as a
reputation grows), and after the last day the source is warm: no cap from the plan.
The built-ins:

* ``conservative``, 21 days: day 1 50, day 7 1 000, day 14 15 000, day 21 100 000;
* ``moderate``, 14 days: day 1 100, day 7 7 500, day 14 100 000;
* ``aggressive``, 7 days: day 1 200, day 4 15 000, day 7 100 000.

A plan may give per-site fractions (``{"gmail": 0.5}``): that site's share of each
day's cap, so a cautious provider sees less early on.

The day a plan is on moves forward only when the day before stayed healthy
(:func:`next_day`): the ramp follows what providers answer, not the calendar.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field


class PlanError(ValueError):
    """A plan that cannot be used; the message names what is wrong."""


@dataclass(frozen=True)
class Plan:
    name: str
    anchors: tuple[tuple[int, int], ...]  # (day, volume), days ascending from 1
    site_fractions: Mapping[str, float] = field(default_factory=dict)

    @property
    def days(self) -> int:
        return self.anchors[-1][0]

    def cap(self, day: int, site: str | None = None) -> int | None:
        """The day's cap (for ``site`` when it has a fraction); None once warm."""
        if day < 1:
            raise PlanError(f"day {day}: days start at 1")
        if day > self.days:
            return None
        total = _interpolate(self.anchors, day)
        if site is not None and site in self.site_fractions:
            return max(1, math.floor(total * self.site_fractions[site]))
        return total

    def schedule(self) -> list[int]:
        """Day 1 … last day's caps."""
        return [_interpolate(self.anchors, d) for d in range(1, self.days + 1)]


def _interpolate(anchors: Sequence[tuple[int, int]], day: int) -> int:
    for (d0, v0), (d1, v1) in itertools.pairwise(anchors):
        if d0 <= day <= d1:
            if day == d1:
                return v1
            ratio = (day - d0) / (d1 - d0)
            return round(v0 * (v1 / v0) ** ratio)
    return anchors[0][1] if day <= anchors[0][0] else anchors[-1][1]


def make_plan(
    name: str,
    days: Mapping[int, int] | Sequence[int],
    site_fractions: Mapping[str, float] = (),  # type: ignore[assignment]
) -> Plan:
    """A plan from ``{day: volume}`` anchors, or a list of every day's volume."""
    if isinstance(days, Mapping):
        anchors = sorted((int(d), int(v)) for d, v in days.items())
    else:
        anchors = [(i + 1, int(v)) for i, v in enumerate(days)]
    if not anchors:
        raise PlanError(f"{name}: a plan needs at least one day")
    if anchors[0][0] != 1:
        raise PlanError(f"{name}: the first day must be day 1, got day {anchors[0][0]}")
    for (d0, v0), (d1, v1) in itertools.pairwise(anchors):
        if d1 == d0:
            raise PlanError(f"{name}: day {d1} is given twice")
        if v1 < v0:
            raise PlanError(f"{name}: day {d1} ({v1}) is below day {d0} ({v0})")
    if any(v <= 0 for _, v in anchors):
        raise PlanError(f"{name}: volumes must be positive")
    fractions = dict(site_fractions or {})
    for site, f in fractions.items():
        if not 0 < f <= 1:
            raise PlanError(f"{name}: site fraction for {site} must be in (0, 1], got {f}")
    return Plan(name, tuple(anchors), fractions)


BUILTIN: dict[str, Plan] = {
    "conservative": make_plan("conservative", {1: 50, 7: 1_000, 14: 15_000, 21: 100_000}),
    "moderate": make_plan("moderate", {1: 100, 7: 7_500, 14: 100_000}),
    "aggressive": make_plan("aggressive", {1: 200, 4: 15_000, 7: 100_000}),
}


def next_day(day: int, healthy: bool) -> int:
    """The plan day after a rollover: one further when yesterday was healthy, else held."""
    return day + 1 if healthy else day


@dataclass(frozen=True)
class SimulatedDay:
    day: int
    cap: int | None  # None: warm, no cap
    sendable: bool  # the whole volume fits in this day's cap


def simulate(plan: Plan, volume: int) -> tuple[list[SimulatedDay], int]:
    """Every plan day with its cap, and the first day on which ``volume`` messages a
    day can be sent (the day after the plan when no day's cap reaches it)."""
    days = []
    first = plan.days + 1
    for d in range(1, plan.days + 1):
        cap = plan.cap(d)
        ok = cap is not None and cap >= volume
        if ok and first > plan.days:
            first = d
        days.append(SimulatedDay(d, cap, ok))
    return days, first
