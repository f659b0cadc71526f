"""A campaign's launch in the database (issue 21; docs/campaigns.md): who it goes to
is fixed by a snapshot of its audience, and each of them gets one send record, written
by the database in batches (``INSERT … SELECT``), ``pending`` or ``suppressed`` with
the reason. The feeder sends from these records only.

A batch starts after the highest contact id already written for the campaign and
inserts with ``ON CONFLICT DO NOTHING`` on (campaign, contact): a launch interrupted
anywhere resumes where it stopped, and a batch written twice changes nothing.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import and_, case, func, literal, or_, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession

from postwarden.store.audience_models import Audience, SnapshotMember
from postwarden.store.audiences import plan_for, take_snapshot
from postwarden.store.campaign_models import Campaign, SendRecord
from postwarden.store.contact_models import Contact
from postwarden.store.models import BigId, Suppression, utcnow

#: Records one launch batch writes (one statement, one commit).
LAUNCH_BATCH = 5000


async def snapshot_audience(session: AsyncSession, campaign: Campaign) -> int:
    """Take the snapshot the campaign sends to (once: a campaign that has one keeps
    it) and return its id. The caller commits."""
    if campaign.snapshot_id is not None:
        return campaign.snapshot_id
    audience = await session.get(Audience, campaign.audience_id)
    if audience is None or audience.tenant_id != campaign.tenant_id:
        raise LookupError(f"audience {campaign.audience_id} is gone")
    plan = await plan_for(session, campaign.tenant_id, audience.rule)
    snap = await take_snapshot(session, campaign.tenant_id, audience.id, audience.rule, plan)
    campaign.snapshot_id = snap.id
    return snap.id


def _insert(dialect: str) -> Any:
    return (postgresql if dialect == "postgresql" else sqlite).insert(SendRecord)


async def write_records(
    session: AsyncSession, campaign: Campaign, batch: int = LAUNCH_BATCH
) -> int:
    """Write the next ``batch`` send records of the campaign's snapshot, in contact id
    order; return how many were written (0: every member has one). The caller commits.

    A member whose contact is not ``active``, or whose address has a suppression in
    force, is ``suppressed`` with the reason (the suppression's, else the contact's
    status); the rest are ``pending``. A member deleted as a contact since the snapshot
    gets no record."""
    if campaign.snapshot_id is None:
        raise ValueError("the campaign has no snapshot: snapshot_audience first")
    after = await session.scalar(
        select(func.coalesce(func.max(SendRecord.contact_id), 0)).where(
            SendRecord.campaign_id == campaign.id
        )
    )
    now = utcnow()
    sup = and_(
        Suppression.tenant_id == campaign.tenant_id,
        Suppression.address == Contact.email,
        or_(Suppression.expires_at.is_(None), Suppression.expires_at > now),
    )
    inactive = Contact.status != "active"
    chosen = (
        select(
            literal(campaign.tenant_id, BigId),
            literal(campaign.id, BigId),
            SnapshotMember.contact_id,
            Contact.email,
            case(
                (Suppression.id.is_not(None), "suppressed"),
                (inactive, "suppressed"),
                else_="pending",
            ),
            case(
                (Suppression.id.is_not(None), Suppression.reason),
                (inactive, Contact.status),
                else_="",
            ),
            literal(now),
        )
        .select_from(
            SnapshotMember.__table__.join(
                Contact.__table__, Contact.id == SnapshotMember.contact_id
            ).outerjoin(Suppression.__table__, sup)
        )
        .where(
            SnapshotMember.snapshot_id == campaign.snapshot_id,
            SnapshotMember.contact_id > after,
            Contact.tenant_id == campaign.tenant_id,
        )
        .order_by(SnapshotMember.contact_id)
        .limit(batch)
    )
    columns = ["tenant_id", "campaign_id", "contact_id", "email", "state", "reason",
               "updated_at"]  # fmt: skip
    stmt = (
        _insert(session.get_bind().dialect.name)
        .from_select(columns, chosen)
        .on_conflict_do_nothing(index_elements=["campaign_id", "contact_id"])
    )
    result = await session.execute(stmt)
    return int(result.rowcount)  # type: ignore[attr-defined]


async def record_counts(session: AsyncSession, campaign_id: int) -> dict[str, int]:
    """The campaign's records by state (states with none are left out)."""
    rows = await session.execute(
        select(SendRecord.state, func.count())
        .where(SendRecord.campaign_id == campaign_id)
        .group_by(SendRecord.state)
    )
    return {state: int(n) for state, n in rows.all()}
