"""One source's refusal parks only its share (issue 17, items 1, 2 and 9): a real
appliance delivers from three sources in a 3:2:1 pool to a recording MX on loopback
that refuses one source's greeting (Yahoo's TS03) or lets one source's warming cap
run out mid-burst; what the MX saw and what the spool holds are the evidence."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP

from postwarden.lab import Lab
from postwarden.queue.admin import QueueAdmin
from tests.conftest import ApplianceFactory
from tests.shaping.recsink import Conn, RecordingSink, _Handler
from tests.shaping.test_lab_shaping import send, shaped
from tests.waiting import eventually

SRC_A, SRC_B, SRC_C = "127.0.7.1", "127.0.7.2", "127.0.7.3"
TS03 = "421 4.7.0 [TS03] Messages from 127.0.7.1 temporarily deferred"
TS03_RULE = (
    '[[responses]]\nname = "lab-ts03"\naction = "suspend"\nduration = "1h"\n'
    'text = "TS03"\nsites = ["gmail"]\n'
)


class GreetingSink(RecordingSink):
    """A recording MX that can refuse a client's greeting (``greet(peer)`` returns the
    reply, None to greet as usual); refused connections are recorded too."""

    def __init__(self, host: str) -> None:
        super().__init__(host)
        self.greet: Callable[[str], str | None] = lambda _peer: None
        self.refused: list[str] = []

    async def start(self, port: int = 0) -> None:
        import asyncio

        rec, sink = self.rec, self
        handler = _Handler(rec)

        class Proto(SMTP):
            def connection_made(self, transport: Any) -> None:
                peer = transport.get_extra_info("peername")[0]
                self._rec_conn = Conn(peer, time.time())
                rec.conns.append(self._rec_conn)
                self._refused = sink.greet(peer)
                if self._refused is not None:
                    sink.refused.append(peer)
                    transport.write(f"{self._refused}\r\n".encode())
                    transport.close()
                    return
                super().connection_made(transport)

            def connection_lost(self, error: Exception | None) -> None:
                self._rec_conn.closed = time.time()
                if self._refused is None:
                    super().connection_lost(error)

        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(
            lambda: Proto(handler, hostname="mx.rec.test", ident="rec"), self.host, port
        )
        self.port = self.server.sockets[0].getsockname()[1]


@pytest.fixture
async def sink(lab: Lab) -> AsyncIterator[GreetingSink]:
    s = GreetingSink("127.0.8.1")
    await s.start()
    lab.dns.add("mx1.gm.test", "A", s.host)
    lab.dns.add("gm-one.test", "MX", "10 mx1.gm.test.")
    yield s
    await s.stop()


def three_sources(
    tmp_path: Path, sink: RecordingSink, rules: str = "", overflow: str = "spill"
) -> dict[str, Any]:
    """Sources a, b, c in the pool "main" (weights 3:2:1), the sink as site "gmail"."""
    path = tmp_path / "shaping.toml"
    path.write_text('[sites.gmail]\nmx_suffixes = ["gm.test"]\n' + rules, encoding="utf-8")
    return {
        "delivery": {"mx_port": sink.port, "max_connections_per_domain": 6},
        "sources": [
            {"name": n, "address": a, "ehlo": f"{n}.out.test"}
            for n, a in (("a", SRC_A), ("b", SRC_B), ("c", SRC_C))
        ],
        "pools": [
            {
                "name": "main",
                "overflow": overflow,
                "members": [
                    {"source": "a", "weight": 3},
                    {"source": "b", "weight": 2},
                    {"source": "c", "weight": 1},
                ],
            }
        ],
        "shaping": {"rules_file": str(path), "default_pool": "main"},
    }


def waiting(app: Any) -> list[dict[str, Any]]:
    admin = QueueAdmin(app.cfg.spool.path)
    try:
        return [r for r in admin.list(limit=10_000) if r["state"] != "active"]
    finally:
        admin.close()


async def backlog(app: Any, sink: RecordingSink, rcpts: list[str]) -> None:
    """Accept ``rcpts`` while the MX is down (a backlog, as a busy sender has), then
    bring it back: the queue is full when sending starts."""
    port = sink.port
    await sink.stop()
    await send(app.smtp_addresses[0][1], rcpts, sessions=6)
    sink.rec.conns.clear()
    await sink.start(port)


def delivered(sink: RecordingSink) -> list[str]:
    return [r for m in sink.rec.messages for r in m.rcpts]


async def test_ts03_greeting_moves_the_share_to_the_others_and_is_one_event(
    tmp_path: Path,
    lab: Lab,
    sink: GreetingSink,
    appliance: ApplianceFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="postwarden.shaping")
    cfg = three_sources(tmp_path, sink, TS03_RULE)
    cfg["queue"] = {"retry_initial": "1h"}  # a counted deferral would not come back
    cfg["shaping"].update(pause_min_volume=5)
    app, svc = await shaped(appliance, cfg)
    # a (weight 3) warms, on a plan with room: its health and pause are watched.
    svc.command({"op": "warming_start", "target": "source", "name": "a",
                 "plan": {"name": "big", "days": [10_000]}})  # fmt: skip
    sink.greet = lambda peer: TS03 if peer == SRC_A else None
    n = 90
    rcpts = [f"r{i}@gm-one.test" for i in range(n)]
    await send(app.smtp_addresses[0][1], rcpts, sessions=6)
    # Item 1: a's share goes to b and c within seconds; nothing waits in the spool.
    await eventually(lambda: len(delivered(sink)) >= n, 20, "every message through b and c")
    assert sorted(delivered(sink)) == sorted(rcpts)  # each once
    by_peer = sink.rec.by_peer()
    assert set(by_peer) == {SRC_B, SRC_C}, by_peer
    await eventually(lambda: not waiting(app), 5, "an empty queue")
    assert sink.refused and set(sink.refused) == {SRC_A}
    # Item 2: however many connections met the greeting, one action, one log line.
    status = await app.shaper.backend.command(op="status")
    ts03 = [a for a in status["actions"] if a["rule"] == "lab-ts03"]
    assert len(ts03) == 1 and ts03[0]["source"] == "a", status["actions"]
    lines = [r for r in caplog.records if "event=shaping_action" in r.getMessage()]
    assert len(lines) == 1, [r.getMessage() for r in lines]
    # The refusals are throttling, not failed attempts: health intact, no auto-pause.
    p = svc.book.progress("source:a")
    assert not p["paused"]
    assert p["health"]["tier"] == "excellent" and p["health"]["window"]["attempted"] == 0
    assert p["health"]["window"]["throttled"] >= 1
    assert sum(
        app.metrics.shaping_waits.labels(k)._value.get() for k in ("suspended", "no_source")
    ) == 0  # nothing was held: b and c carried it all  # fmt: skip


async def test_a_warming_cap_mid_burst_with_spill_defers_nothing(
    tmp_path: Path, lab: Lab, sink: GreetingSink, appliance: ApplianceFactory
) -> None:
    cfg = three_sources(tmp_path, sink, "max_messages_per_connection = 5\n", overflow="spill")
    app, svc = await shaped(appliance, cfg)
    svc.command({"op": "warming_start", "target": "source", "name": "c",
                 "plan": {"name": "tiny", "days": [6, 12]}})  # fmt: skip
    n = 120
    rcpts = [f"s{i}@gm-one.test" for i in range(n)]
    await backlog(app, sink, rcpts)
    await eventually(lambda: len(delivered(sink)) >= n, 20, "every message delivered")
    assert sorted(delivered(sink)) == sorted(rcpts)
    by_peer = sink.rec.by_peer()
    assert by_peer.get(SRC_C, 0) == 6, by_peer  # its cap, no more
    await eventually(lambda: not waiting(app), 5, "an empty queue")
    p = svc.book.progress("source:c")
    assert (p["sent_today"], p["remaining"]) == (6, 0)


async def test_a_warming_cap_mid_burst_with_wait_parks_about_its_share(
    tmp_path: Path, lab: Lab, sink: GreetingSink, appliance: ApplianceFactory
) -> None:
    cfg = three_sources(tmp_path, sink, "max_messages_per_connection = 5\n", overflow="wait")
    app, svc = await shaped(appliance, cfg)
    svc.command({"op": "warming_start", "target": "source", "name": "c",
                 "plan": {"name": "tiny", "days": [6, 12]}})  # fmt: skip
    n = 120
    rcpts = [f"w{i}@gm-one.test" for i in range(n)]
    await backlog(app, sink, rcpts)

    def settled() -> bool:
        left = waiting(app)
        return len(delivered(sink)) + len(left) >= n and all(
            (r["wait_reason"] or "").startswith("warming_cap") for r in left
        )

    await eventually(settled, 20, "everything delivered or waiting for c's next day")
    left = waiting(app)
    by_peer = sink.rec.by_peer()
    assert by_peer.get(SRC_C, 0) <= 6, by_peer
    # c's share is a sixth (20); what waits is about that, never most of the burst.
    assert 0 < len(left) <= 2 * n // 6, (len(left), by_peer)
    assert all(r["next_attempt"] > time.time() + 60 for r in left)  # its next day


async def test_holds_in_memory_count_as_waits_once_per_job(
    tmp_path: Path, lab: Lab, sink: GreetingSink, appliance: ApplianceFactory
) -> None:
    # One source: its suspension (3 s) parks the whole queue, in memory (< 60 s).
    rules = (
        '[[responses]]\nname = "lab-421"\naction = "suspend"\nduration = "3s"\n'
        'code = 421\nenhanced = "4.7.28"\nsites = ["gmail"]\n'
    )
    cfg = three_sources(tmp_path, sink, rules)
    cfg["pools"][0]["members"] = [{"source": "a", "weight": 1}]
    app, _svc = await shaped(appliance, cfg)
    refusals = iter([True])
    sink.rec.answer = lambda peer, local: (
        "421 4.7.28 unusual rate" if next(refusals, False) else None
    )
    waits = app.metrics.shaping_waits.labels("suspended")
    before = waits._value.get()
    n = 30
    rcpts = [f"h{i}@gm-one.test" for i in range(n)]
    await send(app.smtp_addresses[0][1], rcpts, sessions=3)
    await eventually(lambda: waits._value.get() > before, 10, "the hold counted")
    await eventually(lambda: len(delivered(sink)) >= n, 20, "everything after the suspension")
    assert sorted(delivered(sink)) == sorted(rcpts)
    # Each held recipient once, however often the queue met the refusal.
    assert 0 < waits._value.get() - before <= n
    assert not waiting(app)  # held in memory, never sent back to the spool
