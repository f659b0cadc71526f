"""Lanes, pools and fair leasing in the spool (schema 3), and the upgrades to the current
schema."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from postwarden.queue.schema import _RECIPIENTS_V2_COLUMNS, _RECIPIENTS_V2_TABLE, SCHEMA_VERSION
from postwarden.queue.spool import Spool
from postwarden.values import DELIVERED, LANE_BULK, LANE_HIGH, Envelope, Lease, Outcome


def _query(spool_path: Path, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    db = sqlite3.connect(spool_path / "index.db")
    try:
        return db.execute(sql, args).fetchall()
    finally:
        db.close()


async def _bulk(spool: Spool, tenant: str, n: int, *, batch: int = 2000) -> None:
    """``n`` due bulk recipients for ``tenant``, a few messages with many recipients."""
    for start in range(0, n, batch):
        rcpts = [f"{tenant}{i}@y.test" for i in range(start, min(n, start + batch))]
        await spool.store(Envelope("c@x.test", rcpts, tenant=tenant, lane=LANE_BULK), b"b\r\n")


def _by_tenant(leases: list[Lease]) -> Counter[str | None]:
    return Counter(lease.tenant for lease in leases)


async def test_pool_and_lane_round_trip(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    await spool.open()
    env = Envelope("a@x.test", ["b@y.test"], tenant="t1", pool="p1", lane=LANE_BULK)
    stored = await spool.store(env, b"Subject: 1\r\n\r\n1\r\n")
    [lease] = await spool.lease_due(time.time() + 1, 10)
    assert (lease.rcpt_id, lease.pool, lease.lane, lease.tenant) == (
        stored.rcpt_ids[0], "p1", LANE_BULK, "t1",
    )  # fmt: skip
    # Straight into ``active`` at acceptance: the leases carry them too.
    direct = await spool.store(env, b"Subject: 2\r\n\r\n2\r\n", lease=True)
    assert [(x.pool, x.lane, x.tenant) for x in direct.leases] == [("p1", LANE_BULK, "t1")]
    # The defaults: the default pool, the high lane, no tenant ('' on recipients).
    plain = await spool.store(Envelope("a@x.test", ["c@y.test"]), b"Subject: 3\r\n\r\n3\r\n")
    [lease] = await spool.lease_due(time.time() + 1, 10)
    assert (lease.pool, lease.lane, lease.tenant) == (None, LANE_HIGH, None)
    with pytest.raises(ValueError, match="lane"):
        await spool.store(Envelope("a@x.test", ["d@y.test"], lane=7), b"x\r\n")
    await spool.close()
    assert _query(tmp_path, "SELECT pool, lane, tenant FROM messages ORDER BY pool") == [
        (None, LANE_HIGH, None), ("p1", LANE_BULK, "t1"), ("p1", LANE_BULK, "t1"),
    ]  # fmt: skip
    rows = _query(tmp_path, "SELECT msg_id, lane, tenant FROM recipients")
    assert sorted(r[1:] for r in rows) == [(LANE_HIGH, ""), (LANE_BULK, "t1"), (LANE_BULK, "t1")]
    assert {r[0] for r in rows} == {stored.msg_id, direct.msg_id, plain.msg_id}


async def test_high_lane_is_leased_first(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    await spool.open()
    await _bulk(spool, "t1", 500)
    # Part of the scenario: the high lane's recipients are due later than every bulk one.
    await asyncio.sleep(0.01)
    high = await spool.store(
        Envelope("a@x.test", [f"h{i}@y.test" for i in range(5)], tenant="t1"), b"h\r\n"
    )
    leases = await spool.lease_due(time.time() + 1, 10)
    assert [x.rcpt_id for x in leases[:5]] == list(high.rcpt_ids)
    assert {x.lane for x in leases[:5]} == {LANE_HIGH}
    assert len(leases) == 10 and {x.lane for x in leases[5:]} == {LANE_BULK}
    # The bulk ones that came are the earliest due (next_attempt, then id, order).
    assert [x.rcpt for x in leases[5:]] == [f"t1{i}@y.test" for i in range(5)]
    await spool.close()


async def test_bulk_is_shared_fairly_across_tenants(tmp_path: Path) -> None:
    spool = Spool(tmp_path, fsync=False)
    await spool.open()
    await _bulk(spool, "A", 20_000)
    await _bulk(spool, "B", 50)
    await _bulk(spool, "C", 10)
    now = time.time() + 1
    leases = await spool.lease_due(now, 300)
    assert _by_tenant(leases) == {"A": 240, "B": 50, "C": 10}
    # Each tenant's recipients in next_attempt order: A's first 240.
    assert sorted(x.rcpt for x in leases if x.tenant == "A") == sorted(
        f"A{i}@y.test" for i in range(240)
    )
    assert len({x.rcpt_id for x in leases}) == 300
    # Leased means active: the next lease goes on with what is left (A only).
    again = await spool.lease_due(now, 300)
    assert _by_tenant(again) == {"A": 300}
    assert not {x.rcpt_id for x in again} & {x.rcpt_id for x in leases}
    await spool.close()


async def test_bulk_limit_caps_the_bulk_lane(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    await spool.open()
    await _bulk(spool, "A", 100)
    await _bulk(spool, "B", 100)
    await _bulk(spool, "C", 3)
    await spool.store(Envelope("a@x.test", [f"h{i}@y.test" for i in range(5)]), b"h\r\n")
    now = time.time() + 1
    # High lane mail does not count against bulk_limit; the bulk lane gets at most 20,
    # shared: C's 3, and the rest split between A and B.
    leases = await spool.lease_due(now, 100, bulk_limit=20)
    assert sum(x.lane == LANE_HIGH for x in leases) == 5
    bulk = _by_tenant([x for x in leases if x.lane == LANE_BULK])
    assert sum(bulk.values()) == 20
    assert bulk["C"] == 3 and sorted([bulk["A"], bulk["B"]]) == [8, 9]
    # limit still bounds everything.
    assert len(await spool.lease_due(now, 7, bulk_limit=20)) == 7
    assert await spool.lease_due(now, 100, bulk_limit=0) == []
    await spool.close()


async def test_tenants_take_turns_across_leases(tmp_path: Path) -> None:
    """More tenants than room, or shares rounded up: successive leases rotate, so
    every tenant gets the same over time."""
    spool = Spool(tmp_path)
    await spool.open()
    for tenant in "abcde":
        await _bulk(spool, tenant, 30)
    now = time.time() + 1
    got: Counter[str | None] = Counter()
    for _ in range(5):
        leases = await spool.lease_due(now, 2)
        assert len(_by_tenant(leases)) == 2  # one each for two tenants
        got += _by_tenant(leases)
    assert got == dict.fromkeys("abcde", 2)
    # 5 tenants sharing 13: 3 + 3 + 3 + 3 + 1, the short share moving round.
    for _ in range(5):
        shares = _by_tenant(await spool.lease_due(now, 13))
        assert sorted(shares.values()) == [1, 3, 3, 3, 3]
        got += shares
    assert got == dict.fromkeys("abcde", 2 + 13)
    await spool.close()


def _plans(db: sqlite3.Connection, statements: list[str]) -> list[str]:
    lines = []
    for sql in statements:
        for row in db.execute("EXPLAIN QUERY PLAN " + sql):
            lines.append(row[3])
    return lines


async def test_leasing_is_index_driven(tmp_path: Path) -> None:
    """Every statement lease_due runs reads recipients through an index — no table
    scan, no sort — and finding the tenants does not walk a tenant's deferred mail."""
    spool = Spool(tmp_path, fsync=False)
    await spool.open()
    await _bulk(spool, "A", 20_000)
    await _bulk(spool, "Z", 5)
    await spool.store(Envelope("a@x.test", ["h@y.test"], tenant="A"), b"h\r\n")
    now = time.time() + 1
    # A's bulk mail is all deferred to later; Z (after A in the scan) has due mail.
    await spool.run(
        lambda db: db.execute(
            "UPDATE recipients SET state = 'deferred', next_attempt = ? WHERE tenant = 'A'"
            " AND lane = ?",
            (now + 3600, LANE_BULK),
        )
    )
    statements: list[str] = []
    steps = [0]

    def trace(db: sqlite3.Connection) -> None:
        db.set_trace_callback(statements.append)

        def step() -> int:
            steps[0] += 1
            return 0

        db.set_progress_handler(step, 100)

    def untrace(db: sqlite3.Connection) -> None:
        db.set_trace_callback(None)
        db.set_progress_handler(None, 0)

    await spool.run(trace)
    leases = await spool.lease_due(now, 100)
    await spool.run(untrace)
    assert _by_tenant(leases) == {"A": 1, "Z": 5}
    # Walking A's 20 000 index entries would take far more than this many VM steps.
    assert steps[0] * 100 < 20_000, steps[0] * 100
    selects = [s for s in statements if s.lstrip().upper().startswith(("SELECT", "WITH"))]
    assert any("WITH RECURSIVE" in s for s in selects)  # the loose index scan
    plan = await spool.run(lambda db: _plans(db, selects))
    await spool.close()
    text = "\n".join(plan)
    assert "recipients_due_high" in text and "recipients_due_bulk" in text
    for line in plan:
        assert "TEMP B-TREE" not in line, text
        if line.startswith("SCAN") and line.split()[1] in ("r", "recipients"):
            assert "INDEX" in line, text


