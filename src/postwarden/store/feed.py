"""Writing to the change feed (``changes``) so that every reader sees every row.

Readers poll ``id > last seen``. On PostgreSQL an id is drawn from its sequence when
the row is inserted but becomes visible when its transaction commits, so a long
transaction (a CSV import) could commit an id below one a reader has already passed.
Writers therefore take a lock that only writers of the feed contend for (SHARE ROW
EXCLUSIVE conflicts with itself, not with readers) before their first change row:
feed ids then become visible in the order they were drawn. SQLite has one writer at a
time anyway; there the lock is its write lock.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import text

from postwarden.store.models import Change

_LOCKED = "postwarden_changes_locked"


async def lock_feed(session: Any) -> None:
    """Take the feed lock for the session's transaction now (once per transaction). A
    writer that locks other rows before it may write to the feed takes it first: the
    event copier takes it before it writes suppressions and contacts (a contact's
    status follows its suppression), so another order would deadlock."""
    bind = session.bind
    dialect = bind.dialect.name if bind is not None else ""
    sync = getattr(session, "sync_session", session)
    current = sync.get_transaction()
    if dialect not in ("sqlite", "postgresql"):
        return
    if current is not None and session.info.get(_LOCKED) is current:
        return  # taken already in this transaction
    if dialect == "sqlite":
        # SQLite's one writer: taken now, before what the writer reads (the driver
        # starts no transaction for a SELECT), so that it reads what it will change.
        await session.execute(text("UPDATE changes SET id = id WHERE 0"))
    else:
        await session.execute(text("LOCK TABLE changes IN SHARE ROW EXCLUSIVE MODE"))
    session.info[_LOCKED] = sync.get_transaction()


async def record_change(session: Any, kind: str, tenant_id: int | None, ref: str = "") -> None:
    """Add a change row to the session's transaction (taking the feed lock first)."""
    await lock_feed(session)
    session.add(Change(kind=kind, tenant_id=tenant_id, ref=ref))


async def lock_events(session: Any) -> None:
    """The same ordering for the ``events`` table, written by every worker's copier."""
    bind = session.bind
    if bind is not None and bind.dialect.name == "postgresql":
        await session.execute(text("LOCK TABLE events IN SHARE ROW EXCLUSIVE MODE"))
