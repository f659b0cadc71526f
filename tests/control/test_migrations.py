"""The control database's migrations on SQLite and PostgreSQL: 0001 → 0002 (pools)
keeps every row (a rebuilt ``tenants`` table would cascade into keys and domains),
gives old tenants no pools, and goes back down and up again; every migration's
downgrade undoes its upgrade, down to an empty database and up again."""

from __future__ import annotations

import datetime as dt
import threading
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import func, select

from postwarden.store.check import shipped_revisions
from postwarden.store.db import (
    create_engine,
    current_revision,
    downgrade_sync,
    head_revision,
    sessionmaker,
    upgrade,
    upgrade_sync,
)
from postwarden.store.models import ApiKey, Domain, Pool, Tenant, UTCDateTime


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Any) -> str:
    if request.param == "postgresql":
        url: str = request.getfixturevalue("postgres").new_database()
        return url
    url = f"sqlite+aiosqlite:///{tmp_path / 'control.db'}"
    upgrade_sync(url, "0001")
    return url


# The tables as revision 0001 made them (the models are the newest revision's).
TENANTS_0001 = sa.table(
    "tenants",
    sa.column("id", sa.BigInteger),
    sa.column("name", sa.String),
    sa.column("created_at", UTCDateTime()),
    sa.column("disabled", sa.Boolean),
    sa.column("settings", sa.JSON),
)
KEYS_0001 = sa.table(
    "api_keys",
    sa.column("tenant_id", sa.BigInteger),
    sa.column("prefix", sa.String),
    sa.column("secret_hash", sa.String),
    sa.column("name", sa.String),
    sa.column("scopes", sa.String),
    sa.column("created_at", UTCDateTime()),
)
DOMAINS_0001 = sa.table(
    "domains",
    sa.column("tenant_id", sa.BigInteger),
    sa.column("name", sa.String),
    sa.column("created_at", UTCDateTime()),
    sa.column("last_check", sa.JSON),
)


async def test_upgrade_from_0001_keeps_rows_and_goes_down_and_up(database_url: str) -> None:
    url = database_url
    head = head_revision()
    if await current_revision(url) != "0001":
        downgrade_sync(url, "0001")  # the PostgreSQL fixture's databases come at head
    assert await current_revision(url) == "0001"
    now = dt.datetime.now(dt.UTC)
    engine = create_engine(url)
    try:
        async with engine.begin() as conn:
            tables = await conn.run_sync(lambda c: sa.inspect(c).get_table_names())
            assert "pools" not in tables
            await conn.execute(
                TENANTS_0001.insert(),
                [
                    {"id": 1, "name": "acme", "created_at": now, "disabled": False, "settings": {}},
                    {"id": 2, "name": "zeta", "created_at": now, "disabled": True, "settings": {}},
                ],
            )
            await conn.execute(
                KEYS_0001.insert(),
                [
                    {
                        "tenant_id": t,
                        "prefix": f"p{t}",
                        "secret_hash": "h" * 64,
                        "name": "",
                        "scopes": "send",
                        "created_at": now,
                    }
                    for t in (1, 2)
                ],
            )
            await conn.execute(
                DOMAINS_0001.insert(),
                [{"tenant_id": 1, "name": "acme.test", "created_at": now, "last_check": {}}],
            )
    finally:
        await engine.dispose()

    async def counts() -> tuple[int, int, int]:
        engine = create_engine(url)
        try:
            async with sessionmaker(engine)() as s:
                return (
                    (await s.execute(select(func.count()).select_from(Tenant))).scalar_one(),
                    (await s.execute(select(func.count()).select_from(ApiKey))).scalar_one(),
                    (await s.execute(select(func.count()).select_from(Domain))).scalar_one(),
                )
        finally:
            await engine.dispose()

    await upgrade(url)
    assert await current_revision(url) == head
    assert await counts() == (2, 2, 1)
    engine = create_engine(url)
    try:
        async with engine.connect() as conn:
            names = await conn.run_sync(
                lambda c: {
                    ix["name"]
                    for t in ("events", "messages")
                    for ix in sa.inspect(c).get_indexes(t)
                }
            )
        assert {"ix_events_ts", "ix_messages_created_at"} <= names
    finally:
        await engine.dispose()
    engine = create_engine(url)
    try:
        async with sessionmaker(engine)() as s:
            tenants = (await s.execute(select(Tenant).order_by(Tenant.id))).scalars().all()
            assert [(t.default_pool, t.allowed_pools) for t in tenants] == [(None, [])] * 2
            s.add(Pool(name="warm", members=[{"source": "a", "weight": 2}]))
            tenants[0].default_pool, tenants[0].allowed_pools = "warm", ["warm"]
            await s.commit()
            pool = (await s.execute(select(Pool))).scalar_one()
            assert pool.overflow == "wait" and pool.members == [{"source": "a", "weight": 2}]
            assert pool.created_at.tzinfo is not None
            # A tenant made with no pools (a raw insert, as 0001's code would) gets [].
            await s.execute(
                TENANTS_0001.insert(),
                [{"id": 3, "name": "raw", "created_at": now, "disabled": False, "settings": {}}],
            )
            await s.commit()
            raw = await s.get(Tenant, 3)
            assert raw is not None and raw.allowed_pools == [] and raw.default_pool is None
    finally:
        await engine.dispose()

    downgrade_sync(url, "0001")
    assert await current_revision(url) == "0001"
    assert await counts() == (3, 2, 1)
    await upgrade(url)
    assert await current_revision(url) == head
    assert await counts() == (3, 2, 1)


