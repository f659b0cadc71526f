"""The broker served over a real Unix socket: two clients share one limit, a client
that disconnects frees its slots, answers reach the broker, operator commands are
answered, a bad request is refused, a dead broker means no."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from postwarden.config import SourceConfig
from postwarden.shaping.broker import Broker
from postwarden.shaping.channel import BrokerClient, BrokerServer
from postwarden.shaping.rules import parse_rules, shipped_rules

RULES = parse_rules(
    '[sites.lab]\nmx_suffixes = ["lab.test"]\nconnection_limit = 2\nmax_message_rate = "60/min"\n',
    "t.toml",
    shipped_rules(),
)
POOL: list[tuple[str, int]] = [("a", 1)]


def broker() -> Broker:
    return Broker(RULES, sources={"a": SourceConfig("a", "10.0.0.1")})


async def test_two_workers_share_one_limit(tmp_path: Path) -> None:
    b = broker()
    server = BrokerServer(b, str(tmp_path / "broker.sock"), lambda args: {"echo": args})
    await server.start()
    w0, w1 = BrokerClient(server.path), BrokerClient(server.path)
    await w0.connect()
    await w1.connect()
    try:
        got = [(await w.choose("p", POOL, "wait", "lab", None, 5))[0] for w in (w0, w1, w1)]
        assert [c.ok for c in got] == [True, True, False]
        assert got[0].source == "a" and got[0].metered and got[0].tokens == 1  # 60/min
        assert got[2].kind == "connection_limit"
        assert 0 < got[2].retry_at - asyncio.get_running_loop().time() <= 0.25
        g = await w0.take("a", "lab", 5, None, None)
        assert not g.ok and g.kind == "message_rate"  # the second's token is spent
        # w0 dies: its slot comes back.
        await w0.close()
        for _ in range(50):
            if (await w1.choose("p", POOL, "wait", "lab", None, 1))[0].ok:
                break
            await asyncio.sleep(0.02)
        else:
            raise AssertionError("the dead worker's slot was not freed")
        await w1.release("p", "a", "lab", None, sent=3, unused=0)
        assert abs(b.balancer.sent("p", "lab", "a", b.clock()) - 3) < 0.05  # barely decayed
        # A reported answer suspends the pair for everyone.
        w1.report_outcome(
            source="a", site="gmail", code=421, enhanced="4.7.28", text="slow down", deferred=1
        )
        c, _ = await w1.choose("p", POOL, "wait", "gmail", None, 1)
        assert not c.ok and c.kind == "suspended"
        assert c.retry_at - asyncio.get_running_loop().time() > 1700
        answer = await w1.command(op="status")
        assert (answer["ok"], answer["echo"]) == (True, {"op": "status"})
    finally:
        await w1.close()
        await server.stop()


async def test_a_bad_request_is_refused_and_the_connection_lives(tmp_path: Path) -> None:
    server = BrokerServer(broker(), str(tmp_path / "broker.sock"))
    await server.start()
    reader, writer = await asyncio.open_unix_connection(server.path)
    try:

        async def ask(line: bytes) -> dict[str, Any]:
            writer.write(line + b"\n")
            answer: dict[str, Any] = json.loads(await reader.readline())
            return answer

        assert (await ask(b"{not json"))["ok"] is False
        a = await ask(json.dumps({"id": 1, "op": "explode"}).encode())
        assert a == {"id": 1, "ok": False, "reason": "unknown op 'explode'"}
        a = await ask(json.dumps({"id": 2, "op": "command", "args": {}}).encode())
        assert a == {"id": 2, "ok": False, "reason": "no commands here"}
        a = await ask(
            json.dumps(
                {
                    "id": 3,
                    "op": "take",
                    "source": "a",
                    "site": "lab",
                    "want": 1,
                    "domain": None,
                    "sending_domain": None,
                }
            ).encode()
        )
        assert a["id"] == 3 and a["ok"] and a["tokens"] == 1
    finally:
        writer.close()
        await server.stop()


async def test_no_broker_means_no(tmp_path: Path) -> None:
    server = BrokerServer(broker(), str(tmp_path / "broker.sock"))
    await server.start()
    client = BrokerClient(server.path, timeout=0.5)
    await client.connect()
    await server.stop()
    # The server is gone but this connection may linger; stop answering it for sure.
    await client.close()
    c, _ = await client.choose("p", POOL, "wait", "lab", None, 1)
    assert not c.ok and c.kind == "broker_unavailable"
    g = await client.take("a", "lab", 1, None, None)
    assert not g.ok and g.reason.startswith("broker unavailable")
