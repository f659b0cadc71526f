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

A contact's status follows suppressions, which stay the one check every send path
makes. :func:`follow_suppression` is the one place a suppression moves a status (called
by ``store.suppress`` whenever one is written or removed: the API, its CSV import,
bounces and complaints); :func:`status_to_suppressions` is the other direction (a
status set through the contacts API adds or removes the suppression, through
``store.suppress`` so that the change feed and every process's cache see it).
:func:`save_contacts` and :func:`update_contact` are the API's writes: the upsert,
then that sync.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, func, select, text, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncSession

from postwarden.contacts.attributes import AttributeValueError, coerce, merge
from postwarden.mail.addresses import suppression_key
from postwarden.store.contact_models import AttributeDef, Consent, Contact
from postwarden.store.feed import lock_feed
from postwarden.store.models import Suppression, utcnow
from postwarden.store.suppress import remove_suppression, upsert_suppression

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


# ---------------------------------------------------------------- status and suppressions

#: The status a suppression of each reason gives a contact (other reasons, ``manual``
#: and the expiring ``soft_bounce``, leave the status as it is), and back.
STATUS_OF_REASON = {
    "unsubscribe": "unsubscribed",
    "hard_bounce": "bounced",
    "complaint": "complained",
}
REASON_OF_STATUS = {v: k for k, v in STATUS_OF_REASON.items()}


async def follow_suppression(
    session: AsyncSession, tenant_id: int, addresses: Sequence[str], reason: str | None
) -> None:
    """The contacts of ``addresses`` (those the tenant has) take the status of
    suppressions just written with ``reason``; ``None``: the suppressions were
    removed, and the contacts are active again. In the caller's transaction."""
    if reason is None:
        status = "active"
    elif reason in STATUS_OF_REASON:
        status = STATUS_OF_REASON[reason]
    else:
        return
    keys = sorted({normalize_email(a) for a in addresses})
    for i in range(0, len(keys), CHUNK):
        await session.execute(
            update(Contact)
            .where(
                Contact.tenant_id == tenant_id,
                Contact.email.in_(keys[i : i + CHUNK]),
                Contact.status != status,
            )
            .values(status=status, updated_at=utcnow())
            .execution_options(synchronize_session=False)
        )


async def status_to_suppressions(
    session: AsyncSession, tenant_id: int, email: str, status: str
) -> None:
    """Suppressions follow a status set on a contact: unsubscribed, bounced or
    complained adds (or replaces) the suppression of that reason; active removes a
    suppression of those reasons (``manual`` and ``soft_bounce`` stay)."""
    if status == "active":
        row = (
            await session.execute(
                select(Suppression.reason).where(
                    Suppression.tenant_id == tenant_id,
                    Suppression.address == normalize_email(email),
                )
            )
        ).scalar_one_or_none()
        if row in STATUS_OF_REASON:
            await remove_suppression(session, tenant_id, email)
        return
    reason = REASON_OF_STATUS[status]
    await upsert_suppression(
        session,
        tenant_id,
        email,
        reason,
        "contacts",
        f"contact status set to {status}",
        None,
        keep=lambda row: row.reason == reason and row.expires_at is None,
    )


async def _statuses_from_suppressions(
    session: AsyncSession, tenant_id: int, emails: Sequence[str]
) -> None:
    """New contacts of addresses already suppressed take their suppressions' status."""
    now = utcnow()
    for i in range(0, len(emails), CHUNK):
        rows = await session.execute(
            select(Suppression.address, Suppression.reason, Suppression.expires_at).where(
                Suppression.tenant_id == tenant_id,
                Suppression.address.in_(emails[i : i + CHUNK]),
                Suppression.reason.in_(list(STATUS_OF_REASON)),
            )
        )
        live: dict[str, list[str]] = {}
        for address, reason, expires in rows.all():
            if expires is None or expires > now:
                live.setdefault(reason, []).append(address)
        for reason, addresses in live.items():
            await follow_suppression(session, tenant_id, addresses, reason)


async def save_contacts(
    session: AsyncSession,
    tenant_id: int,
    items: Sequence[ContactIn],
    on_conflict: str = "update",
) -> list[Upserted]:
    """Create or update ``items`` as :func:`upsert_contacts` does, and keep statuses
    and suppressions in step: a status unsubscribed, bounced or complained adds its
    suppression; ``active`` here never lifts one (a contact that is bounced stays
    bounced: :func:`update_contact` lifts it, one contact at a time, on purpose); a
    new contact of a suppressed address takes the suppression's status. The caller
    commits."""
    if any(i.status not in (None, "active") for i in items):
        # Before the contacts are locked: the order of every writer (lock_feed).
        await lock_feed(session)
    stored = [dataclasses.replace(i, status=None) if i.status == "active" else i for i in items]
    results = await upsert_contacts(session, tenant_id, stored, on_conflict)
    statuses = {r.email: i.status for r, i in zip(results, stored, strict=True) if i.status}
    for email, status in statuses.items():
        await status_to_suppressions(session, tenant_id, email, status)
    fresh = sorted({r.email for r in results if r.created and r.email not in statuses})
    await _statuses_from_suppressions(session, tenant_id, fresh)
    return results


async def contact_of(session: AsyncSession, tenant_id: int, contact_id: int) -> Contact | None:
    """The tenant's contact of that id, or None."""
    found: Contact | None = (
        await session.execute(
            select(Contact).where(Contact.tenant_id == tenant_id, Contact.id == contact_id)
        )
    ).scalar_one_or_none()
    return found


async def update_contact(
    session: AsyncSession,
    tenant_id: int,
    contact_id: int,
    *,
    name: str | None = None,
    attributes: Mapping[str, Any] | None = None,
    timezone: str | None = None,
    locale: str | None = None,
    status: str | None = None,
) -> Contact | None:
    """Change the fields given of one contact (attributes merged; ``""`` clears the
    time zone or locale); a status given moves the suppressions too, ``active``
    included: it lifts an unsubscribe, bounce or complaint. None when the tenant has
    no such contact. The caller commits."""
    if status is not None:
        await lock_feed(session)
    row = await contact_of(session, tenant_id, contact_id)
    if row is None:
        return None
    item = ContactIn(row.email, name, attributes, timezone, locale, status)
    await upsert_contacts(session, tenant_id, [item])
    if status is not None:
        await status_to_suppressions(session, tenant_id, row.email, status)
    await session.refresh(row)
    return row


async def delete_contact(session: AsyncSession, tenant_id: int, contact_id: int) -> bool:
    """Delete one contact with its list memberships, topic choices and consents; its
    suppression, if any, stays (the address must still not be mailed)."""
    result = await session.execute(
        delete(Contact).where(Contact.tenant_id == tenant_id, Contact.id == contact_id)
    )
    return bool(getattr(result, "rowcount", 0))


# ---------------------------------------------------------------- declared attributes


@dataclass(frozen=True)
class Misfit:
    """A contact's value that the type being declared does not take."""

    contact_id: int
    value: Any
    reason: str


def _has_attribute(session: AsyncSession, name: str) -> Any:
    # Names are checked (NAME_RE) before they get here: plain letters, digits and _.
    if session.get_bind().dialect.name == "postgresql":
        return Contact.attributes.op("->")(name).isnot(None)
    return func.json_type(Contact.attributes, f'$."{name}"').isnot(None)


async def first_misfit(
    session: AsyncSession, tenant_id: int, name: str, type_: str
) -> Misfit | None:
    """The first of the tenant's contacts whose value of ``name`` is not of ``type_``
    (None: every value fits, or none is held). Reads every contact that holds one."""
    result = await session.stream(
        select(Contact.id, Contact.attributes)
        .where(Contact.tenant_id == tenant_id, _has_attribute(session, name))
        .order_by(Contact.id)
        .execution_options(yield_per=2000)
    )
    async for cid, attrs in result:
        value = (attrs or {}).get(name)
        if value is None:
            continue
        try:
            coerce(value, type_)
        except AttributeValueError as exc:
            await result.close()
            return Misfit(cid, value, str(exc))
    return None


async def declare_attribute(
    session: AsyncSession, tenant_id: int, name: str, type_: str
) -> tuple[AttributeDef, str] | Misfit:
    """Declare (or re-declare) an attribute: ``(row, "created" | "changed" |
    "unchanged")``, or the :class:`Misfit` that refuses it while a contact holds a
    value of ``name`` the type does not take. The caller commits."""
    row: AttributeDef | None = (
        await session.execute(
            select(AttributeDef)
            .where(AttributeDef.tenant_id == tenant_id, AttributeDef.name == name)
            .with_for_update()
        )
    ).scalar_one_or_none()
    if row is not None and row.type == type_:
        return row, "unchanged"
    misfit = await first_misfit(session, tenant_id, name, type_)
    if misfit is not None:
        return misfit
    if row is None:
        row = AttributeDef(tenant_id=tenant_id, name=name, type=type_, created_at=utcnow())
        session.add(row)
        await session.flush()
        return row, "created"
    row.type = type_
    await session.flush()
    return row, "changed"


async def undeclare_attribute(session: AsyncSession, tenant_id: int, name: str) -> bool:
    """Forget a declaration; the contacts' values stay (as undeclared attributes)."""
    result = await session.execute(
        delete(AttributeDef).where(AttributeDef.tenant_id == tenant_id, AttributeDef.name == name)
    )
    return bool(getattr(result, "rowcount", 0))


# ---------------------------------------------------------------- consents


async def add_consent(
    session: AsyncSession,
    tenant_id: int,
    contact_id: int,
    *,
    source: str,
    wording_version: str,
    purpose: str,
    at: dt.datetime | None,
    ip: str | None,
) -> Consent | None:
    """Record a consent of one contact (None: the tenant has no such contact). Consents
    are only ever added: how and when someone agreed is evidence."""
    if await contact_of(session, tenant_id, contact_id) is None:
        return None
    now = utcnow()
    row = Consent(
        tenant_id=tenant_id,
        contact_id=contact_id,
        source=source,
        wording_version=wording_version,
        purpose=purpose,
        at=at or now,
        ip=ip,
        created_at=now,
    )
    session.add(row)
    await session.flush()
    return row
