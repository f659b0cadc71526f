"""A contact's lists and topics in the control database (issue 20): static list
membership, added and removed by contact id or email, and topic choices.

Every query filters on the tenant: a contact id or an email of another tenant names
nothing here, so it cannot be added to this tenant's list.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncSession

from postwarden.store.contact_models import Contact, ListMember, Topic, TopicSubscription
from postwarden.store.contacts import CHUNK, normalize_email
from postwarden.store.models import utcnow


def _insert(session: AsyncSession) -> Any:
    return pg_insert if session.get_bind().dialect.name == "postgresql" else sqlite_insert


async def contact_ids(
    session: AsyncSession,
    tenant_id: int,
    *,
    ids: Sequence[int] = (),
    emails: Sequence[str] = (),
) -> dict[int | str, int]:
    """The tenant's contacts among ``ids`` (id → id) or ``emails`` (each email as
    given → id); the unknown ones are left out."""
    found: dict[int | str, int] = {}
    for i in range(0, len(ids), CHUNK):
        rows = await session.execute(
            select(Contact.id).where(
                Contact.tenant_id == tenant_id, Contact.id.in_(ids[i : i + CHUNK])
            )
        )
        found.update({cid: cid for cid in rows.scalars()})
    keys = {e: normalize_email(e) for e in emails}
    wanted = sorted(set(keys.values()))
    by_key: dict[str, int] = {}
    for i in range(0, len(wanted), CHUNK):
        pairs = await session.execute(
            select(Contact.email, Contact.id).where(
                Contact.tenant_id == tenant_id, Contact.email.in_(wanted[i : i + CHUNK])
            )
        )
        by_key.update({email: cid for email, cid in pairs.all()})
    found.update({e: by_key[k] for e, k in keys.items() if k in by_key})
    return found


async def add_members(
    session: AsyncSession, tenant_id: int, list_id: int, ids: Sequence[int]
) -> set[int]:
    """Add the tenant's contacts ``ids`` to the list (checked to be the tenant's by the
    caller); those that were not members yet."""
    added: set[int] = set()
    unique = sorted(set(ids))
    now = utcnow()
    stmt = (
        _insert(session)(ListMember)
        .on_conflict_do_nothing(index_elements=["list_id", "contact_id"])
        .returning(ListMember.contact_id)
    )
    for i in range(0, len(unique), CHUNK):
        rows = [
            {"list_id": list_id, "contact_id": cid, "tenant_id": tenant_id, "added_at": now}
            for cid in unique[i : i + CHUNK]
        ]
        added.update((await session.execute(stmt, rows)).scalars())
    return added


async def remove_members(
    session: AsyncSession, tenant_id: int, list_id: int, ids: Sequence[int]
) -> set[int]:
    """Remove ``ids`` from the list; those that were members."""
    removed: set[int] = set()
    unique = sorted(set(ids))
    for i in range(0, len(unique), CHUNK):
        result = await session.execute(
            delete(ListMember)
            .where(
                ListMember.tenant_id == tenant_id,
                ListMember.list_id == list_id,
                ListMember.contact_id.in_(unique[i : i + CHUNK]),
            )
            .returning(ListMember.contact_id)
        )
        removed.update(result.scalars())
    return removed


@dataclass(frozen=True)
class Member:
    contact_id: int
    email: str
    added_at: dt.datetime


async def members_page(
    session: AsyncSession, tenant_id: int, list_id: int, after: int, limit: int
) -> list[Member]:
    """A page of the list's members in contact id order, after contact id ``after``."""
    rows = await session.execute(
        select(ListMember.contact_id, Contact.email, ListMember.added_at)
        .join(Contact, Contact.id == ListMember.contact_id)
        .where(
            ListMember.tenant_id == tenant_id,
            ListMember.list_id == list_id,
            ListMember.contact_id > after,
        )
        .order_by(ListMember.contact_id)
        .limit(limit)
    )
    return [Member(cid, email, at) for cid, email, at in rows.all()]


async def lists_of(session: AsyncSession, tenant_id: int, contact_id: int) -> list[int]:
    """The ids of the lists the contact is in."""
    rows = await session.execute(
        select(ListMember.list_id)
        .where(ListMember.tenant_id == tenant_id, ListMember.contact_id == contact_id)
        .order_by(ListMember.list_id)
    )
    return list(rows.scalars())


# ---------------------------------------------------------------- topics


@dataclass(frozen=True)
class Choice:
    topic_id: int
    opted_in: bool
    chosen_at: dt.datetime | None  # None: no choice recorded, the topic's default


async def choices_of(session: AsyncSession, tenant_id: int, contact_id: int) -> list[Choice]:
    """The contact's standing on every topic of the tenant: its choice, else the
    topic's default."""
    rows = await session.execute(
        select(
            Topic.id, Topic.default_opt_in, TopicSubscription.opted_in, TopicSubscription.changed_at
        )
        .outerjoin(
            TopicSubscription,
            (TopicSubscription.topic_id == Topic.id)
            & (TopicSubscription.contact_id == contact_id)
            & (TopicSubscription.tenant_id == tenant_id),
        )
        .where(Topic.tenant_id == tenant_id)
        .order_by(Topic.id)
    )
    return [
        Choice(tid, default if chosen is None else chosen, at)
        for tid, default, chosen, at in rows.all()
    ]


async def choose(
    session: AsyncSession, tenant_id: int, topic_id: int, contact_id: int, opted_in: bool
) -> Choice:
    """Record the contact's choice for a topic (both checked to be the tenant's by the
    caller), replacing an earlier one."""
    now = utcnow()
    stmt = (
        _insert(session)(TopicSubscription)
        .values(
            topic_id=topic_id,
            contact_id=contact_id,
            tenant_id=tenant_id,
            opted_in=opted_in,
            changed_at=now,
        )
        .on_conflict_do_update(
            index_elements=["topic_id", "contact_id"],
            set_={"opted_in": opted_in, "changed_at": now},
        )
    )
    await session.execute(stmt)
    return Choice(topic_id, opted_in, now)


async def unchoose(session: AsyncSession, tenant_id: int, topic_id: int, contact_id: int) -> bool:
    """Forget the contact's choice (the topic's default applies again)."""
    result = await session.execute(
        delete(TopicSubscription).where(
            TopicSubscription.tenant_id == tenant_id,
            TopicSubscription.topic_id == topic_id,
            TopicSubscription.contact_id == contact_id,
        )
    )
    return bool(getattr(result, "rowcount", 0))