# The messages and recipients tables as schema 2 had them (schema 1: recipient ids
# without AUTOINCREMENT), to turn a spool back into an old one.
_V2_MESSAGES = """
CREATE TABLE messages (
    id TEXT PRIMARY KEY,
    segment INTEGER NOT NULL,
    body_offset INTEGER NOT NULL,
    body_length INTEGER NOT NULL,
    mail_from TEXT NOT NULL,
    client_ip TEXT NOT NULL DEFAULT '',
    helo TEXT NOT NULL DEFAULT '',
    auth TEXT,
    tenant TEXT,
    smtputf8 INTEGER NOT NULL DEFAULT 0,
    body_8bit INTEGER NOT NULL DEFAULT 0,
    received_at REAL NOT NULL,
    remaining INTEGER NOT NULL
)"""
_V2_INDEXES = """
CREATE INDEX recipients_msg ON recipients(msg_id);
CREATE INDEX recipients_due ON recipients(next_attempt)
    WHERE state IN ('queued', 'deferred') AND held = 0;
CREATE INDEX recipients_state ON recipients(state);
"""
_V2_MESSAGE_COLUMNS = (
    "id, segment, body_offset, body_length, mail_from, client_ip, helo, auth, tenant,"
    " smtputf8, body_8bit, received_at, remaining"
)


