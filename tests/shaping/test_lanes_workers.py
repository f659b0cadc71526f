"""Priority and slots across workers (issue 17, item 3), end to end: `postwarden serve`
with 2 workers, three sources weighted 3:2:1, a site with one connection per source.
Bulk mail fills every slot from both workers; transactional mail submitted then (to
another domain of the site, over several SMTP sessions, so in either worker) is
delivered within seconds, long before the bulk backlog is through. Then a backlog in
both workers at a site with several connections per source: the pool's weights hold
within 5 points (idle connections give their slot to the worker that waits)."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest

from postwarden.lab import Lab
from postwarden.queue.shards import shard_number, shard_paths
from tests.queue.test_durability import serve
from tests.shaping.recsink import RecordingSink
from tests.waiting import eventually

# The latencies checked are seconds against tens of seconds before: they hold with
# the parallel part's load; the weights test runs alone.

SOURCES = {"a": ("127.0.2.1", 3), "b": ("127.0.2.2", 2), "c": ("127.0.2.3", 1)}
RULES = """
[sites.gmail]
mx_suffixes = ["gm.test"]
connection_limit = 1
max_message_rate = "600/min"
max_messages_per_connection = 100
[sites.yahoo]
mx_suffixes = ["ya.test"]
connection_limit = 3
max_messages_per_connection = 4
"""


async def submit(port: int, rcpts: list[str], sessions: int, bulk: bool) -> None:
    it = iter(rcpts)
    prio = "X-Postwarden-Priority: bulk\r\n" if bulk else ""

    async def one() -> None:
        async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False) as smtp:
            for r in it:
                msg = f"Subject: s\r\nTo: {r}\r\n{prio}\r\nx\r\n".encode()
                await smtp.sendmail("a@sender.test", [r], msg)

    await asyncio.gather(*(one() for _ in range(sessions)))


@pytest.fixture
def config(tmp_path: Path, lab: Lab, subprocess_config: Any) -> Any:
    def make(
        sink: RecordingSink, sources: dict[str, tuple[str, int]] = SOURCES, idle: str = "5s"
    ) -> tuple[Path, int]:
        rules = tmp_path / "shaping.toml"
        rules.write_text(RULES, encoding="utf-8")
        return subprocess_config(  # type: ignore[no-any-return]
            {
                "server": {"workers": 2},
                "delivery": {
                    "mx_port": sink.port,
                    "max_connections_per_domain": 20,
                    "timeouts": {"idle": idle},  # the default: a connection idles 5 s
                },
                "sources": [{"name": n, "address": ip} for n, (ip, _w) in sources.items()],
                "pools": [
                    {
                        "name": "main",
                        "members": [{"source": n, "weight": w} for n, (_ip, w) in sources.items()],
                    }
                ],
                "shaping": {"rules_file": str(rules), "default_pool": "main"},
            }
        )

    return make


@pytest.mark.timeout(240)
async def test_transactional_overtakes_bulk_of_the_other_worker(
    tmp_path: Path, lab: Lab, config: Any
) -> None:
    sink = RecordingSink("127.0.3.1")
    await sink.start()
    lab.dns.add("mx1.gm.test", "A", sink.host)
    for d in ("bulk.test", "tx.test"):
        lab.dns.add(d, "MX", "10 mx1.gm.test.")
    path, port = config(sink)
    try:
        async with serve([], path, port, tmp_path / "serve.log"):
            n_bulk = 1200  # 40 s at 30/s (three sources at 10/s each)
            bulk = asyncio.create_task(
                submit(port, [f"b{i}@bulk.test" for i in range(n_bulk)], 4, bulk=True)
            )

            def bulk_done() -> int:
                return sum(1 for m in sink.rec.messages if m.rcpts[0].endswith("@bulk.test"))

            # Every slot busy with bulk (both workers may hold some of it); each
            # connection would carry 100 messages, ten seconds, before it ends.
            await eventually(lambda: bulk_done() >= 60, 60, "bulk mail under way")
            await bulk
            sent_at: dict[str, float] = {}
            rcpts = [f"t{i}@tx.test" for i in range(8)]
            for r in rcpts:
                sent_at[r] = time.time()
            await submit(port, rcpts, 8, bulk=False)
            await eventually(
                lambda: sum(1 for m in sink.rec.messages if m.rcpts[0] in sent_at) == len(rcpts),
                90,
                "the transactional mail",
            )
            at_tx = bulk_done()
            late = {
                m.rcpts[0]: round(m.at - sent_at[m.rcpts[0]], 2)
                for m in sink.rec.messages
                if m.rcpts[0] in sent_at
            }
            # Within seconds, with most of the bulk backlog still waiting.
            assert max(late.values()) < 4.0, late
            assert at_tx < n_bulk - 600, (at_tx, late)
            # Never more than one connection per source, across both workers.
            assert sink.rec.max_concurrent() <= 3
    finally:
        await sink.stop()


@pytest.mark.serial
@pytest.mark.long(13)
@pytest.mark.timeout(240)
async def test_weights_hold_with_two_workers(tmp_path: Path, lab: Lab, config: Any) -> None:
    sink = RecordingSink("127.0.3.2")
    await sink.start()
    lab.dns.add("mx1.ya.test", "A", sink.host)
    lab.dns.add("ya-one.test", "MX", "10 mx1.ya.test.")
    path, port = config(sink)
    mx_port = sink.port
    n = 360
    try:
        async with serve([], path, port, tmp_path / "serve.log"):
            # A backlog in both workers (the MX was down while the mail came in).
            await sink.stop()
            await submit(port, [f"y{i}@ya-one.test" for i in range(n)], 8, bulk=True)
            await sink.start(mx_port)
            await eventually(lambda: len(sink.rec.messages) >= n, 120, "the backlog")
        got = sink.rec.by_peer()
        total = sum(w for _ip, w in SOURCES.values())
        shares = {name: round(got.get(ip, 0) / n, 3) for name, (ip, _w) in SOURCES.items()}
        for name, (_ip, weight) in SOURCES.items():
            assert abs(shares[name] - weight / total) <= 0.05, shares
    finally:
        await sink.stop()


def worker_of(spool: Path, msg_id: str) -> int:
    """Which worker accepted a message: the spool shard whose event log has it."""
    for shard in shard_paths(spool):
        db = sqlite3.connect(f"file:{shard / 'index.db'}?mode=ro", uri=True)
        try:
            if db.execute("SELECT 1 FROM events WHERE msg_id = ?", (msg_id,)).fetchone():
                return shard_number(spool, shard)
        except sqlite3.OperationalError as exc:
            # A worker still starting has created its index but not its tables yet.
            if "no such table" not in str(exc):
                raise
        finally:
            db.close()
    raise AssertionError(f"{msg_id} in no shard")


async def send_one(port: int, rcpt: str) -> str:
    """One message in a session of its own; the spool's id for it."""
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False) as smtp:
        _errors, reply = await smtp.sendmail(
            "a@sender.test", [rcpt], f"Subject: s\r\nTo: {rcpt}\r\n\r\nx\r\n".encode()
        )
    return reply.split("queued as ")[1].split()[0]


