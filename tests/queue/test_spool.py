"""The spool stores durably, leases, records outcomes and reclaims space."""

from __future__ import annotations

import os
import time
from pathlib import Path

from postwarden.queue.spool import Spool
from postwarden.values import DEFERRED, DELIVERED, Envelope, Outcome


def _count(spool_path: Path, sql: str) -> int:
    import sqlite3

    db = sqlite3.connect(spool_path / "index.db")
    try:
        return int(db.execute(sql).fetchone()[0])
    finally:
        db.close()


async def test_store_lease_deliver_removes_message(tmp_path: Path) -> None:
    spool = Spool(tmp_path, segment_size=1024)
    await spool.open()
    env = Envelope("a@x.test", ["b@y.test", "c@Y.TEST"], client_ip="127.0.0.1")
    stored = await spool.store(env, b"Subject: hi\r\n\r\nbody\r\n")
    assert len(stored.rcpt_ids) == 2
    leases = await spool.lease_due(time.time() + 1, 10)
    assert {lease.rcpt for lease in leases} == {"b@y.test", "c@Y.TEST"}
    assert {lease.domain for lease in leases} == {"y.test"}
    assert spool.read_body(leases[0]) == b"Subject: hi\r\n\r\nbody\r\n"
    # Leased recipients are not handed out twice.
    assert await spool.lease_due(time.time() + 1, 10) == []
    await spool.record([Outcome(leases[0].rcpt_id, leases[0].msg_id, DELIVERED, "250 ok")])
    await spool.record(
        [
            Outcome(
                leases[1].rcpt_id,
                leases[1].msg_id,
                DEFERRED,
                "451 later",
                next_attempt=time.time() + 3600,
            )
        ]
    )
    assert _count(tmp_path, "SELECT COUNT(*) FROM messages") == 1
    assert await spool.lease_due(time.time() + 1, 10) == []
    later = await spool.lease_due(time.time() + 7200, 10)
    assert [lease.attempts for lease in later] == [1]
    await spool.record([Outcome(later[0].rcpt_id, later[0].msg_id, DELIVERED, "250 ok")])
    assert _count(tmp_path, "SELECT COUNT(*) FROM messages") == 0
    types = _count(tmp_path, "SELECT COUNT(*) FROM events WHERE type='delivered'")
    assert types == 2
    await spool.close()


async def test_segments_rotate_and_are_reclaimed(tmp_path: Path) -> None:
    spool = Spool(tmp_path, segment_size=2000)
    await spool.open()
    body = b"x" * 1500 + b"\r\n"
    for i in range(6):
        await spool.store(Envelope(f"s{i}@x.test", ["r@y.test"]), body)
    segs = sorted(os.listdir(tmp_path / "segments"))
    assert len(segs) >= 3
    leases = await spool.lease_due(time.time() + 1, 100)
    assert len(leases) == 6
    assert all(spool.read_body(lease) == body for lease in leases)
    await spool.record([Outcome(x.rcpt_id, x.msg_id, DELIVERED) for x in leases])
    # Only the segment being written remains.
    assert len(os.listdir(tmp_path / "segments")) == 1
    await spool.close()


async def test_active_leases_are_requeued_and_counted_after_restart(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    await spool.open()
    await spool.store(Envelope("a@x.test", ["b@y.test"]), b"m1\r\n", lease=True)
    await spool.store(Envelope("a@x.test", ["c@y.test"]), b"m2\r\n")
    await spool.close()
    again = Spool(tmp_path)
    await again.open()
    assert again.recovered_inflight == 1
    leases = await again.lease_due(time.time() + 1, 10)
    assert sorted(lease.rcpt for lease in leases) == ["b@y.test", "c@y.test"]
    assert {again.read_body(x) for x in leases} == {b"m1\r\n", b"m2\r\n"}
    await again.close()


async def test_concurrent_stores_share_fsyncs(tmp_path: Path) -> None:
    import asyncio

    spool = Spool(tmp_path)
    await spool.open()
    results = await asyncio.gather(
        *(spool.store(Envelope("a@x.test", [f"r{i}@y.test"]), b"b\r\n") for i in range(200))
    )
    assert len({r.msg_id for r in results}) == 200
    # Group commit: far fewer fsync rounds than messages.
    assert spool.stats["fsyncs"] < 200
    await spool.close()


async def test_recipient_ids_are_never_reused(tmp_path: Path) -> None:
    """An event's rcpt_id names one recipient for good, even after its message left."""
    spool = Spool(tmp_path)
    await spool.open()
    first = await spool.store(Envelope("a@x.test", ["b@y.test"]), b"Subject: 1\r\n\r\n1\r\n")
    await spool.record([Outcome(first.rcpt_ids[0], first.msg_id, DELIVERED, "250 ok")])
    assert _count(tmp_path, "SELECT COUNT(*) FROM messages") == 0
    second = await spool.store(Envelope("a@x.test", ["c@y.test"]), b"Subject: 2\r\n\r\n2\r\n")
    assert second.rcpt_ids[0] > first.rcpt_ids[0]
    await spool.close()


async def test_schema_1_spool_is_upgraded_in_place(tmp_path: Path) -> None:
    import sqlite3

    from postwarden.queue import schema as spool_mod

    old_schema = spool_mod.SCHEMA.replace("PRIMARY KEY AUTOINCREMENT", "PRIMARY KEY")
    db = sqlite3.connect(tmp_path / "index.db")
    db.executescript(old_schema)
    db.execute("INSERT INTO meta VALUES ('schema_version', '1')")
    db.execute(
        "INSERT INTO events(ts, type, msg_id, rcpt_id, rcpt) VALUES (1, 'delivered', 'm', 41, 'x')"
    )
    db.commit()
    db.close()
    spool = Spool(tmp_path)
    await spool.open()
    stored = await spool.store(Envelope("a@x.test", ["b@y.test"]), b"Subject: u\r\n\r\nu\r\n")
    assert stored.rcpt_ids[0] > 41  # past every id an old event named
    await spool.close()
    assert _count(tmp_path, "SELECT value FROM meta WHERE key = 'schema_version'") == (
        spool_mod.SCHEMA_VERSION
    )
