"""A migrated control database with two tenants, on SQLite and PostgreSQL."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import select

from postwarden.store.db import create_engine, sessionmaker
from postwarden.store.models import Tenant
from tests.control.conftest import migrated_url  # noqa: F401  (the fixture)
from tests.pg import postgres  # noqa: F401  (the fixture)


@pytest.fixture
async def db(migrated_url: str) -> Any:  # noqa: F811
    """Sessions of a fresh database with tenants ``acme`` and ``other``."""
    engine = create_engine(migrated_url)
    sessions = sessionmaker(engine)
    async with sessions() as s:
        s.add_all([Tenant(name="acme"), Tenant(name="other")])
        await s.commit()
    yield sessions
    await engine.dispose()


async def tenant_id(sessions: Any, name: str) -> int:
    async with sessions() as s:
        return int((await s.execute(select(Tenant.id).where(Tenant.name == name))).scalar_one())
