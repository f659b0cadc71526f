"""Warming plans: the built-ins' anchors, geometric days in between, site fractions,
holding a day, and the simulation the CLI prints."""

from __future__ import annotations

import itertools

import pytest

from postwarden.warming.plans import BUILTIN, PlanError, make_plan, next_day, simulate


def test_builtin_anchors_are_exact() -> None:
    c, m, a = BUILTIN["conservative"], BUILTIN["moderate"], BUILTIN["aggressive"]
    assert (c.days, m.days, a.days) == (21, 14, 7)
    assert [c.cap(d) for d in (1, 7, 14, 21)] == [50, 1_000, 15_000, 100_000]
    assert [m.cap(d) for d in (1, 7, 14)] == [100, 7_500, 100_000]
    assert [a.cap(d) for d in (1, 4, 7)] == [200, 15_000, 100_000]
    # Warm after the last day: no cap from the plan.
    assert c.cap(22) is None and a.cap(8) is None


def test_days_between_anchors_grow_by_one_factor() -> None:
    c = BUILTIN["conservative"]
    week1 = [c.cap(d) for d in range(1, 8)]
    ratios = [b / a for a, b in itertools.pairwise(week1)]  # type: ignore[operator]
    # 50 -> 1000 in 6 steps: each about 20 ** (1/6) = 1.648, rounding aside.
    assert all(abs(r - 20 ** (1 / 6)) < 0.02 for r in ratios), ratios
    schedule = c.schedule()
    assert schedule == sorted(schedule) and len(schedule) == 21


def test_site_fractions_and_custom_plans() -> None:
    p = make_plan("mine", {1: 1000, 3: 4000}, {"gmail": 0.25})
    assert p.cap(2) == 2000 and p.cap(2, "gmail") == 500 and p.cap(2, "yahoo") == 2000
    assert make_plan("list", [10, 20, 40]).schedule() == [10, 20, 40]
    for bad, msg in (({2: 10}, "day 1"), ({1: 10, 2: 5}, "below"), ({1: 0}, "positive")):
        with pytest.raises(PlanError, match=msg):
            make_plan("bad", bad)
    with pytest.raises(PlanError, match="fraction"):
        make_plan("bad", {1: 10}, {"gmail": 1.5})


def test_an_unhealthy_day_holds_the_plan() -> None:
    assert next_day(3, healthy=True) == 4
    assert next_day(3, healthy=False) == 3


def test_simulate_finds_the_first_day_a_volume_fits() -> None:
    days, first = simulate(BUILTIN["moderate"], 250_000)
    assert len(days) == 14 and first == 15  # no plan day reaches 250 000: once warm
    days, first = simulate(BUILTIN["moderate"], 5_000)
    assert first == min(d.day for d in days if d.cap is not None and d.cap >= 5_000)
    assert days[first - 1].sendable and not days[first - 2].sendable


def test_simulate_command_prints_the_plan() -> None:
    import subprocess
    import sys

    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "postwarden.cli",
            "warming",
            "simulate",
            "--plan",
            "moderate",
            "--volume",
            "250000",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    lines = out.splitlines()
    assert lines[0].startswith("plan moderate: 14 days")
    assert lines[2].split() == ["1", "100"] and lines[15].split() == ["14", "100000"]
    assert "sendable from day 15" in lines[-1]
