"""A contact's personal data (issue 22, GDPR; docs/privacy.md): everything about it as
one document, and its erasure.

Erasure, in one transaction: the contact goes (with its list memberships, topic
choices and consents); its address is replaced by its tombstone (``engagement.
tombstones``) wherever a row must stay — send records (campaign counts), message
recipients, events, unsubscribe requests — and those rows lose what else could name a
person (responses that quote the address, IP addresses, user agents, tracked URLs);
its suppression becomes a suppression of the tombstone, which the one suppression
check finds, so the address stays unmailable while nothing readable of it is left.
An address with no suppression gets one (reason ``manual``, source ``erasure``): a
person who asked to be forgotten is not mailed again.

Rows are found by the contact's id and by its address as the contact holds it (the
suppression key: lower case); a message recipient written in another spelling is not
found. What the control database cannot reach — the spool's segment files of mail
still queued, logs, backups — is bounded by their own retention.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import delete, or_, select, update

from postwarden.store.campaign_models import SendRecord, UnsubscribeRequest
from postwarden.store.contact_models import (
    Consent,
    Contact,
    ListMember,
    TopicSubscription,
)
from postwarden.store.engagement_models import TrackingHit
from postwarden.store.feed import lock_events, lock_feed, record_change
from postwarden.store.models import Event, Recipient, Suppression

#: Rows of each kind an export holds at most (the newest).
EXPORT_LIMIT = 10_000


def _row(obj: Any, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    out = {}
    for col in obj.__table__.columns:
        if col.key in skip:
            continue
        value = getattr(obj, col.key)
        if isinstance(value, dt.datetime):
            value = value.isoformat()
        elif isinstance(value, bytes):
            continue
        out[col.key] = value
    return out


async def _all(s: Any, stmt: Any) -> list[Any]:
    return list((await s.execute(stmt.limit(EXPORT_LIMIT))).scalars())


async def export(s: Any, tenant_id: int, contact_id: int) -> dict[str, Any] | None:
    """Everything the control database holds about a contact, or None when the
    tenant has no such contact."""
    contact = await s.scalar(
        select(Contact).where(Contact.tenant_id == tenant_id, Contact.id == contact_id)
    )
    if contact is None:
        return None
    email = contact.email
    mine_sr = or_(SendRecord.contact_id == contact_id, SendRecord.email == email)
    mine_ur = or_(UnsubscribeRequest.contact_id == contact_id, UnsubscribeRequest.email == email)
    sections: dict[str, Any] = {
        "contact": _row(contact, ("tenant_id",)),
        "lists": [
            m.list_id
            for m in await _all(
                s,
                select(ListMember).where(
                    ListMember.tenant_id == tenant_id, ListMember.contact_id == contact_id
                ),
            )
        ],
        "topics": [
            _row(t, ("tenant_id", "contact_id"))
            for t in await _all(
                s,
                select(TopicSubscription).where(
                    TopicSubscription.tenant_id == tenant_id,
                    TopicSubscription.contact_id == contact_id,
                ),
            )
        ],
        "consents": [
            _row(c, ("tenant_id", "contact_id"))
            for c in await _all(
                s,
                select(Consent)
                .where(Consent.tenant_id == tenant_id, Consent.contact_id == contact_id)
                .order_by(Consent.id),
            )
        ],
        "suppression": None,
        "send_records": [
            _row(r, ("tenant_id",))
            for r in await _all(
                s,
                select(SendRecord)
                .where(SendRecord.tenant_id == tenant_id, mine_sr)
                .order_by(SendRecord.id.desc()),
            )
        ],
        "message_recipients": [
            _row(r, ("tenant_id",))
            for r in await _all(
                s,
                select(Recipient)
                .where(Recipient.tenant_id == tenant_id, Recipient.address == email)
                .order_by(Recipient.updated_at.desc()),
            )
        ],
        "events": [
            _row(e, ("tenant_id",))
            for e in await _all(
                s,
                select(Event)
                .where(Event.tenant_id == tenant_id, Event.recipient == email)
                .order_by(Event.id.desc()),
            )
        ],
        "unsubscribe_requests": [
            _row(u, ("tenant_id",))
            for u in await _all(
                s,
                select(UnsubscribeRequest)
                .where(UnsubscribeRequest.tenant_id == tenant_id, mine_ur)
                .order_by(UnsubscribeRequest.id.desc()),
            )
        ],
        "tracking_hits": [
            _row(h, ("tenant_id",))
            for h in await _all(
                s,
                select(TrackingHit)
                .where(TrackingHit.tenant_id == tenant_id, TrackingHit.contact_id == contact_id)
                .order_by(TrackingHit.id.desc()),
            )
        ],
    }
    supp = await s.scalar(
        select(Suppression).where(Suppression.tenant_id == tenant_id, Suppression.address == email)
    )
    if supp is not None:
        sections["suppression"] = _row(supp, ("tenant_id", "id"))
    sections["limit"] = EXPORT_LIMIT
    return sections


async def erase(s: Any, tenant_id: int, contact_id: int, tomb: str) -> dict[str, int] | None:
    """Erase a contact (the caller commits, then refreshes the suppression cache for
    the tombstone): rows changed per table, or None when the tenant has no such
    contact. ``tomb``: the tombstone of the contact's address."""
    contact = await s.scalar(
        select(Contact).where(Contact.tenant_id == tenant_id, Contact.id == contact_id)
    )
    if contact is None:
        return None
    email = contact.email
    done: dict[str, int] = {}

    def count(name: str, result: Any) -> None:
        done[name] = int(getattr(result, "rowcount", 0) or 0)

    # Feed lock first, then events: the order every writer takes them in.
    await lock_feed(s)
    old = await s.scalar(
        select(Suppression).where(Suppression.tenant_id == tenant_id, Suppression.address == email)
    )
    kept = await s.scalar(
        select(Suppression).where(Suppression.tenant_id == tenant_id, Suppression.address == tomb)
    )
    if kept is None:
        s.add(
            Suppression(
                tenant_id=tenant_id,
                address=tomb,
                reason=old.reason if old is not None else "manual",
                source="erasure",
                note="",
                expires_at=None,
            )
        )
    if old is not None:
        await s.delete(old)
        await record_change(s, "suppression", tenant_id, email)
    await record_change(s, "suppression", tenant_id, tomb)
    done["suppressions"] = 1
    no_opts = {"synchronize_session": False}
    count(
        "send_records",
        await s.execute(
            update(SendRecord)
            .where(
                SendRecord.tenant_id == tenant_id,
                or_(SendRecord.contact_id == contact_id, SendRecord.email == email),
            )
            .values(email=tomb, reason="")
            .execution_options(**no_opts)
        ),
    )
    count(
        "message_recipients",
        await s.execute(
            update(Recipient)
            .where(Recipient.tenant_id == tenant_id, Recipient.address == email)
            .values(address=tomb, last_response="")
            .execution_options(**no_opts)
        ),
    )
    await lock_events(s)
    count(
        "events",
        await s.execute(
            update(Event)
            .where(Event.tenant_id == tenant_id, Event.recipient == email)
            .values(recipient=tomb, detail={"erased": True})
            .execution_options(**no_opts)
        ),
    )
    count(
        "unsubscribe_requests",
        await s.execute(
            update(UnsubscribeRequest)
            .where(
                UnsubscribeRequest.tenant_id == tenant_id,
                or_(
                    UnsubscribeRequest.contact_id == contact_id,
                    UnsubscribeRequest.email == email,
                ),
            )
            .values(email=tomb, ip=None, user_agent="")
            .execution_options(**no_opts)
        ),
    )
    count(
        "tracking_hits",
        await s.execute(
            update(TrackingHit)
            .where(TrackingHit.tenant_id == tenant_id, TrackingHit.contact_id == contact_id)
            .values(ip=None, user_agent="", url=None)
            .execution_options(**no_opts)
        ),
    )
    count(
        "contacts",
        await s.execute(
            delete(Contact).where(Contact.tenant_id == tenant_id, Contact.id == contact_id)
        ),
    )
    return done
