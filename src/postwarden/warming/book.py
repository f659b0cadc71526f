"""Every warming plan in force, every health window, and the sticky pauses: one book,
kept by the shaping broker (docs/decisions/0006) and saved to ``shaping.state_file``.

Keys name what is warmed or watched: ``source:<name>`` for a source IP,
``domain:<name>`` for a sending domain. Wall-clock time is passed in (``wall``) so
tests drive the days.

* :meth:`WarmingBook.start` puts a key on a plan (a built-in name or custom
  anchors); it counts from day 1 unless told otherwise.
* :meth:`remaining` / :meth:`charge`: the cap left today and what was attempted.
  A day rolls over at local midnight in ``tz``; the plan moves on only after a
  healthy day (``health.healthy_day``).
* :meth:`outcome` feeds the rolling window behind the health score; a warming key
  whose window crosses a pause threshold is paused, and stays paused until
  :meth:`resume`.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from postwarden.files import replace_file
from postwarden.warming.health import KINDS, Thresholds, Window, healthy_day, pause_reason, score
from postwarden.warming.health import tier as tier_of
from postwarden.warming.plans import BUILTIN, Plan, PlanError, make_plan
from postwarden.warming.tracker import Tracker

log = logging.getLogger("postwarden.warming")


def plan_from(spec: str | Mapping[str, Any]) -> Plan:
    """A built-in plan by name, or a custom one: ``{"name", "days": {day: volume} or
    [volume, ...], "site_fractions": {site: fraction}}``."""
    if isinstance(spec, str):
        if spec not in BUILTIN:
            raise PlanError(f"no built-in plan {spec!r} (built-ins: {', '.join(BUILTIN)})")
        return BUILTIN[spec]
    days = spec.get("days")
    if isinstance(days, Mapping):
        days = {int(k): int(v) for k, v in days.items()}
    elif not isinstance(days, list):
        raise PlanError("days: a {day: volume} table or a list of volumes")
    return make_plan(str(spec.get("name", "custom")), days, spec.get("site_fractions") or {})


def _plan_json(plan: Plan) -> str | dict[str, Any]:
    if BUILTIN.get(plan.name) == plan:
        return plan.name
    return {
        "name": plan.name,
        "days": {str(d): v for d, v in plan.anchors},
        "site_fractions": dict(plan.site_fractions),
    }


class WarmingBook:
    def __init__(
        self,
        tz: str = "UTC",
        thresholds: Thresholds | None = None,
        *,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.tz = ZoneInfo(tz)
        self.thresholds = thresholds or Thresholds()
        self.wall = wall
        self.trackers: dict[str, Tracker] = {}
        self.windows: dict[str, Window] = {}
        self.today: dict[str, dict[str, int]] = {}  # warming key -> today's outcome counts
        self.paused: dict[str, str] = {}  # sticky pauses of keys not (or no longer) warming
        self.done: dict[str, str] = {}  # keys whose plan finished or was stopped: why
        self.changes: list[tuple[float, str, str]] = []  # (wall time, key, what)
        self.dirty = False

    # ------------------------------------------------------------------ plans

    def start(self, key: str, plan: Plan, day: int = 1) -> Tracker:
        if day < 1 or day > plan.days:
            raise PlanError(f"day must be between 1 and {plan.days}")
        t = Tracker(plan, self.tz, day=day)
        t.rollover(self.wall(), healthy=True)
        self.done.pop(key, None)
        if key in self.paused:
            t.pause(self.paused.pop(key))
        self.trackers[key] = t
        self.today[key] = dict.fromkeys(KINDS, 0)
        self._note(key, f"plan {plan.name} from day {day}")
        return t

    def stop(self, key: str, why: str = "stopped") -> bool:
        t = self.trackers.pop(key, None)
        if t is not None:
            self.done[key] = why
        self.today.pop(key, None)
        if t is not None and t.paused:
            self.paused[key] = t.paused
        if t is not None:
            self._note(key, "plan stopped")
        return t is not None

    def _roll(self, key: str, t: Tracker) -> None:
        now = self.wall()
        before = (t.date, t.day)
        counts = self.today.get(key) or dict.fromkeys(KINDS, 0)
        t.rollover(now, healthy_day(counts, self.thresholds))
        if (t.date, t.day) != before:
            self.today[key] = dict.fromkeys(KINDS, 0)
            self._note(
                key, f"day {t.day} (cap {t.plan.cap(t.day) if t.day <= t.plan.days else 'none'})"
            )
            if t.day > t.plan.days:  # warm: the plan is done
                self._note(key, "warm: plan finished")
                self.stop(key, "finished")

    def warming(self, key: str) -> bool:
        t = self.trackers.get(key)
        if t is None:
            return False
        self._roll(key, t)
        return key in self.trackers

    def remaining(self, key: str, site: str | None = None) -> int | None:
        """Attempts left today for ``key`` (at ``site``); None when it has no cap;
        0 while paused."""
        if key in self.paused:
            return 0
        t = self.trackers.get(key)
        if t is None:
            return None
        self._roll(key, t)
        t = self.trackers.get(key)
        return None if t is None else t.remaining(self.wall(), site)

    def charge(self, key: str, n: int, site: str | None = None) -> None:
        t = self.trackers.get(key)
        if t is not None and n:
            t.record(n, site)
            self.dirty = True

    def refund(self, key: str, n: int, site: str | None = None) -> None:
        """Tokens granted but not used: not attempted after all."""
        t = self.trackers.get(key)
        if t is not None and n:
            t.sent_today = max(0, t.sent_today - n)
            if site is not None and site in t.sent_by_site:
                t.sent_by_site[site] = max(0, t.sent_by_site[site] - n)
            self.dirty = True

    def next_day_at(self, key: str) -> float:
        """Wall time of the next local midnight (when a capped key may send again)."""
        now = dt.datetime.fromtimestamp(self.wall(), self.tz)
        tomorrow = dt.datetime.combine(now.date() + dt.timedelta(days=1), dt.time(), self.tz)
        return tomorrow.timestamp()

    # ------------------------------------------------------------------ health

    def outcome(self, key: str, kind: str, n: int = 1) -> str | None:
        """Count one kind of outcome; see :meth:`outcomes`."""
        return self.outcomes(key, {kind: n})

    def outcomes(self, key: str, counts: dict[str, int]) -> str | None:
        """Count a report's outcomes (all of them before the window is judged);
        returns the pause reason when this pauses ``key``."""
        counts = {k: n for k, n in counts.items() if n}
        if not counts:
            return None
        now = self.wall()
        w = self.windows.get(key)
        if w is None:
            w = self.windows[key] = Window(self.thresholds.window)
        for kind, n in counts.items():
            w.add(now, kind, n)
        t = self.trackers.get(key)
        if t is None:
            return None
        today = self.today.setdefault(key, dict.fromkeys(KINDS, 0))
        for kind, n in counts.items():
            today[kind] += n
        self.dirty = True
        if t.paused:
            return None
        why = pause_reason(w.totals(now), self.thresholds, t.plan.cap(t.day))
        if why is not None:
            t.pause(f"auto: {why}")
            self._note(key, f"paused: {why}")
            log.warning("event=warming_paused key=%s reason=%r", key, why)
        return why

    def health(self, key: str) -> tuple[float, str]:
        w = self.windows.get(key)
        totals = w.totals(self.wall()) if w else dict.fromkeys(KINDS, 0)
        s = score(totals, self.thresholds)
        return s, tier_of(s)

    def pause(self, key: str, reason: str) -> None:
        t = self.trackers.get(key)
        if t is not None:
            t.pause(reason)
        else:
            self.paused[key] = reason
        self._note(key, f"paused: {reason}")

    def resume(self, key: str) -> bool:
        t = self.trackers.get(key)
        was = bool(self.paused.pop(key, "")) or bool(t is not None and t.paused)
        if t is not None:
            t.resume()
        # A fresh start for the window: the storm that paused it is not held against
        # the resumed sender a second time.
        self.windows.pop(key, None)
        if was:
            self._note(key, "resumed")
        return was

    def is_paused(self, key: str) -> str:
        t = self.trackers.get(key)
        return self.paused.get(key, "") or (t.paused if t is not None else "")

    # ------------------------------------------------------------------ reports

    def progress(self, key: str) -> dict[str, Any]:
        t = self.trackers.get(key)
        if t is not None:
            self._roll(key, t)
            t = self.trackers.get(key)
        s, tr = self.health(key)
        w = self.windows.get(key)
        out: dict[str, Any] = {
            "key": key,
            "warming": t is not None,
            "paused": self.is_paused(key),
            "health": {"score": s, "tier": tr,
                       "window": w.totals(self.wall()) if w else dict.fromkeys(KINDS, 0)},
        }  # fmt: skip
        if t is not None:
            now = self.wall()
            out.update(
                plan=t.plan.name,
                # The whole plan, so that a custom one can be simulated (the dry run).
                anchors=[[d, v] for d, v in t.plan.anchors],
                day=t.day,
                days=t.plan.days,
                cap=t.plan.cap(t.day),
                sent_today=t.sent_today,
                remaining=t.remaining(now),
                sites={
                    site: {"cap": t.plan.cap(t.day, site), "sent": t.sent_by_site.get(site, 0)}
                    for site in sorted({*t.plan.site_fractions, *t.sent_by_site})
                },
                history=[
                    {"date": d.isoformat(), "day": day, "sent": sent, "healthy": ok}
                    for d, day, sent, ok in t.history[-30:]
                ],
            )
        return out

    def keys(self) -> list[str]:
        return sorted({*self.trackers, *self.paused, *self.windows})

    def _note(self, key: str, what: str) -> None:
        self.changes.append((self.wall(), key, what))
        del self.changes[:-200]
        self.dirty = True
        log.info("event=warming key=%s what=%r", key, what)

    # ------------------------------------------------------------------ persistence

    def to_json(self) -> dict[str, Any]:
        return {
            "version": 1,
            "trackers": {
                key: {
                    "plan": _plan_json(t.plan),
                    "day": t.day,
                    "date": t.date.isoformat() if t.date else None,
                    "sent_today": t.sent_today,
                    "sent_by_site": t.sent_by_site,
                    "paused": t.paused,
                    "today": self.today.get(key, {}),
                    "history": [[d.isoformat(), day, n, ok] for d, day, n, ok in t.history[-60:]],
                }
                for key, t in self.trackers.items()
            },
            "paused": self.paused,
            "done": self.done,
        }

    def load_json(self, data: Mapping[str, Any]) -> None:
        for key, item in data.get("trackers", {}).items():
            t = Tracker(plan_from(item["plan"]), self.tz, day=int(item["day"]))
            t.date = dt.date.fromisoformat(item["date"]) if item.get("date") else None
            t.sent_today = int(item.get("sent_today", 0))
            t.sent_by_site = {k: int(v) for k, v in item.get("sent_by_site", {}).items()}
            t.paused = str(item.get("paused", ""))
            t.history = [
                (dt.date.fromisoformat(d), int(day), int(n), bool(ok))
                for d, day, n, ok in item.get("history", [])
            ]
            self.trackers[key] = t
            self.today[key] = {**dict.fromkeys(KINDS, 0), **item.get("today", {})}
        self.paused.update({str(k): str(v) for k, v in data.get("paused", {}).items()})
        self.done.update({str(k): str(v) for k, v in data.get("done", {}).items()})

    def save(self, path: str | os.PathLike[str]) -> None:
        """Atomically (write, fsync, rename)."""
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        replace_file(p, json.dumps(self.to_json()), durable=True)
        self.dirty = False

    def load(self, path: str | os.PathLike[str]) -> None:
        p = Path(path)
        if not p.exists():
            return
        try:
            self.load_json(json.loads(p.read_text(encoding="utf-8")))
        except (ValueError, KeyError, TypeError, PlanError) as exc:
            # Never start sending at full speed from a warming IP because its state
            # is unreadable: refuse to start instead.
            raise PlanError(f"{p}: unreadable warming state: {exc}") from exc
