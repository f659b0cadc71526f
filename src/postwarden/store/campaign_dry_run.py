"""What a campaign's launch would write, counted without writing it (the dry run,
issue 21; docs/campaigns.md "Dry run").

A launch snapshots every contact its audience's rule selects, whatever the contact's
status, and writes each a send record: ``suppressed`` with a reason when the contact
is not ``active`` or its address has a suppression in force, else ``pending``
(``store.campaigns.write_records``). These functions ask the same question of the
contacts as they are now, in SQL: counts by reason, and the first sendable contacts.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import and_, case, exists, func, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from postwarden.audiences import Plan
from postwarden.store.audiences import selection, whole_tenant
from postwarden.store.contact_models import Contact
from postwarden.store.models import Suppression, utcnow

#: The reason of a contact that would be sent to.
SENDABLE = ""


def _in_force(tenant_id: int, now: dt.datetime) -> Any:
    """A suppression of the tenant in force at ``now`` for the contact's address."""
    return and_(
        Suppression.tenant_id == tenant_id,
        Suppression.address == Contact.email,
        or_(Suppression.expires_at.is_(None), Suppression.expires_at > now),
    )


def _with_suppressions(plan: Plan, tenant_id: int, dialect: str) -> tuple[Any, Any, Any]:
    """The FROM, the WHERE and the reason of every contact a launch would snapshot:
    the suppression's reason when one is in force for its address, else its status
    when it is not ``active``, else :data:`SENDABLE` (as the launch writes them)."""
    frm, cond = selection(plan, tenant_id, dialect, any_status=True)
    reason = case(
        (Suppression.id.is_not(None), Suppression.reason),
        (Contact.status != "active", Contact.status),
        else_=SENDABLE,
    )
    return frm.outerjoin(Suppression.__table__, _in_force(tenant_id, utcnow())), cond, reason


async def recipient_counts(
    session: AsyncSession, tenant_id: int, plan: Plan, time_limit: float | None = None
) -> dict[str, int]:
    """How many contacts the plan selects, by the reason a launch would suppress them
    (:data:`SENDABLE` for those it would send to); reasons with none are left out.
    ``store.audiences.CountTooSlow`` past ``time_limit`` seconds on PostgreSQL (the
    caller's transaction, or savepoint, must then roll back)."""
    frm, cond, reason = _with_suppressions(plan, tenant_id, session.get_bind().dialect.name)
    # Grouped outside: one CASE, not one in the SELECT and another in the GROUP BY
    # (whose bound values PostgreSQL would not see as the same expression).
    each = select(reason.label("reason")).select_from(frm).where(cond).subquery()
    stmt = select(each.c.reason, func.count()).group_by(each.c.reason)
    rows = (await whole_tenant(session, stmt, time_limit)).all()
    return {str(why): int(n) for why, n in rows}


async def sendable_sample(
    session: AsyncSession, tenant_id: int, plan: Plan, n: int
) -> list[Contact]:
    """The first ``n`` contacts (in id order) the plan selects that a launch would
    send to: active, with no suppression in force. ``NOT EXISTS`` rather than the
    counts' outer join: PostgreSQL then walks the contacts in id order and stops at
    the ``n``-th (3 to 10 ms over a million contacts, where the join took 0.5 to 4 s:
    docs/campaigns.md "Dry run")."""
    frm, cond = selection(plan, tenant_id, session.get_bind().dialect.name, any_status=True)
    stmt = (
        select(Contact)
        .select_from(frm)
        .where(cond, Contact.status == "active", ~exists().where(_in_force(tenant_id, utcnow())))
        .order_by(Contact.id)
        .limit(n)
    )
    return list((await session.execute(stmt)).scalars())