def _downgrade(spool_path: Path, version: int) -> None:
    """Rewrite a closed spool's tables with the DDL of schema ``version`` (1, 2 or 3)."""
    if version == 3:  # schema 4 only added recipients.wait_reason
        db = sqlite3.connect(spool_path / "index.db", isolation_level=None)
        try:
            db.execute("ALTER TABLE recipients DROP COLUMN wait_reason")
            db.execute("UPDATE meta SET value = '3' WHERE key = 'schema_version'")
        finally:
            db.close()
        return
    recipients = _RECIPIENTS_V2_TABLE
    if version == 1:
        recipients = recipients.replace("PRIMARY KEY AUTOINCREMENT", "PRIMARY KEY")
    db = sqlite3.connect(spool_path / "index.db", isolation_level=None)
    try:
        db.execute("BEGIN")
        for table, ddl, columns in (
            ("messages", _V2_MESSAGES, _V2_MESSAGE_COLUMNS),
            ("recipients", recipients, _RECIPIENTS_V2_COLUMNS),
        ):
            db.execute(f"ALTER TABLE {table} RENAME TO {table}_v3")
            db.execute(ddl)
            db.execute(f"INSERT INTO {table} SELECT {columns} FROM {table}_v3")
            db.execute(f"DROP TABLE {table}_v3")
        for statement in _V2_INDEXES.split(";"):
            if statement.strip():
                db.execute(statement)
        db.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(version),))
        db.execute("COMMIT")
    finally:
        db.close()


