"""The one place an unsubscribe is recorded (issue 22; docs/decisions/0011): the
one-click POST and the confirmation page's POST to a List-Unsubscribe link, the mailto
handled by the inbound MX, and the preference center's opt-out all come here.

Every request to a valid link is kept in ``unsubscribe_requests`` (a GET or HEAD too:
scanners follow links, and a GET never unsubscribes by itself). An unsubscribe
suppresses the address for the tenant through the one suppression store (reason
``unsubscribe``; an entry in force without an expiry is kept), the contact follows, and
an ``unsubscribed`` event joins the event stream the first time.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select

from postwarden.store.campaign_models import SendRecord, UnsubscribeRequest
from postwarden.store.contact_models import Contact
from postwarden.store.feed import lock_events
from postwarden.store.models import Event, Tenant
from postwarden.store.suppress import upsert_suppression

#: The ways in that unsubscribe (a GET or HEAD only asks).
UNSUBSCRIBING = ("POST", "mailto", "preferences")
USER_AGENT_MAX = 500


@dataclass(frozen=True)
class Unsubscribe:
    tenant_id: int
    campaign_id: int | None
    contact_id: int | None
    method: str  # GET | HEAD | POST | mailto | preferences
    source: str  # the suppression's source: list-unsubscribe, preference-center...
    ip: str | None = None
    user_agent: str = ""


@dataclass(frozen=True)
class Recorded:
    email: str  # "" when neither the campaign's record nor the contact names one
    unsubscribed: bool  # suppressed by this request (not before)
    message_id: str | None


async def _address(s: Any, u: Unsubscribe) -> tuple[str, str | None]:
    """The address and message id: the campaign's send record, else the contact."""
    if u.campaign_id and u.contact_id:
        row = (
            await s.execute(
                select(SendRecord.email, SendRecord.message_id)
                .where(
                    SendRecord.tenant_id == u.tenant_id,
                    SendRecord.campaign_id == u.campaign_id,
                    SendRecord.contact_id == u.contact_id,
                )
                .limit(1)
            )
        ).first()
        if row is not None:
            return row[0], row[1]
    if u.contact_id:
        email = await s.scalar(
            select(Contact.email).where(
                Contact.tenant_id == u.tenant_id, Contact.id == u.contact_id
            )
        )
        if email:
            return email, None
    return "", None


async def record(s: Any, u: Unsubscribe) -> Recorded | None:
    """Record one request in the session's transaction (the caller commits, then
    refreshes the suppression cache: :func:`in_force`). None when the tenant is gone."""
    if (await s.execute(select(Tenant.id).where(Tenant.id == u.tenant_id))).first() is None:
        return None
    email, message_id = await _address(s, u)
    s.add(
        UnsubscribeRequest(
            tenant_id=u.tenant_id,
            campaign_id=u.campaign_id or None,
            contact_id=u.contact_id or None,
            email=email,
            method=u.method,
            ip=u.ip[:45] if u.ip else None,
            user_agent=u.user_agent[:USER_AGENT_MAX],
        )
    )
    if u.method not in UNSUBSCRIBING or not email:
        return Recorded(email, False, message_id)
    note = f"campaign {u.campaign_id or '-'}, contact {u.contact_id or '-'}, by {u.method}"
    _row, how = await upsert_suppression(
        s, u.tenant_id, email, "unsubscribe", u.source, note, None,
        keep=lambda row: row.expires_at is None,
    )  # fmt: skip
    if how == "kept":
        return Recorded(email, False, message_id)
    await lock_events(s)
    s.add(
        Event(
            tenant_id=u.tenant_id,
            ts=dt.datetime.now(dt.UTC),
            type="unsubscribed",
            message_id=(message_id or "")[:40],
            recipient_id=None,
            recipient=email,
            tags="",
            detail={
                "method": u.method,
                "source": u.source,
                "campaign_id": u.campaign_id,
                "contact_id": u.contact_id,
            },
        )
    )
    return Recorded(email, True, message_id)
