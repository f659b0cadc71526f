"""The control database's migrations on SQLite and PostgreSQL: 0001 → 0002 (pools)
keeps every row (a rebuilt ``tenants`` table would cascade into keys and domains),
gives old tenants no pools, and goes back down and up again."""

from __future__ import annotations

import datetime as dt
import threading
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import func, select

from postwarden.store.db import (
    alembic_config,
    create_engine,
    current_revision,
    head_revision,
    sessionmaker,
    upgrade,
    upgrade_sync,
)
from postwarden.store.models import ApiKey, Domain, Pool, Tenant, UTCDateTime


def downgrade_sync(url: str, revision: str) -> None:
    """Alembic's downgrade in a thread of its own (its env runs an event loop)."""
    from alembic import command

    errors: list[BaseException] = []

    def run() -> None:
        try:
            command.downgrade(alembic_config(url), revision)
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=run)
    t.start()
    t.join()
    if errors:
        raise errors[0]


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
    assert head_revision() == "0004"
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
    assert await current_revision(url) == "0004"
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
    assert await current_revision(url) == "0004"
    assert await counts() == (3, 2, 1)
