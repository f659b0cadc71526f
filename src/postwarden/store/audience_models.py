"""Audiences (issue 20): a tenant's saved rules, and snapshots of who matched one at
a moment (the contacts' ids, written by one ``INSERT … SELECT``; campaigns send to a
snapshot). The rule's language: docs/audiences.md."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import ForeignKey, Index, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from postwarden.store.contact_models import Consent
from postwarden.store.models import Base, BigId, utcnow

#: ``has_consent("marketing")`` reads the contacts with a consent of one purpose: an
#: index-only scan of this instead of every consent of every tenant (migration 0008).
#: Declared here, with the audiences that need it, on contact_models' table.
CONSENT_PURPOSE_INDEX = Index(
    "ix_consents_tenant_id_purpose_contact_id",
    Consent.tenant_id,
    Consent.purpose,
    Consent.contact_id,
)


class Audience(Base):
    __tablename__ = "audiences"
    __table_args__ = (UniqueConstraint("tenant_id", "name"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(200))
    rule: Mapped[str] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class AudienceSnapshot(Base):
    """Who matched an audience's rule at ``taken_at`` (the rule as it was then)."""

    __tablename__ = "audience_snapshots"
    __table_args__ = (Index("ix_audience_snapshots_audience_id_id", "audience_id", "id"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    audience_id: Mapped[int] = mapped_column(ForeignKey("audiences.id", ondelete="CASCADE"))
    rule: Mapped[str] = mapped_column(Text)
    count: Mapped[int] = mapped_column(BigId)
    taken_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class SnapshotMember(Base):
    """One contact of a snapshot. The id as it was: no foreign key to ``contacts``,
    so that a contact deleted later still shows that it was in."""

    __tablename__ = "audience_snapshot_members"

    snapshot_id: Mapped[int] = mapped_column(
        ForeignKey("audience_snapshots.id", ondelete="CASCADE"), primary_key=True
    )
    contact_id: Mapped[int] = mapped_column(BigId, primary_key=True)
