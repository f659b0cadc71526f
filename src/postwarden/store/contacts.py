"""Contacts in the control database: batched upserts by email (issue 20).

:func:`upsert_contacts` is the one writer of contact rows for every path (the API,
its batch route, CSV imports, pulled data sources): it normalizes each email as the
suppression check does (``mail.addresses.suppression_key``), reads the tenant's
existing contacts of the batch (locked: ``FOR UPDATE`` on PostgreSQL, the write lock
on SQLite, so that two writers merging attributes into one contact lose neither's),
inserts the new ones with ``INSERT … ON CONFLICT DO NOTHING RETURNING`` (a concurrent
writer that inserted the same email first wins, and this batch updates its row
instead), and updates only the rows whose values change. The caller commits; a batch
is all or nothing.

Attribute values must already be checked against the tenant's declared types
(``contacts.attributes.check_attributes``); a ``None`` attribute removes it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select, text, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncSession

from postwarden.contacts.attributes import merge
from postwarden.mail.addresses import suppression_key
from postwarden.store.contact_models import AttributeDef, Contact
from postwarden.store.models import utcnow

#: What an upsert does to a contact that exists: ``update`` sets the fields given and
#: merges attributes; ``replace`` sets the fields given and replaces the attributes
#: whole; ``skip`` leaves it as it is.
ON_CONFLICT = ("update", "replace", "skip")
#: Emails per lookup query (well under SQLite's and asyncpg's parameter limits).
CHUNK = 500


@dataclass(frozen=True)
class ContactIn:
    """One contact to write. ``None`` fields are left as they are (on create: empty)."""

    email: str
    name: str | None = None
    attributes: Mapping[str, Any] | None = None
    timezone: str | None = None
    locale: str | None = None
    status: str | None = None


@dataclass(frozen=True)
class Upserted:
    id: int
    email: str  # normalized
    created: bool
    changed: bool  # created, or an update changed something


@dataclass
class _Row:
    id: int
    name: str
    status: str
    attributes: dict[str, Any]
    timezone: str | None
    locale: str | None

    def values(self) -> tuple[Any, ...]:
        return (self.name, self.status, self.attributes, self.timezone, self.locale)


def normalize_email(address: str) -> str:
    """How contacts (and suppressions) store an address."""
    return suppression_key(address)


def _apply(row: _Row, item: ContactIn, on_conflict: str) -> _Row:
    out = dataclasses.replace(row)
    if item.name is not None:
        out.name = item.name
    if item.status is not None:
        out.status = item.status
    if item.timezone is not None:
        out.timezone = item.timezone or None
    if item.locale is not None:
        out.locale = item.locale or None
    if item.attributes is not None:
        base = {} if on_conflict == "replace" else row.attributes
        out.attributes = merge(base, item.attributes)
    return out


async def attribute_types(session: AsyncSession, tenant_id: int) -> dict[str, str]:
    """The tenant's declared attribute types, by name."""
    rows = await session.execute(
        select(AttributeDef.name, AttributeDef.type).where(AttributeDef.tenant_id == tenant_id)
    )
    return {name: type_ for name, type_ in rows.all()}


async def _existing(
    session: AsyncSession, tenant_id: int, emails: Sequence[str]
) -> dict[str, _Row]:
    found: dict[str, _Row] = {}
    cols = (
        Contact.id,
        Contact.email,
        Contact.name,
        Contact.status,
        Contact.attributes,
        Contact.timezone,
        Contact.locale,
    )
    for i in range(0, len(emails), CHUNK):
        chunk = emails[i : i + CHUNK]
        query = select(*cols).where(Contact.tenant_id == tenant_id, Contact.email.in_(chunk))
        if session.get_bind().dialect.name == "postgresql":
            # Locked until commit, in one order for every writer: no lost update, no
            # deadlock between two batches of the same emails.
            query = query.order_by(Contact.email).with_for_update()
        rows = await session.execute(query)
        for cid, email, name, status, attrs, tz, locale in rows.all():
            found[email] = _Row(cid, name, status, dict(attrs or {}), tz, locale)
    return found


async def upsert_contacts(
    session: AsyncSession,
    tenant_id: int,
    items: Sequence[ContactIn],
    on_conflict: str = "update",
) -> list[Upserted]:
    """Create or update ``items`` (one result per item, in order; an email given twice
    in one batch is one contact, the later item applied on top of the earlier)."""
    if on_conflict not in ON_CONFLICT:
        raise ValueError(f"on_conflict: {on_conflict!r} is not one of {', '.join(ON_CONFLICT)}")
    keys = [normalize_email(i.email) for i in items]
    order = sorted(set(keys))
    if session.get_bind().dialect.name == "sqlite":
        # Take the database's write lock before reading (SQLite has one writer at a
        # time; the driver starts no transaction for a SELECT), so that another
        # writer's change is read, never overwritten.
        await session.execute(text("UPDATE contacts SET id = id WHERE 0"))
    existing = await _existing(session, tenant_id, order)
    now = utcnow()

    # The new contacts: each email's items folded into one row, inserted at once.
    fresh: dict[str, _Row] = {}
    for key, item in zip(keys, items, strict=True):
        if key in existing:
            continue
        start = fresh.get(key) or _Row(0, "", "active", {}, None, None)
        fresh[key] = _apply(start, item, "update")
    created: set[str] = set()
    if fresh:
        dialect = session.get_bind().dialect.name
        insert = pg_insert if dialect == "postgresql" else sqlite_insert
        stmt = (
            insert(Contact)
            .on_conflict_do_nothing(index_elements=["tenant_id", "email"])
            .returning(Contact.id, Contact.email)
        )
        rows = [
            {
                "tenant_id": tenant_id,
                "email": key,
                "name": r.name,
                "status": r.status,
                "attributes": r.attributes,
                "timezone": r.timezone,
                "locale": r.locale,
                "created_at": now,
                "updated_at": now,
            }
            for key, r in sorted(fresh.items())
        ]
        for i in range(0, len(rows), CHUNK):
            result = await session.execute(stmt, rows[i : i + CHUNK])
            for cid, email in result.all():
                existing[email] = dataclasses.replace(fresh[email], id=cid)
                created.add(email)
        raced = [k for k in fresh if k not in created]
        if raced:  # inserted by another writer meanwhile: update theirs
            existing.update(await _existing(session, tenant_id, raced))

    # Every item applied in order onto the row as it is now.
    results: list[Upserted] = []
    before = {k: r.values() for k, r in existing.items()}
    for key, item in zip(keys, items, strict=True):
        row = existing[key]
        if key in created:
            # Its items are in the inserted row already.
            results.append(Upserted(row.id, key, True, True))
            continue
        if on_conflict != "skip":
            existing[key] = row = _apply(row, item, on_conflict)
        results.append(Upserted(row.id, key, False, row.values() != before[key]))
    changes = [
        {
            "id": existing[k].id,
            "name": existing[k].name,
            "status": existing[k].status,
            "attributes": existing[k].attributes,
            "timezone": existing[k].timezone,
            "locale": existing[k].locale,
            "updated_at": now,
        }
        for k in order
        if k not in created and existing[k].values() != before[k]
    ]
    if changes:
        await session.execute(update(Contact), changes)
    # An email given twice reports "changed" on each of its items once anything changed.
    changed = {k for k in order if k in created or existing[k].values() != before[k]}
    return [dataclasses.replace(r, changed=r.email in changed) for r in results]