def schema(url: str) -> dict[str, Any]:
    """Every table's columns, primary key, foreign keys and indexes, as plain values."""
    import asyncio

    async def read() -> dict[str, Any]:
        def inspect(c: Any) -> dict[str, Any]:
            insp = sa.inspect(c)
            out: dict[str, Any] = {}
            for t in sorted(insp.get_table_names()):
                out[t] = {
                    "columns": [
                        (col["name"], str(col["type"]), col["nullable"])
                        for col in insp.get_columns(t)
                    ],
                    "pk": insp.get_pk_constraint(t)["constrained_columns"],
                    "fks": sorted(
                        (tuple(fk["constrained_columns"]), fk["referred_table"])
                        for fk in insp.get_foreign_keys(t)
                    ),
                    "indexes": sorted(
                        (ix["name"], tuple(ix["column_names"]), bool(ix["unique"]))
                        for ix in insp.get_indexes(t)
                    ),
                }
            return out

        engine = create_engine(url)
        try:
            async with engine.connect() as conn:
                result: dict[str, Any] = await conn.run_sync(inspect)
                return result
        finally:
            await engine.dispose()

    return asyncio.run(read())


def in_thread(fn: Any, *args: Any) -> Any:
    """``fn(*args)`` off the test's event loop (``schema`` runs a loop of its own)."""
    out: list[Any] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            out.append(fn(*args))
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=run)
    t.start()
    t.join()
    if errors:
        raise errors[0]
    return out[0]


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_database(request: pytest.FixtureRequest, tmp_path: Any) -> str:
    """A database with nothing in it (not even Alembic's table)."""
    if request.param == "postgresql":
        server = request.getfixturevalue("postgres")
        url: str = server.url(server.empty_database("empty"))
        return url
    return f"sqlite+aiosqlite:///{tmp_path / 'empty.db'}"


@pytest.mark.long
async def test_every_migration_goes_down_and_up_again(empty_database: str) -> None:
    """base → head → base → head, one step at a time: every downgrade() undoes its
    upgrade() exactly (the schema after each step down is the one before its step up),
    and the schema at head after the round trip is the schema of a first upgrade."""
    url = empty_database
    revisions = [rev for rev, _doc in shipped_revisions()]
    assert revisions[-1] == head_revision()
    upgrade_sync(url, revisions[0])
    before: dict[str, dict[str, Any]] = {}
    for rev in revisions[1:]:
        before[rev] = in_thread(schema, url)
        upgrade_sync(url, rev)
    at_head = in_thread(schema, url)
    assert "pools" in at_head and "ix_events_ts" in str(at_head["events"]["indexes"])
    for rev in reversed(revisions[1:]):
        downgrade_sync(url, "-1")
        assert in_thread(schema, url) == before[rev], f"downgrade of {rev}"
        upgrade_sync(url, rev)  # and up again over what its downgrade left
        downgrade_sync(url, "-1")
    downgrade_sync(url, "base")
    assert await current_revision(url) is None
    assert set(in_thread(schema, url)) == {"alembic_version"}  # every table gone
    await upgrade(url)
    assert await current_revision(url) == head_revision()
    assert in_thread(schema, url) == at_head
