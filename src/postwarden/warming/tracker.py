"""One source's (or sending domain's) place in its warming plan. Pure; time passed in.

The day rolls over at midnight in the configured time zone. At a rollover the plan
moves to its next day only if the day that ended was healthy
(:func:`postwarden.warming.health.healthy_day`); otherwise it holds. Daily caps count
what was actually attempted. A paused tracker grants nothing until resumed.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from zoneinfo import ZoneInfo

from postwarden.warming.plans import Plan, next_day


@dataclass
class Tracker:
    plan: Plan
    tz: ZoneInfo
    day: int = 1
    date: dt.date | None = None  # the local date the counts belong to
    sent_today: int = 0
    sent_by_site: dict[str, int] = field(default_factory=dict)
    paused: str = ""  # the reason; "" when sending
    history: list[tuple[dt.date, int, int, bool]] = field(default_factory=list)

    def _local_date(self, now: float) -> dt.date:
        return dt.datetime.fromtimestamp(now, self.tz).date()

    def rollover(self, now: float, healthy: bool) -> None:
        """Start the local day ``now`` falls in, if it is a new one."""
        today = self._local_date(now)
        if self.date is None:
            self.date = today
            return
        if today == self.date:
            return
        self.history.append((self.date, self.day, self.sent_today, healthy))
        self.day = next_day(self.day, healthy)
        self.date = today
        self.sent_today = 0
        self.sent_by_site = {}

    def remaining(self, now: float, site: str | None = None) -> int | None:
        """How many more may be attempted today (None: no cap, the plan is done)."""
        if self.paused:
            return 0
        cap = self.plan.cap(self.day, site)
        if cap is None:
            return None
        if site is not None and site in self.plan.site_fractions:
            return max(0, cap - self.sent_by_site.get(site, 0))
        return max(0, cap - self.sent_today)

    def record(self, n: int = 1, site: str | None = None) -> None:
        """``n`` attempts made today."""
        self.sent_today += n
        if site is not None:
            self.sent_by_site[site] = self.sent_by_site.get(site, 0) + n

    def pause(self, reason: str) -> None:
        self.paused = reason

    def resume(self) -> None:
        self.paused = ""
