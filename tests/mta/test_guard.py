"""The session guard's tables (mta.guard): slots per client address that a holder gives
back when it goes, AUTH failures in a sliding window and the lockouts they start; and
the same tables served by the broker over a real Unix socket."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from postwarden.config import SourceConfig
from postwarden.mta.guard import AuthLockout, GuardTables, LockoutRule, SessionSlots
from postwarden.shaping.broker import Broker
from postwarden.shaping.channel import BrokerClient, BrokerServer
from postwarden.shaping.rules import shipped_rules


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_slots_are_limited_per_listener_and_address_and_freed_with_their_holder() -> None:
    t = SessionSlots()
    w0, w1 = object(), object()
    assert [t.open(w0, i, "smtp", "10.0.0.1", 3) for i in (1, 2)] == [True, True]
    assert t.open(w1, 1, "smtp", "10.0.0.1", 3)  # ids are per holder
    assert not t.open(w1, 2, "smtp", "10.0.0.1", 3)  # refused: nothing taken
    assert t.count("smtp", "10.0.0.1") == 3
    assert t.open(w1, 3, "inbound", "10.0.0.1", 3) and t.open(w1, 4, "smtp", "10.0.0.2", 3)
    t.close(w1, 2)  # never taken: no effect
    assert t.count("smtp", "10.0.0.1") == 3
    t.close(w0, 1)
    assert t.count("smtp", "10.0.0.1") == 2
    t.drop_holder(w0)  # a worker that died
    assert t.count("smtp", "10.0.0.1") == 1
    t.close(w0, 2)  # after its holder went: ignored
    assert t.count("smtp", "10.0.0.1") == 1
    t.drop_holder(w1)
    assert t.count("smtp", "10.0.0.1") == t.count("inbound", "10.0.0.1") == 0


def test_lockout_after_failures_within_the_window_then_it_ends() -> None:
    clock = Clock()
    lock = AuthLockout(clock)
    rule = LockoutRule(failures=3, window=60.0, lockout=300.0)
    assert lock.failed("a", rule) == (0.0, False)
    clock.now += 61  # the first one is out of the window by the third
    assert lock.failed("a", rule) == (0.0, False)
    assert lock.failed("a", rule) == (0.0, False)
    assert lock.locked_for("a") == 0
    assert lock.failed("b", rule) == (0.0, False)  # another address counts apart
    assert lock.failed("a", rule) == (300.0, True)
    clock.now += 100
    assert lock.locked_for("a") == 200.0 and lock.locked_for("b") == 0
    assert lock.failed("a", rule) == (200.0, False)  # no second lockout while locked
    clock.now += 200
    assert lock.locked_for("a") == 0
    # The count starts again after a lockout.
    assert lock.failed("a", rule) == (0.0, False)


def test_lockout_tables_stay_bounded_under_a_spray_of_addresses() -> None:
    clock = Clock()
    lock = AuthLockout(clock)
    rule = LockoutRule(failures=5, window=10.0, lockout=30.0)
    for i in range(30_000):
        clock.now += 0.01
        lock.failed(f"10.{i // 65536}.{i // 256 % 256}.{i % 256}", rule)
    assert lock.addresses() <= 10_000 + 1_000


def test_malformed_requests_are_refused() -> None:
    t = GuardTables()
    with pytest.raises(KeyError):
        t.handle(object(), {"op": "session_open", "ip": "x"})
    with pytest.raises(ValueError):
        t.handle(object(), {"op": "auth_failed", "ip": "x", "failures": 0, "window": 1,
                            "lockout": 1})  # fmt: skip


async def test_broker_serves_the_tables_and_a_dead_worker_gives_its_slots_back(
    tmp_path: Path,
) -> None:
    broker = Broker(shipped_rules(), sources={"a": SourceConfig("a", "10.0.0.1")})
    server = BrokerServer(broker, str(tmp_path / "broker.sock"))
    await server.start()
    w0, w1 = BrokerClient(server.path), BrokerClient(server.path)
    await w0.connect()
    await w1.connect()
    try:
        opened = [
            (await w.guard_call("session_open", slot=s, listener="smtp", ip="10.1.1.1", limit=3))[
                "ok"
            ]
            for w, s in ((w0, 1), (w0, 2), (w1, 1), (w1, 2))
        ]
        assert opened == [True, True, True, False]
        w1.guard_notify("session_close", slot=1)
        a = await w1.guard_call("session_open", slot=3, listener="smtp", ip="10.1.1.1", limit=3)
        assert a["ok"]  # the answer follows the close on the same connection
        rule = {"failures": 2, "window": 60.0, "lockout": 900.0}
        assert not (await w0.guard_call("auth_failed", ip="10.9.9.9", **rule))["new"]
        a = await w1.guard_call("auth_failed", ip="10.9.9.9", **rule)
        assert a["new"] and a["locked_for"] == 900.0  # two workers, one count
        assert (await w0.guard_call("auth_check", ip="10.9.9.9"))["locked_for"] > 800
        assert (await w0.guard_call("auth_check", ip="10.9.9.8"))["locked_for"] == 0
        # w0 dies: its two slots come back, w1's stays.
        await w0.close()
        for _ in range(100):
            if server.guard.sessions.count("smtp", "10.1.1.1") == 1:
                break
            await asyncio.sleep(0.01)
        assert server.guard.sessions.count("smtp", "10.1.1.1") == 1
    finally:
        await w0.close()
        await w1.close()
        await server.stop()
