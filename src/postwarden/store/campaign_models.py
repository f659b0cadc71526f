"""Campaigns (issue 21; docs/campaigns.md): a tenant's campaign, each change of its
state with who and why, and one durable send record per (campaign, contact) written at
launch — the feeder sends from these, never from a loop over the audience.

A record's ``state``: ``pending`` (written at launch, not yet handed to acceptance),
``waiting`` (pending, but outside the send window in its recipient's time zone until
``not_before``), ``suppressed`` (not sent: ``reason`` says why — suppressed,
unsubscribed, bounced, complained, frequency cap), ``queued`` (in the spool as
``message_id``), then what delivery's events say: ``delivered``, ``deferred``,
``bounced``, ``complained``, or ``cancelled`` when the campaign is cancelled before it
was queued, ``failed`` when its message could not be made (a render error: ``reason``
says which). The spool's idempotency key for a record is a function of (campaign,
contact): a crash between the spool's fsync and the record's update sends nothing twice.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    false,
)
from sqlalchemy.orm import Mapped, mapped_column

from postwarden.store.models import Base, BigId, utcnow

#: The states of a send record (see the module's docstring).
RECORD_STATES = (
    "pending",
    "waiting",
    "suppressed",
    "queued",
    "delivered",
    "deferred",
    "bounced",
    "complained",
    "cancelled",
    "failed",
)


class Campaign(Base):
    __tablename__ = "campaigns"
    __table_args__ = (
        Index("ix_campaigns_tenant_id_id", "tenant_id", "id"),
        Index("ix_campaigns_state", "state"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(200))
    state: Mapped[str] = mapped_column(String(16), default="draft")  # campaigns.lifecycle
    audience_id: Mapped[int] = mapped_column(BigId)
    template_id: Mapped[int] = mapped_column(BigId)
    # The template version sent: fixed at validation, so approval approves a version.
    template_version: Mapped[int | None] = mapped_column(Integer, default=None)
    from_email: Mapped[str] = mapped_column(String(320))
    from_name: Mapped[str] = mapped_column(String(200), default="")
    reply_to: Mapped[str | None] = mapped_column(String(320), default=None)
    pool: Mapped[str | None] = mapped_column(String(64), default=None)
    send_window: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    tags: Mapped[list[str]] = mapped_column(JSON, default=list)
    meta: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    ab: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    scheduled_at: Mapped[dt.datetime | None] = mapped_column(default=None)
    snapshot_id: Mapped[int | None] = mapped_column(BigId, default=None)
    # The key (prefix) that last changed the campaign: not the one that approves it.
    last_editor: Mapped[str | None] = mapped_column(String(16), default=None)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    launched_at: Mapped[dt.datetime | None] = mapped_column(default=None)
    finished_at: Mapped[dt.datetime | None] = mapped_column(default=None)
    # The launch (control.campaign_runner): feeding is split in ``parts`` parts (a
    # record's id modulo parts), fixed when it starts; ``records_done`` once every
    # member of the snapshot has its record. ``runner``/``lease_until``: who writes the
    # records now.
    parts: Mapped[int | None] = mapped_column(Integer, default=None)
    records_done: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    runner: Mapped[str | None] = mapped_column(String(80), default=None)
    lease_until: Mapped[dt.datetime | None] = mapped_column(default=None)
    # Tracking (issue 22): off | anonymous | per_recipient; None follows the tenant's.
    tracking: Mapped[str | None] = mapped_column(String(16), default=None)


class CampaignFeed(Base):
    """One part of a sending campaign's records and the runner feeding it (a lease)."""

    __tablename__ = "campaign_feeds"

    campaign_id: Mapped[int] = mapped_column(
        ForeignKey("campaigns.id", ondelete="CASCADE"), primary_key=True
    )
    part: Mapped[int] = mapped_column(Integer, primary_key=True)
    runner: Mapped[str | None] = mapped_column(String(80), default=None)
    lease_until: Mapped[dt.datetime | None] = mapped_column(default=None)


