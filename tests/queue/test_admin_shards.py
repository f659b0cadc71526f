"""`QueueAdmin` (and the `postwarden queue` / `events` commands) over a sharded spool.

Every shard is a real spool written by :class:`Spool`, as a worker would leave it.
"""

from __future__ import annotations

import asyncio
import json
import queue
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from postwarden.queue.admin import QueueAdmin
from postwarden.queue.shards import shard_path
from postwarden.queue.spool import Spool
from postwarden.values import Envelope
from tests.conftest import postwarden_cli

BODY = b"Subject: t\r\n\r\nbody\r\n"


async def store(root: Path, shard: int, rcpts: list[str], received_at: float) -> str:
    spool = Spool(shard_path(root, shard), fsync=False)
    await spool.open()
    try:
        env = Envelope("s@sender.test", rcpts, received_at=received_at)
        return (await spool.store(env, BODY)).msg_id
    finally:
        await spool.close()


@dataclass
class Sharded:
    root: Path
    ids: dict[str, str]  # name -> msg id; the name's digit is its shard


@pytest.fixture
async def sharded(tmp_path: Path) -> Sharded:
    """Three shards; the received times interleave across them."""
    ids = {
        "s1": await store(tmp_path, 1, ["a@one.test", "b@one.test"], 100.0),
        "s0": await store(tmp_path, 0, ["c@zero.test"], 150.0),
        "s2": await store(tmp_path, 2, ["d@two.test", "e@two.test"], 120.0),
    }
    return Sharded(tmp_path, ids)


def admin_of(sh: Sharded) -> QueueAdmin:
    return QueueAdmin(sh.root)