def _columns(spool_path: Path, table: str) -> set[str]:
    return {r[1] for r in _query(spool_path, f"PRAGMA table_info({table})")}


async def _old_spool(tmp_path: Path, version: int) -> dict[str, Any]:
    """A spool of schema ``version`` holding mail in every interesting state."""
    spool = Spool(tmp_path)
    await spool.open()
    m1 = await spool.store(
        Envelope("a@x.test", ["a@y.test", "b@y.test", "c@y.test"], tenant="t1"),
        b"Subject: 1\r\n\r\n1\r\n",
    )
    m2 = await spool.store(Envelope("a@x.test", ["d@y.test"]), b"Subject: 2\r\n\r\n2\r\n")
    m3 = await spool.store(
        Envelope("a@x.test", ["e@y.test"], tenant="t2"), b"Subject: 3\r\n\r\n3\r\n"
    )
    now = time.time()
    await spool.record(
        [
            Outcome(m1.rcpt_ids[0], m1.msg_id, DELIVERED, "250 ok"),
            Outcome(m1.rcpt_ids[1], m1.msg_id, "deferred", "451 later", next_attempt=now + 3600),
        ]
    )
    await spool.close()
    _downgrade(tmp_path, version)
    assert "wait_reason" not in _columns(tmp_path, "recipients")
    if version < 3:
        assert "lane" not in _columns(tmp_path, "recipients")
        assert "pool" not in _columns(tmp_path, "messages")
    return {"m1": m1, "m2": m2, "m3": m3, "now": now}


