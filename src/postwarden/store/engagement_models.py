"""Engagement (issue 22; docs/decisions/0011, docs/tracking.md): the tenants' keys for
the links in their mail, and the hits on the open pixel and the click redirects.

``tenant_keys``: per tenant and purpose, generations of 32 random bytes sealed under
the control encryption key. Purpose ``links`` signs the tokens of tracking,
unsubscribe and preference links; each generation has a ``kid`` (4 random bytes, as 8
hex digits) that the tokens carry in clear; the newest generation not retired signs,
every one not retired reads. Purpose ``tombstone`` (one per tenant, never rotated)
keys the hashes that keep erased addresses suppressed.

``tracking_hits``: every request to a pixel or a redirect whose token read, written
first (a batch per transaction) and judged after (``machine``/``reason`` set by the
verdict pass once ``tracking.settle`` has passed; null until then).
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import (
    Boolean,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    false,
)
from sqlalchemy.orm import Mapped, mapped_column

from postwarden.store.models import Base, BigId, utcnow

#: Purposes of tenant keys.
LINKS = "links"
TOMBSTONE = "tombstone"


class TenantKey(Base):
    __tablename__ = "tenant_keys"
    __table_args__ = (
        UniqueConstraint("kid"),
        UniqueConstraint("tenant_id", "purpose", "generation"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    purpose: Mapped[str] = mapped_column(String(16))  # LINKS | TOMBSTONE
    generation: Mapped[int] = mapped_column(Integer)
    kid: Mapped[str] = mapped_column(String(8))  # 4 bytes as hex
    secret: Mapped[bytes] = mapped_column(LargeBinary)  # sealed under the encryption key
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    retired_at: Mapped[dt.datetime | None] = mapped_column(default=None)


class TrackingHit(Base):
    __tablename__ = "tracking_hits"
    __table_args__ = (
        # Every hit updates each index (a recipient's click waits for it): four.
        # A campaign's hits in id order (its hits list, its counts).
        Index("ix_tracking_hits_campaign_id_id", "campaign_id", "id"),
        # The verdict pass: hits not judged yet, oldest first.
        Index("ix_tracking_hits_judged_at_id", "judged_at", "id"),
        # A message's hits, judged together.
        Index("ix_tracking_hits_message_id", "message_id"),
        Index("ix_tracking_hits_at", "at"),  # retention
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(8))  # open | click
    # What the token named: none of these for an anonymous link but the campaign.
    campaign_id: Mapped[int | None] = mapped_column(BigId, default=None)
    contact_id: Mapped[int | None] = mapped_column(BigId, default=None)
    message_id: Mapped[str | None] = mapped_column(String(64), default=None)
    # A click: which link (0, 1... in document order); an open: how many tracked
    # links its message has (the verdicts' "every link at once").
    link_index: Mapped[int | None] = mapped_column(Integer, default=None)
    url: Mapped[str | None] = mapped_column(Text, default=None)
    # The request.
    at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    method: Mapped[str] = mapped_column(String(8), default="GET")
    ip: Mapped[str | None] = mapped_column(String(45), default=None)
    user_agent: Mapped[str] = mapped_column(String(500), default="")
    ranged: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    # The verdict (null until judged).
    machine: Mapped[bool | None] = mapped_column(Boolean, default=None)
    reason: Mapped[str] = mapped_column(String(40), default="")
    judged_at: Mapped[dt.datetime | None] = mapped_column(default=None)


__all__ = ["LINKS", "TOMBSTONE", "TenantKey", "TrackingHit"]