async def test_needs_a_shard(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no spool index"):
        QueueAdmin(tmp_path)
    with pytest.raises(FileNotFoundError, match="no spool index"):
        QueueAdmin(tmp_path / "missing")
    # Only a worker k>=1 shard (worker 0's index not there): still a spool.
    msg = await store(tmp_path, 3, ["x@three.test"], 1.0)
    admin = QueueAdmin(tmp_path)
    try:
        assert [r["msg_id"] for r in admin.list()] == [msg]
        assert admin.shards.keys() == {3}
    finally:
        admin.close()


async def test_list_and_summary_merge_shards(sharded: Sharded) -> None:
    admin = admin_of(sharded)
    try:
        assert admin.shards.keys() == {0, 1, 2}
        rows = admin.list()
        # Ordered by received_at across shards, then recipient id.
        assert [r["rcpt"] for r in rows] == [
            "a@one.test", "b@one.test", "d@two.test", "e@two.test", "c@zero.test",
        ]  # fmt: skip
        assert [r["received_at"] for r in rows] == [100.0, 100.0, 120.0, 120.0, 150.0]
        # Recipient ids are per shard: they repeat.
        assert [r["rcpt_id"] for r in rows] == [1, 2, 1, 2, 1]
        # The limit applies to the merged list.
        assert [r["rcpt"] for r in admin.list(limit=3)] == [
            "a@one.test", "b@one.test", "d@two.test",
        ]  # fmt: skip
        assert len(admin.list("queued")) == 5
        assert admin.list("deferred") == [] and admin.list("held") == []
        assert admin.summary() == {"queued": 5, "held": 0, "messages": 3}
    finally:
        admin.close()


async def test_show_finds_the_message_in_its_shard(sharded: Sharded) -> None:
    admin = admin_of(sharded)
    try:
        info = admin.show(sharded.ids["s2"])
        assert info is not None and info["in_queue"] and info["shard"] == 2
        assert info["message"]["id"] == sharded.ids["s2"]
        assert [r["rcpt"] for r in info["recipients"]] == ["d@two.test", "e@two.test"]
        assert [(e["type"], e["shard"]) for e in info["events"]] == [("accepted", 2)] * 2
        assert admin.show("nosuchid") is None
        assert admin.events(msg_id=sharded.ids["s1"], limit=10)[0]["rcpt"] == "a@one.test"
    finally:
        admin.close()


async def test_actions_per_message_and_all(sharded: Sharded) -> None:
    s0, s1, s2 = sharded.ids["s0"], sharded.ids["s1"], sharded.ids["s2"]
    admin = admin_of(sharded)
    try:
        # One message: only its shard changes, although its recipient ids (1, 2) also
        # exist in the other shards.
        assert admin.hold(s1) == 2
        assert {r["rcpt"] for r in admin.list("held")} == {"a@one.test", "b@one.test"}
        assert admin.hold(s1) == 0
        assert admin.hold("nosuchid") == 0
        # Everything: the rest of every shard.
        assert admin.hold(None) == 3
        assert admin.summary()["held"] == 5
        assert admin.flush() == 0  # held recipients are not flushed
        assert admin.release("ALL") == 5
        assert admin.flush(s2) == 2
        assert admin.flush(None) == 5
        assert admin.summary()["held"] == 0

        assert admin.delete(s2) == 2
        gone = admin.show(s2)
        assert gone is not None and not gone["in_queue"] and gone["shard"] == 2
        assert admin.summary() == {"queued": 3, "held": 0, "messages": 2}
        assert admin.delete("ALL") == 3
        assert admin.summary() == {"held": 0, "messages": 0}
        assert admin.list() == []

        evs = admin.events(limit=1000)
        by_msg: dict[str, list[str]] = {}
        for e in evs:
            by_msg.setdefault(e["msg_id"], []).append(e["type"])
        assert (
            by_msg[s1]
            == ["accepted"] * 2
            + ["held"] * 2
            + ["released"] * 2
            + ["flushed"] * 2
            + ["deleted"] * 2
        )
        assert by_msg[s2].count("flushed") == 4 and by_msg[s2][-2:] == ["deleted"] * 2
        assert by_msg[s0] == ["accepted", "held", "released", "flushed", "deleted"]
    finally:
        admin.close()
    # Each shard's own index agrees.
    for k in (0, 1, 2):
        db = sqlite3.connect(shard_path(sharded.root, k) / "index.db")
        try:
            assert db.execute("SELECT COUNT(*) FROM recipients").fetchone() == (0,)
            assert db.execute("SELECT SUM(live) FROM segments").fetchone() == (0,)
        finally:
            db.close()


async def test_events_merged_in_time_order(sharded: Sharded) -> None:
    admin = admin_of(sharded)
    try:
        evs = admin.events(limit=100)
        assert len(evs) == 5 and {e["shard"] for e in evs} == {0, 1, 2}
        assert [e["ts"] for e in evs] == sorted(e["ts"] for e in evs)
        # Stored shard 1, then 0, then 2 (one after the other).
        assert [e["shard"] for e in evs] == [1, 1, 0, 2, 2]
        assert [e["rcpt_id"] for e in evs] == [1, 2, 1, 1, 2]
        assert all(e["type"] == "accepted" and isinstance(e["detail"], dict) for e in evs)
        # The limit applies to the merged log.
        assert admin.events(limit=3) == evs[:3]
        # Per-shard cursors; a single id applies to every shard.
        assert admin.events(after={1: 2, 2: 1}) == [evs[2], evs[4]]
        assert admin.events(after=1) == [evs[1], evs[4]]
        assert admin.last_event_ids() == {0: 1, 1: 2, 2: 2}
        assert admin.last_event_id() == 2
        # tail(after=0) replays everything, in the same order.
        it = admin.tail(poll=0.01, after=0)
        assert [next(it) for _ in range(5)] == evs
    finally:
        admin.close()


async def test_tail_follows_every_shard(sharded: Sharded) -> None:
    root = sharded.root
    seen: queue.Queue[dict[str, Any]] = queue.Queue()
    started = threading.Event()

    def follow() -> None:
        admin = QueueAdmin(root)
        it = admin.tail(poll=0.02)  # from now: none of the fixture's events
        started.set()
        for ev in it:
            seen.put(ev)

    threading.Thread(target=follow, daemon=True).start()
    # tail() takes its cursors ("from now") before it returns, so once ``started`` is
    # set the follower's starting point is fixed: nothing more to wait for.
    assert await asyncio.to_thread(started.wait, 10)
    new2 = await store(root, 2, ["f@two.test"], 200.0)
    new0 = await store(root, 0, ["g@zero.test", "h@zero.test"], 201.0)
    # Another operator holds a message in shard 1.
    other = QueueAdmin(root)
    try:
        assert other.hold(sharded.ids["s1"]) == 2
    finally:
        other.close()
    # A worker that starts later: its new shard is followed from its first event.
    new3 = await store(root, 3, ["i@three.test"], 202.0)

    got = [await asyncio.to_thread(seen.get, True, 10) for _ in range(6)]
    assert [(e["shard"], e["type"], e["msg_id"]) for e in got] == [
        (2, "accepted", new2),
        (0, "accepted", new0),
        (0, "accepted", new0),
        (1, "held", sharded.ids["s1"]),
        (1, "held", sharded.ids["s1"]),
        (3, "accepted", new3),
    ]
    # Nothing more should come, so nothing to wait for: ten polls' worth of time in
    # which a replayed or doubled event would show.
    await asyncio.sleep(0.2)
    assert seen.empty()  # nothing replayed, nothing twice


async def cli(root: Path, *args: str) -> tuple[int, str]:
    return await postwarden_cli(root, *args)


async def test_cli_over_shards(sharded: Sharded) -> None:
    root = sharded.root
    rc, out = await cli(root, "queue", "list", "--json")
    assert rc == 0, out
    assert [r["rcpt"] for r in json.loads(out)] == [
        "a@one.test", "b@one.test", "d@two.test", "e@two.test", "c@zero.test",
    ]  # fmt: skip
    rc, out = await cli(root, "queue", "list")
    assert rc == 0 and "3 message(s) in the queue; recipients: queued 5," in out

    rc, out = await cli(root, "queue", "show", sharded.ids["s2"])
    assert rc == 0 and json.loads(out)["shard"] == 2

    rc, out = await cli(root, "queue", "hold", "ALL")
    assert rc == 0 and "hold: 5 recipient(s)" in out
    rc, out = await cli(root, "queue", "delete", sharded.ids["s0"])
    assert rc == 0 and "delete: 1 recipient(s)" in out

    rc, out = await cli(root, "events", "--json")
    evs = [json.loads(line) for line in out.splitlines()]
    assert [e["type"] for e in evs] == ["accepted"] * 5 + ["held"] * 5 + ["deleted"]
    assert [e["ts"] for e in evs] == sorted(e["ts"] for e in evs)
    rc, out = await cli(root, "events", "--msg", sharded.ids["s0"], "--json")
    assert [json.loads(line)["type"] for line in out.splitlines()] == [
        "accepted", "held", "deleted",
    ]  # fmt: skip