@pytest.mark.parametrize("version", [1, 2, 3])
async def test_old_spool_is_upgraded_in_place(tmp_path: Path, version: int) -> None:
    old = await _old_spool(tmp_path, version)
    m1, m2, m3 = old["m1"], old["m2"], old["m3"]
    spool = Spool(tmp_path)
    await spool.open()
    assert _query(tmp_path, "SELECT value FROM meta WHERE key = 'schema_version'") == [
        (str(SCHEMA_VERSION),)
    ]
    # Schema 4: nobody waits for traffic shaping yet.
    assert _query(tmp_path, "SELECT DISTINCT wait_reason FROM recipients") == [(None,)]
    # Every row kept, with its id; lane 0, the message's tenant (or ''), no pool.
    assert _query(tmp_path, "SELECT id, rcpt, state, lane, tenant FROM recipients ORDER BY id") == [
        (m1.rcpt_ids[0], "a@y.test", "delivered", 0, "t1"),
        (m1.rcpt_ids[1], "b@y.test", "deferred", 0, "t1"),
        (m1.rcpt_ids[2], "c@y.test", "queued", 0, "t1"),
        (m2.rcpt_ids[0], "d@y.test", "queued", 0, ""),
        (m3.rcpt_ids[0], "e@y.test", "queued", 0, "t2"),
    ]  # fmt: skip
    assert _query(tmp_path, "SELECT DISTINCT pool, lane FROM messages") == [(None, 0)]
    indexes = {r[0] for r in _query(tmp_path, "SELECT name FROM sqlite_master WHERE type='index'")}
    assert {"recipients_due_high", "recipients_due_bulk", "recipients_msg"} <= indexes
    assert "recipients_due" not in indexes
    # The mail goes on as before: leased with its tenant, bodies read back, delivered.
    leases = await spool.lease_due(time.time() + 1, 10)
    assert sorted((x.rcpt, x.tenant, x.lane, x.pool) for x in leases) == [
        ("c@y.test", "t1", 0, None), ("d@y.test", None, 0, None), ("e@y.test", "t2", 0, None),
    ]  # fmt: skip
    assert {spool.read_body(x) for x in leases} == {
        b"Subject: 1\r\n\r\n1\r\n", b"Subject: 2\r\n\r\n2\r\n", b"Subject: 3\r\n\r\n3\r\n",
    }  # fmt: skip
    # A shaping wait is recorded on the upgraded table, and the next outcome clears it.
    wait = "message_rate: message rate"
    await spool.record(
        [Outcome(x.rcpt_id, x.msg_id, "queued", counted_attempt=False, wait_reason=wait)
         for x in leases]
    )  # fmt: skip
    assert _query(tmp_path, "SELECT COUNT(*) FROM recipients WHERE wait_reason IS NOT NULL") == [
        (3,)
    ]
    leases = await spool.lease_due(time.time() + 1, 10)
    assert len(leases) == 3
    await spool.record([Outcome(x.rcpt_id, x.msg_id, DELIVERED, "250 ok") for x in leases])
    assert _query(tmp_path, "SELECT COUNT(*) FROM recipients WHERE wait_reason IS NOT NULL") == [
        (0,)
    ]
    [later] = await spool.lease_due(old["now"] + 7200, 10)
    assert (later.rcpt, later.attempts, later.tenant) == ("b@y.test", 1, "t1")
    await spool.record([Outcome(later.rcpt_id, later.msg_id, DELIVERED, "250 ok")])
    assert _query(tmp_path, "SELECT COUNT(*) FROM messages") == [(0,)]
    assert _query(tmp_path, "SELECT COUNT(*) FROM events WHERE type = 'delivered'") == [(5,)]
    # New mail after the upgrade: bulk, with a pool; ids never reused.
    new = await spool.store(
        Envelope("a@x.test", ["f@y.test"], tenant="t1", pool="p", lane=LANE_BULK), b"4\r\n"
    )
    assert new.rcpt_ids[0] > m3.rcpt_ids[0]
    [lease] = await spool.lease_due(time.time() + 1, 10)
    assert (lease.rcpt_id, lease.pool, lease.lane) == (new.rcpt_ids[0], "p", LANE_BULK)
    await spool.close()
    # Opening again: nothing more to upgrade.
    again = Spool(tmp_path)
    await again.open()
    await again.close()


async def test_failed_upgrade_leaves_the_old_schema_whole(tmp_path: Path) -> None:
    await _old_spool(tmp_path, 2)
    db = sqlite3.connect(tmp_path / "index.db")
    db.execute(
        "CREATE TRIGGER no_updates BEFORE UPDATE ON recipients"
        " BEGIN SELECT RAISE(ABORT, 'no updates'); END"
    )
    db.commit()
    db.close()
    with pytest.raises(sqlite3.Error, match="no updates"):
        await Spool(tmp_path).open()
    # Rolled back: schema 2 as it was (its columns, its index, its version).
    assert "lane" not in _columns(tmp_path, "recipients")
    assert "pool" not in _columns(tmp_path, "messages")
    assert _query(tmp_path, "SELECT value FROM meta WHERE key = 'schema_version'") == [("2",)]
    assert _query(tmp_path, "SELECT name FROM sqlite_master WHERE name = 'recipients_due'")
    db = sqlite3.connect(tmp_path / "index.db")
    db.execute("DROP TRIGGER no_updates")
    db.commit()
    db.close()
    spool = Spool(tmp_path)
    await spool.open()
    assert len(await spool.lease_due(time.time() + 1, 10)) == 3
    await spool.close()