class CampaignTransition(Base):
    """One change of a campaign's state: the action, who asked (a key's prefix, or
    None for the runner) and why (``/v1/campaigns/{id}/history``)."""

    __tablename__ = "campaign_transitions"
    __table_args__ = (Index("ix_campaign_transitions_campaign_id_id", "campaign_id", "id"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    campaign_id: Mapped[int] = mapped_column(ForeignKey("campaigns.id", ondelete="CASCADE"))
    action: Mapped[str] = mapped_column(String(16))
    before: Mapped[str] = mapped_column(String(16))
    after: Mapped[str] = mapped_column(String(16))
    key_prefix: Mapped[str | None] = mapped_column(String(16), default=None)
    reason: Mapped[str] = mapped_column(Text, default="")
    at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class SendRecord(Base):
    """One recipient of a campaign: written at launch, then moved by the feeder and
    by delivery's events."""

    __tablename__ = "send_records"
    __table_args__ = (
        UniqueConstraint("campaign_id", "contact_id"),
        # The feeder's scan: a campaign's pending records in id order.
        Index("ix_send_records_campaign_id_state_id", "campaign_id", "state", "id"),
        # Delivery's events find their record by message id.
        Index("ix_send_records_message_id", "message_id"),
        # The frequency cap: a contact's sends in the last day.
        Index("ix_send_records_contact_id_sent_at", "contact_id", "sent_at"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    campaign_id: Mapped[int] = mapped_column(ForeignKey("campaigns.id", ondelete="CASCADE"))
    # The contact's id and address as they were at launch (no foreign key: a contact
    # deleted later still shows that it was sent to).
    contact_id: Mapped[int] = mapped_column(BigId)
    email: Mapped[str] = mapped_column(String(320))
    state: Mapped[str] = mapped_column(String(16), default="pending")  # RECORD_STATES
    reason: Mapped[str] = mapped_column(String(200), default="")
    variant: Mapped[str | None] = mapped_column(String(32), default=None)
    # Chosen before the message is handed to the spool (so delivery's events always
    # find the record), with ``sent_at`` once the spool has it.
    message_id: Mapped[str | None] = mapped_column(String(64), default=None)
    sent_at: Mapped[dt.datetime | None] = mapped_column(default=None)
    # ``waiting``: outside the send window in the recipient's time zone until then.
    not_before: Mapped[dt.datetime | None] = mapped_column(default=None)
    # The first human click (tracking, issue 22) and the first conversion reported
    # (POST /v1/campaigns/{id}/conversions): what an A/B test is decided on.
    clicked_at: Mapped[dt.datetime | None] = mapped_column(default=None)
    opened_at: Mapped[dt.datetime | None] = mapped_column(default=None)  # first human open
    converted_at: Mapped[dt.datetime | None] = mapped_column(default=None)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class UnsubscribeRequest(Base):
    """A request to a campaign message's List-Unsubscribe address (HTTPS or mailto),
    kept as received: the placeholder until the one-click endpoint (issue 22)."""

    __tablename__ = "unsubscribe_requests"
    __table_args__ = (
        Index("ix_unsubscribe_requests_tenant_id_id", "tenant_id", "id"),
        # A campaign's unsubscribes (its stats).
        Index("ix_unsubscribe_requests_campaign_id", "campaign_id"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    campaign_id: Mapped[int | None] = mapped_column(BigId, default=None)
    contact_id: Mapped[int | None] = mapped_column(BigId, default=None)
    email: Mapped[str] = mapped_column(String(320))
    # GET | HEAD | POST | mailto | preferences (16 since migration 0013)
    method: Mapped[str] = mapped_column(String(16))
    ip: Mapped[str | None] = mapped_column(String(45), default=None)
    user_agent: Mapped[str] = mapped_column(String(500), default="")
    at: Mapped[dt.datetime] = mapped_column(default=utcnow)