async def test_an_idle_connection_gives_its_slot_to_the_other_worker(
    tmp_path: Path, lab: Lab, config: Any
) -> None:
    sink = RecordingSink("127.0.3.3")
    await sink.start()
    lab.dns.add("mx1.gm.test", "A", sink.host)
    for d in ("one.test", "two.test"):
        lab.dns.add(d, "MX", "10 mx1.gm.test.")
    # One source, one connection to the site: whoever holds it holds the site.
    path, port = config(sink, {"a": SOURCES["a"]})
    spool = tmp_path / "spool"
    try:
        async with serve([], path, port, tmp_path / "serve.log"):
            first = worker_of(spool, await send_one(port, "first@one.test"))
            await eventually(lambda: len(sink.rec.messages) == 1, 30, "the first message")
            # Its connection now idles (delivery.timeouts.idle: 5 s) in that worker.
            # Sessions until one reaches the other worker: its mail goes at once.
            for i in range(40):
                sent = time.time()
                rcpt = f"n{i}@two.test"
                if worker_of(spool, await send_one(port, rcpt)) != first:
                    break
                await eventually(
                    lambda r=rcpt: any(m.rcpts == [r] for m in sink.rec.messages), 30, rcpt
                )
            else:
                raise AssertionError("every session reached the same worker")
            await eventually(lambda: any(m.rcpts == [rcpt] for m in sink.rec.messages), 30, rcpt)
            got = next(m.at for m in sink.rec.messages if m.rcpts == [rcpt])
            assert got - sent < 2.0, round(got - sent, 2)
            assert sink.rec.max_concurrent() <= 1
    finally:
        await sink.stop()
