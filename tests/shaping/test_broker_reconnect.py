"""A worker whose connection to the broker drops keeps delivering under conservative
local limits (one connection per (source, site), a low message rate), answers
operator commands with a clear error at once, and reconnects when the broker is back.

The broker's side is cut for real: the client talks to the broker through a small
Unix-socket relay that the test kills (every connection aborted, the socket gone)
and starts again, as when the supervisor's broker restarts."""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path

import pytest

from postwarden.metrics import Metrics
from postwarden.shaping.channel import BrokerClient, BrokerServer, BrokerUnavailable
from postwarden.shaping.fallback import LocalLimits
from tests.shaping.test_channel import POOL, broker
from tests.waiting import eventually


class Relay:
    """Unix socket ``path`` → ``target``; :meth:`kill` cuts everything."""

    def __init__(self, path: str, target: str) -> None:
        self.path, self.target = path, target
        self.server: asyncio.AbstractServer | None = None
        self.writers: list[asyncio.StreamWriter] = []
        self.accepted = 0

    async def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        self.server = await asyncio.start_unix_server(self._serve, self.path)

    async def _serve(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self.accepted += 1
        ur, uw = await asyncio.open_unix_connection(self.target)
        self.writers += [w, uw]

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await src.read(65536):
                    dst.write(data)
            dst.close()

        await asyncio.gather(pipe(r, uw), pipe(ur, w))

    async def kill(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None
        for w in self.writers:
            w.transport.abort()
        self.writers.clear()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


def test_local_limits_are_never_unlimited() -> None:
    lim = LocalLimits(connections=1, rate=1.0)
    c = lim.choose(["a", "b"], "gmail", 5, now=0.0)
    assert c.ok and c.source == "a" and c.metered and c.tokens == 1
    c2 = lim.choose(["a", "b"], "gmail", 5, now=0.0)
    assert c2.ok and c2.source == "b"  # a's slot at gmail is taken
    c3 = lim.choose(["a", "b"], "gmail", 5, now=0.0)
    assert not c3.ok and c3.kind == "connection_limit" and c3.retry_at > 0
    assert lim.choose(["a"], "yahoo", 1, now=0.0).ok  # another site, another slot
    g = lim.take("a", "gmail", 10, now=0.1)
    assert not g.ok and g.kind == "message_rate" and g.retry_at == pytest.approx(1.0)
    assert lim.take("a", "gmail", 10, now=1.0).tokens == 1  # one a second, never a burst
    lim.release("a", "gmail")
    assert lim.choose(["a"], "gmail", 1, now=2.0).ok


async def test_mail_flows_under_local_limits_and_the_client_reconnects(tmp_path: Path) -> None:
    b = broker()
    server = BrokerServer(b, str(tmp_path / "broker.sock"), lambda args: {"echo": args})
    await server.start()
    relay = Relay(str(tmp_path / "relay.sock"), server.path)
    await relay.start()
    metrics = Metrics()
    client = BrokerClient(relay.path, timeout=0.5, metrics=metrics)
    await client.connect()
    try:
        c, _ = await client.choose("p", POOL, "wait", "lab", None, 5)
        assert c.ok and c.source == "a"
        held_before = {k: c.value for k, c in b.balancer.counts.items()}
        await relay.kill()
        await eventually(lambda: not client.connected, 5, "the client to see the loss")
        assert metrics.broker_connected._value.get() == 0

        # Operator commands fail at once, with a catchable error.
        with pytest.raises(BrokerUnavailable):
            await asyncio.wait_for(client.command(op="status"), 0.2)
        # Mail still flows: one local connection per (source, site), one message a second.
        c1, _ = await client.choose("p", POOL, "wait", "other", None, 5)
        assert c1.ok and c1.source == "a" and c1.tokens == 1
        c2, _ = await client.choose("p", POOL, "wait", "other", None, 5)
        assert not c2.ok and c2.kind == "connection_limit"
        g = await client.take("a", "other", 5, None, None)
        assert not g.ok and g.kind == "message_rate"
        # A warming sending domain waits for the broker.
        g = await client.take("a", "other", 1, None, "warm.test")
        assert not g.ok and g.kind == "broker_unavailable"
        await client.release("p", "a", "other", None, sent=1, unused=0)
        assert (await client.choose("p", POOL, "wait", "other", None, 1))[0].ok
        # The slot held on the lost connection is not released to the new one.
        await client.release("p", "a", "lab", None, sent=1, unused=0)
        assert metrics.broker_fallback.labels("choose")._value.get() == 3

        await relay.start()
        # The client's connect can complete before the relay's accept callback has run.
        await eventually(lambda: client.connected and relay.accepted >= 2, 10,
                         "the client to reconnect")  # fmt: skip
        assert relay.accepted == 2
        assert metrics.broker_reconnects._value.get() == 1
        assert metrics.broker_connected._value.get() == 1
        answer = await client.command(op="status")
        assert answer["echo"] == {"op": "status"}
        # The broker answers again: its limit (2 connections at "lab") is back in force.
        got = [(await client.choose("p", POOL, "wait", "lab", None, 1))[0] for _ in range(3)]
        assert [x.ok for x in got] == [True, True, False]
        held = {k: c.value for k, c in b.balancer.counts.items()}
        assert held == held_before  # the stale release never reached the broker
    finally:
        await client.close()
        await relay.kill()
        await server.stop()
