"""The message list's indexes (migration ``*_message_list_indexes``) on SQLite and
PostgreSQL: made by the upgrade (one replacing the index on messages' tenant and
time), undone by its downgrade without touching a row, made again by the next
upgrade."""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy import func, select

import postwarden.store
from postwarden.store.db import create_engine, current_revision, head_revision, upgrade
from postwarden.store.models import Recipient
from tests.control.test_migrations import database_url, downgrade_sync  # noqa: F401

NAMES = {
    "ix_messages_tenant_id_created_at_id",
    "ix_message_recipients_tenant_id_state_message_id",
    "ix_message_recipients_tenant_id_address_message_id",
}
BEFORE = {"ix_messages_tenant_id_created_at"}  # what the first replaces


def revisions() -> tuple[str, str]:
    """This migration's revision and the one before it (read from its file, so that a
    renumbering at merge time does not break the test)."""
    versions = Path(postwarden.store.__file__).parent / "migrations" / "versions"
    [path] = versions.glob("*_message_list_indexes.py")
    text = path.read_text()
    rev = re.search(r'^revision = "(\w+)"', text, re.M)
    down = re.search(r'^down_revision = "(\w+)"', text, re.M)
    assert rev and down
    return rev.group(1), down.group(1)


async def indexes_and_rows(url: str) -> tuple[set[str], int]:
    engine = create_engine(url)
    try:
        async with engine.connect() as conn:
            names = await conn.run_sync(
                lambda c: {
                    ix["name"]
                    for t in ("messages", "message_recipients")
                    for ix in sa.inspect(c).get_indexes(t)
                }
            )
            n = (await conn.execute(select(func.count()).select_from(Recipient))).scalar_one()
        return names & (NAMES | BEFORE), n
    finally:
        await engine.dispose()


async def test_indexes_come_and_go_with_the_migration(database_url: str) -> None:  # noqa: F811
    url = database_url
    rev, down = revisions()
    await upgrade(url)
    assert await current_revision(url) == head_revision()
    engine = create_engine(url)
    try:
        async with engine.begin() as conn:
            await conn.execute(
                sa.insert(Recipient.__table__),  # type: ignore[arg-type]
                [
                    {"id": "m1.0", "message_id": "m1", "tenant_id": 1, "address": "a@x.test",
                     "state": "delivered", "attempts": 1, "last_response": "",
                     "updated_at": dt.datetime.now(dt.UTC)},
                ],
            )  # fmt: skip
    finally:
        await engine.dispose()
    assert await indexes_and_rows(url) == (NAMES, 1)
    downgrade_sync(url, down)
    assert await current_revision(url) == down
    assert await indexes_and_rows(url) == (BEFORE, 1)
    await upgrade(url, rev)
    assert await indexes_and_rows(url) == (NAMES, 1)
