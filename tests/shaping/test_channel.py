"""The broker served over a real Unix socket: two clients share one limit, a client
that disconnects frees its slots, answers reach the broker, a dead broker means no."""

from __future__ import annotations

import asyncio
from pathlib import Path

from postwarden.shaping.broker import Broker
from postwarden.shaping.channel import BrokerClient, BrokerServer
from postwarden.shaping.rules import parse_rules, shipped_rules

RULES = parse_rules(
    '[sites.lab]\nmx_suffixes = ["lab.test"]\nconnection_limit = 2\n', "t.toml", shipped_rules()
)


async def test_two_workers_share_one_limit(tmp_path: Path) -> None:
    server = BrokerServer(Broker(RULES), str(tmp_path / "broker.sock"))
    await server.start()
    w0, w1 = BrokerClient(server.path), BrokerClient(server.path)
    await w0.connect()
    await w1.connect()
    try:
        got = [await w.acquire_connection("10.0.0.1", "lab") for w in (w0, w1, w1)]
        assert [g.ok for g in got] == [True, True, False]
        assert got[2].reason == "connection limit"
        # w0 dies: its slot comes back.
        await w0.close()
        for _ in range(50):
            if (await w1.acquire_connection("10.0.0.1", "lab")).ok:
                break
            await asyncio.sleep(0.02)
        else:
            raise AssertionError("the dead worker's slot was not freed")
        # An answer reported by a worker suspends the pair for everyone.
        w1.report("10.0.0.1", "gmail", 421, "4.7.28", "slow down")
        g = await w1.acquire_connection("10.0.0.1", "gmail")
        assert not g.ok and g.reason.startswith("suspended")
        assert g.retry_at - asyncio.get_running_loop().time() > 1700
        pairs = {p["site"]: p for p in await w1.status()}
        assert pairs["gmail"]["suspended_for"] > 1700 and pairs["lab"]["connections"] == 2
    finally:
        await w1.close()
        await server.stop()


async def test_no_broker_means_no(tmp_path: Path) -> None:
    server = BrokerServer(Broker(RULES), str(tmp_path / "broker.sock"))
    await server.start()
    client = BrokerClient(server.path, timeout=0.5)
    await client.connect()
    await server.stop()
    # The server is gone but this connection may linger; stop answering it for sure.
    await client.close()
    g = await client.acquire_connection("10.0.0.1", "lab")
    assert not g.ok and g.reason.startswith("broker unavailable")
