"""Suspensions, bounce rules and backoff survive a restart (issue 17, item 8; decision
0006): the broker's snapshot in wall-clock time, restored by a new broker whose
monotonic clock starts elsewhere; what expired meanwhile is dropped (driven clocks)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from postwarden.shaping.adaptive import rule
from postwarden.shaping.broker import Broker
from postwarden.shaping.pair_state import restore, snapshot
from postwarden.shaping.service import ShapingService
from postwarden.warming.book import WarmingBook
from postwarden.warming.plans import PlanError
from tests.shaping.test_change_log import one_source
from tests.shaping.test_choose import RULES, SOURCES, Clock

WALL = 1_772_442_000.0
BOUNCE = rule("lab-block", "bounce", 600, text="blocked", sites=["lab"])


def broker(t: float) -> tuple[Broker, Clock]:
    clock = Clock()
    clock.t = t
    rules = (BOUNCE, *RULES.responses)
    return Broker(RULES, rules, clock=clock, sources=SOURCES), clock


def test_snapshot_in_wall_time_and_restore_on_another_clock() -> None:
    b, _clock = broker(1000.0)
    b.report("a", "gmail", 421, "4.7.28", "slow down")  # suspend 30 min
    b.report("b", "gmail", 421, "4.7.0", "unusual rate of mail")  # rate x 0.5 for 1 h
    b.report("c", "lab", 554, "5.7.1", "blocked")  # bounce rule, 10 min
    b.report("a", "lab", 451, "4.3.0", "busy")  # backoff: a's rate at lab drops
    b.report("c", "gmail", 250, "2.0.0", "ok")  # nothing in force: not saved
    snap = snapshot(b, wall_now=WALL)
    pairs = {(p["source"], p["site"]): p for p in snap["pairs"]}
    assert set(pairs) == {("a", "gmail"), ("b", "gmail"), ("c", "lab"), ("a", "lab")}
    assert pairs[("a", "gmail")]["suspended_until"] == WALL + 1800
    assert pairs[("a", "gmail")]["reason"].startswith("gmail-rate-limited")
    assert pairs[("b", "gmail")]["lowered_until"] == WALL + 3600
    assert pairs[("c", "lab")]["bounce_until"] == WALL + 600
    lab_limit = b.pair("a", "lab").state.limit_rate
    assert pairs[("a", "lab")]["rate"] == b.pair("a", "lab").state.rate < lab_limit
    assert pairs[("a", "lab")]["pushback_at"] == WALL  # backoff, in wall time
    json.dumps(snap)  # it goes to the state file as it is

    # Restarted 20 minutes later (wall), on a monotonic clock that reads 50.
    b2, clock2 = broker(50.0)
    assert restore(b2, json.loads(json.dumps(snap)), wall_now=WALL + 1200) == 2
    a_gm = b2.pair("a", "gmail").state
    assert a_gm.suspended_until == 50.0 + 600 and a_gm.reason.startswith("gmail-rate-limited")
    c = b2.choose("w", "p", [("a", 1)], "wait", "gmail")
    assert not c.ok and c.kind == "suspended" and c.retry_at == 50.0 + 600
    b_gm = b2.pair("b", "gmail").state
    assert b_gm.lowered_until == 50.0 + 2400 and b_gm.rate == b_gm.limit_rate / 2
    # a's backoff at lab ended (30 s without push-back) while it was down: full rate.
    assert b2.pair("a", "lab").state.rate == lab_limit
    assert not b2.pair("a", "lab").state.backoff_since
    # The bounce rule's 10 minutes passed while down: dropped, c sends at lab again.
    assert b2.pair("c", "lab").bounce_until == 0.0
    assert b2.choose("w", "p", [("c", 1)], "wait", "lab").ok
    # The suspension ends on the new clock, at its wall-clock time.
    clock2.t = 50.0 + 600
    assert b2.choose("w", "p", [("a", 1)], "wait", "gmail").ok
    left = snapshot(b2, wall_now=WALL + 1800)["pairs"]
    assert {(p["source"], p["site"]) for p in left} == {("b", "gmail")}


def test_a_backoff_survives_a_short_restart_and_ends_when_it_would_have() -> None:
    b, _clock = broker(1000.0)
    b.report("a", "lab", 451, "4.3.0", "busy")  # backoff, from the rate observed (none)
    lab = b.pair("a", "lab").state
    slow = lab.rate
    assert lab.backoff_since and slow < lab.limit_rate
    snap = json.loads(json.dumps(snapshot(b, wall_now=WALL)))
    # Back 10 s later (wall) on a clock reading 50: 20 s of the 30 s backoff are left.
    b2, clock2 = broker(50.0)
    assert restore(b2, snap, wall_now=WALL + 10) == 1
    st = b2.pair("a", "lab").state
    assert st.rate == slow and st.backoff_since
    assert st.pushback_at == 50.0 - 10
    snap2 = snapshot(b2, wall_now=WALL + 10)["pairs"]
    assert snap2[0]["pushback_at"] == WALL and snap2[0]["backoff_since"] == WALL
    # Without more push-back the backoff ends 30 s after the last one, on the new clock.
    clock2.t = 50.0 + 20
    b2.report("a", "lab", 250, "2.0.0", "ok")
    assert b2.pair("a", "lab").state.rate == st.limit_rate and not st.backoff_since


def test_restore_reads_old_files_and_names_a_bad_entry() -> None:
    b, _clock = broker(0.0)
    assert restore(b, {"version": 1, "trackers": {}}, wall_now=WALL) == 0  # before pairs
    assert b.pairs == {}
    with pytest.raises(ValueError, match=r"pairs\[1\]\.suspended_until: must be a non-negative"):
        restore(b,
            {"pairs": [{"source": "a", "site": "gmail"}, {"source": "a", "site": "x",
                        "suspended_until": "soon"}]},
            wall_now=WALL,
        )  # fmt: skip
    with pytest.raises(ValueError, match=r"pairs\[0\]\.site: must be a non-empty string"):
        restore(b, {"pairs": [{"source": "a"}]}, wall_now=WALL)


def test_the_service_saves_pairs_with_the_warming_book(tmp_path: Path) -> None:
    cfg = one_source(tmp_path)
    wall = [WALL]
    svc = ShapingService(cfg, wall=lambda: wall[0])
    svc.book.pause("source:a", "by hand")
    svc.broker.report("a", "yahoo", 421, "4.7.0", "[TS03] messages deferred")  # 4 h
    svc.save()
    data = json.loads(Path(cfg.shaping_state_file).read_text())
    assert data["paused"] == {"source:a": "by hand"}
    # (the broker's monotonic clock moved on a little between the answer and the save)
    assert data["pairs"][0]["suspended_until"] == pytest.approx(WALL + 4 * 3600, abs=1.0)
    wall[0] += 3600  # an hour down
    again = ShapingService(cfg, wall=lambda: wall[0])
    pair = next(p for p in again.broker.status() if p["site"] == "yahoo")
    assert 3 * 3600 - 5 < pair["suspended_for"] <= 3 * 3600
    assert again.book.is_paused("source:a") == "by hand"
    # A file written before pairs were saved loads as it did.
    old = WarmingBook("UTC", wall=lambda: wall[0])
    old.pause("source:a", "old file")
    old.save(cfg.shaping_state_file)
    third = ShapingService(cfg, wall=lambda: wall[0])
    assert third.broker.pairs == {} and third.book.is_paused("source:a") == "old file"
    # A damaged pairs entry refuses to start, naming it (never send into a suspension).
    Path(cfg.shaping_state_file).write_text(json.dumps({**data, "pairs": [{"source": 1}]}))
    with pytest.raises(PlanError, match=r"pairs\[0\]\.source"):
        ShapingService(cfg, wall=lambda: wall[0])
