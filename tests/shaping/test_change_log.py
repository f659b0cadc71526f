"""The broker's change log (issue 23): actions and rate changes with a sequence number
in wall-clock time, increases recorded only past a step, and the service's "changes"
op paging it, with a gap flagged after a restart or an overflow (driven clocks)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import pytest

from postwarden.config import Config, load_config
from postwarden.shaping.adaptive import Aimd, rule
from postwarden.shaping.broker import CHANGE_LOG_SIZE, Broker
from postwarden.shaping.channel import MAX_LINE, BrokerClient, BrokerServer
from postwarden.shaping.service import CommandError, ShapingService
from postwarden.warming.book import WarmingBook
from tests.shaping.test_broker import RULES, SOURCES, Clock

WALL = 1_772_442_000.0
SLOW = rule("lab-slow", "lower_rate", 600, text="slow down", sites=["lab"])


def broker(aimd: Aimd | None = None) -> tuple[Broker, Clock]:
    """A broker whose wall clock runs WALL - 1000 ahead of its monotonic one."""
    clock = Clock()
    book = WarmingBook("UTC", wall=lambda: WALL - 1000.0 + clock.t)
    kw: dict[str, Any] = {} if aimd is None else {"aimd": aimd}
    b = Broker(RULES, (SLOW, *RULES.responses), clock=clock, sources=SOURCES, book=book, **kw)
    return b, clock


def rates(b: Broker) -> list[tuple[str, float | None, float | None]]:
    return [
        (c["direction"], c["rate_before"], c["rate_after"])
        for c in b.changes
        if c["kind"] == "rate"
    ]


def test_pushback_records_a_down_and_a_rule_an_action() -> None:
    b, clock = broker()
    b.report("10.0.0.1", "lab", 451, "4.3.0", "busy")  # push-back: 120/min halved
    first = b.changes[-1]
    assert first == {
        "seq": 1,
        "at": WALL,  # the monotonic 1000 in wall time
        "source": "10.0.0.1",
        "site": "lab",
        "kind": "rate",
        "rate_before": 120.0,
        "rate_after": 60.0,
        "direction": "down",
        "reason": "deferral: 451 4.3.0 busy",
    }
    clock.t += 2  # past the hold: the next push-back counts
    b.report("10.0.0.2", "lab", 421, "4.7.0", "slow down please")
    action, rate = list(b.changes)[1:]
    assert action == {
        "seq": 2,
        "at": WALL + 2,
        "source": "10.0.0.2",
        "site": "lab",
        "kind": "action",
        "rule": "lab-slow",
        "action": "lower_rate",
        "duration": 600,
        "answer": "421 4.7.0 slow down please",
    }
    assert rate["seq"] == 3 and rate["kind"] == "rate" and rate["direction"] == "down"
    assert (rate["rate_before"], rate["rate_after"]) == (120.0, 60.0)
    assert rate["reason"].startswith("lab-slow: 421 4.7.0")
    # A suspension is an action and no rate change; the same rule still holding the
    # pair is no new action; a delivery at the full rate changes nothing.
    b.report("10.0.0.1", "gmail", 421, "4.7.28", "rate limited")
    b.report("10.0.0.1", "gmail", 421, "4.7.28", "rate limited")
    b.report("10.0.0.2", "gmail", 250, "2.0.0", "ok")
    assert [(c["seq"], c["kind"], c.get("rule")) for c in b.changes][3:] == [
        (4, "action", "gmail-rate-limited")
    ]
    # The existing actions list is as it was: newest last, monotonic times.
    assert [a["rule"] for a in b.actions] == ["lab-slow", "gmail-rate-limited"]
    assert b.actions[-1]["at"] == clock.t and b.action_count == 2


def test_successes_record_an_up_only_past_the_threshold() -> None:
    # Increases of 5 % a window, and no return to normal in this test's time.
    b, clock = broker(Aimd(recover=1.05, to_normal_after=10_000.0))
    b.report("10.0.0.1", "lab", 451, "4.3.0", "busy")
    state = b.pair("10.0.0.1", "lab").state
    seen = []
    while state.rate < state.limit_rate:
        clock.t += 5  # a window without push-back: one increase per delivery
        b.report("10.0.0.1", "lab", 250, "2.0.0", "ok")
        seen.append(round(state.rate * 60, 1))
    assert seen[:2] == [63.0, 66.2] and seen[-1] == 120.0 and len(seen) == 15
    ups = [r for r in rates(b) if r[0] == "up"]
    # Each recorded increase is ≥ 10 % over the last recorded rate, or the ceiling.
    assert ups[0] == ("up", 60.0, 66.2)
    assert all(a is not None and b_ is not None for _d, b_, a in ups)
    assert all(a >= b_ * 1.1 or a == 120.0 for _d, b_, a in ups)  # type: ignore[operator]
    assert ups[-1][2] == 120.0 and len(ups) < len(seen)
    chain = [r[1:] for r in rates(b)]
    assert all(prev[1] == nxt[0] for prev, nxt in itertools.pairwise(chain))
    assert all(c["reason"] == "deliveries succeed" for c in b.changes if c.get("direction") == "up")

    # A decrease is recorded even after increases too small to be: its "before" is
    # the rate in force just before it.
    b.report("10.0.0.2", "lab", 451, "4.3.0", "busy")
    clock.t += 5
    b.report("10.0.0.2", "lab", 250, "2.0.0", "ok")  # 60 -> 63, not recorded
    clock.t += 5
    b.report("10.0.0.2", "lab", 451, "4.3.0", "busy")
    last = b.changes[-1]
    assert last["source"] == "10.0.0.2" and last["direction"] == "down"
    assert (last["rate_before"], last["rate_after"]) == (63.0, 31.5)


def test_a_backoff_ending_between_answers_is_recorded_where_seen() -> None:
    b, clock = broker()
    b.report("10.0.0.1", "lab", 451, "4.3.0", "busy")
    clock.t += 31  # no push-back for 30 s: the full rate, found when tokens are asked
    assert b.take("w", "10.0.0.1", "lab", 1).ok
    up = b.changes[-1]
    assert (up["seq"], up["direction"], up["rate_before"], up["rate_after"]) == (
        2,
        "up",
        60.0,
        120.0,
    )
    assert up["at"] == WALL + 31 and up["reason"] == "no push-back for 30s"
    # An unrated site: backoff from "no limit" (None) and back to it at its end.
    b.report("10.0.0.1", "other", 451, "4.3.0", "busy")
    clock.t += 31
    b.status()
    assert rates(b)[-2:] == [("down", None, 6.0), ("up", 6.0, None)]
    seqs = [c["seq"] for c in b.changes]
    assert seqs == list(range(1, len(seqs) + 1))
    ats = [c["at"] for c in b.changes]
    assert ats == sorted(ats)


def one_source(tmp_path: Path) -> Config:
    """A configuration with one source, ``a``, and its spool under ``tmp_path``."""
    return load_config(
        None,
        environ={},
        overrides={
            "spool": {"path": str(tmp_path / "spool")},
            "sources": [{"name": "a", "address": "127.0.0.1"}],
        },
    )


def service(tmp_path: Path) -> ShapingService:
    return ShapingService(one_source(tmp_path))


def push_backs(svc: ShapingService, n: int, text: str = "busy", first: int = 0) -> None:
    """``n`` changes: the first push-back of ``n`` new sites (a "down" each)."""
    for i in range(first, first + n):
        svc.broker.report("a", f"site{i}", 451, "4.3.0", text)


def test_the_changes_op_pages_with_after_and_limit(tmp_path: Path) -> None:
    svc = service(tmp_path)
    empty = svc.command({"op": "changes"})
    assert empty == {"epoch": svc.broker.epoch, "changes": [], "last_seq": 0, "gap": False}
    push_backs(svc, 7)
    epoch = svc.broker.epoch
    pages, after = [], 0
    while True:
        a = svc.command({"op": "changes", "after": after, "epoch": epoch, "limit": 3})
        assert a["epoch"] == epoch and a["last_seq"] == 7 and a["gap"] is False
        if not a["changes"]:
            break
        pages.append([c["seq"] for c in a["changes"]])
        after = a["changes"][-1]["seq"]
    assert pages == [[1, 2, 3], [4, 5, 6], [7]]
    # The default page takes them all; a changed answer does not change the log.
    a = svc.command({"op": "changes", "after": 0, "epoch": None})
    assert [c["site"] for c in a["changes"]] == [f"site{i}" for i in range(7)]
    a["changes"][0]["site"] = "x"
    assert svc.broker.changes[0]["site"] == "site0"
    json.dumps(a)  # it crosses the channel as it is


def test_bad_arguments_are_refused_naming_the_field(tmp_path: Path) -> None:
    svc = service(tmp_path)
    bad: list[tuple[dict[str, Any], str]] = [
        ({"after": -1}, "after: must be a whole number of at least 0"),
        ({"after": "3"}, "after: must be a whole number"),
        ({"after": True}, "after: must be a whole number"),
        ({"limit": 0}, "limit: must be a whole number from 1 to 2000"),
        ({"limit": CHANGE_LOG_SIZE + 1}, "limit: must be a whole number from 1 to 2000"),
        ({"limit": 2.5}, "limit: must be"),
        ({"epoch": 5}, "epoch: must be a string or null"),
    ]
    for args, msg in bad:
        with pytest.raises(CommandError, match=f"^{msg}"):
            svc.command({"op": "changes", **args})
    assert svc.command({"op": "changes", "limit": CHANGE_LOG_SIZE})["changes"] == []


def test_gap_on_a_new_epoch_and_restored_rates_are_no_change(tmp_path: Path) -> None:
    svc = service(tmp_path)
    svc.broker.report("a", "yahoo", 421, "4.7.0", "[TSS04] slow down")  # rate lowered 1 h
    push_backs(svc, 3)
    old = svc.command({"op": "changes", "after": 0, "epoch": None})
    assert old["last_seq"] == 5 and not old["gap"]  # the action, its rate, 3 push-backs
    svc.save()
    again = ShapingService(svc.cfg)  # a restart: the lowered rate comes back
    assert (
        again.broker.pair("a", "yahoo").state.rate
        < again.broker.pair("a", "yahoo").state.limit_rate
    )
    assert again.broker.epoch != old["epoch"]
    again.broker.status()  # looks at every pair's rate: the restored one is no change
    a = again.command({"op": "changes", "after": 5, "epoch": old["epoch"]})
    assert a == {"epoch": again.broker.epoch, "changes": [], "last_seq": 0, "gap": True}
    push_backs(again, 2, first=3)  # sites the first broker did not see
    # The old epoch's position means nothing here: the answer starts at seq 1.
    a = again.command({"op": "changes", "after": 1, "epoch": old["epoch"]})
    assert [c["seq"] for c in a["changes"]] == [1, 2] and a["gap"] is True
    ok = again.command({"op": "changes", "after": 1, "epoch": a["epoch"]})
    assert [c["seq"] for c in ok["changes"]] == [2] and ok["gap"] is False
    # A reader sending no epoch, with a position beyond the log: from the start too.
    a = again.command({"op": "changes", "after": 5, "epoch": None})
    assert [c["seq"] for c in a["changes"]] == [1, 2] and a["gap"] is True


def test_gap_after_overflow(tmp_path: Path) -> None:
    svc = service(tmp_path)
    push_backs(svc, CHANGE_LOG_SIZE + 100)
    epoch = svc.broker.epoch
    assert len(svc.broker.changes) == CHANGE_LOG_SIZE and svc.broker.changes[0]["seq"] == 101
    a = svc.command({"op": "changes", "after": 0, "epoch": epoch, "limit": 10})
    assert a["gap"] is True and [c["seq"] for c in a["changes"]] == list(range(101, 111))
    assert svc.command({"op": "changes", "after": 99, "epoch": epoch})["gap"] is True
    a = svc.command({"op": "changes", "after": 100, "epoch": epoch, "limit": 2})
    assert a["gap"] is False and [c["seq"] for c in a["changes"]] == [101, 102]
    assert a["last_seq"] == CHANGE_LOG_SIZE + 100


async def test_a_page_fits_the_channel_and_the_reader_pages_on(tmp_path: Path) -> None:
    svc = service(tmp_path)
    push_backs(svc, 600, "x" * 180)  # long reasons: 500 of them exceed a channel line
    assert len(json.dumps(list(svc.broker.changes)[:500])) > MAX_LINE
    server = BrokerServer(svc.broker, str(tmp_path / "broker.sock"), svc.command)
    await server.start()
    client = BrokerClient(server.path)
    await client.connect()
    try:
        got: list[int] = []
        sizes = []
        after, epoch = 0, None
        while True:
            a = await client.command(op="changes", after=after, epoch=epoch)
            assert not a["gap"]
            if not a["changes"]:
                break
            sizes.append(len(a["changes"]))
            got += [c["seq"] for c in a["changes"]]
            after, epoch = a["changes"][-1]["seq"], a["epoch"]
        assert got == list(range(1, 601)) and max(sizes) < 500 and len(sizes) > 2
        # The channel is still up: the worker's own asks are answered.
        choice, _ = await client.choose("p", [("a", 1)], "wait", "lab", None, 1)
        assert choice.ok and client.connected
    finally:
        await client.close()
        await server.stop()
