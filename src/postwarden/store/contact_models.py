"""Contacts, their attributes and consent, lists and topics (issue 20).

Every row carries ``tenant_id`` and every query made on a tenant's behalf filters on
it. A contact's ``email`` is stored as the suppression check compares addresses
(``mail.addresses.suppression_key``), so a contact and its suppression are found by
the same spelling; unique per tenant. Suppressions stay the one check every send path
makes; a contact's ``status`` is kept in step with them (``store.contacts``).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    ForeignKey,
    Index,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column

from postwarden.store.models import Base, BigId, utcnow

#: A contact's status: ``active`` may be sent to; the others follow suppressions.
CONTACT_STATUSES = ("active", "unsubscribed", "bounced", "complained")
#: The types an attribute may be declared with (``contacts.attributes``).
ATTRIBUTE_TYPES = ("string", "number", "boolean", "date", "list")
#: How often a contact wants campaigns (``contacts.frequency``; null: every campaign).
FREQUENCIES = ("weekly", "monthly")


class Contact(Base):
    __tablename__ = "contacts"
    __table_args__ = (
        UniqueConstraint("tenant_id", "email"),
        # A tenant's contacts in id order (pages, audience walks).
        Index("ix_contacts_tenant_id_id", "tenant_id", "id"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    email: Mapped[str] = mapped_column(String(320))  # suppression_key form
    name: Mapped[str] = mapped_column(String(200), default="")
    status: Mapped[str] = mapped_column(String(16), default="active")
    # Typed values by attribute name (declared in attribute_defs; JSON: dates as
    # ISO 8601 text, lists as JSON arrays). JSONB on PostgreSQL (migration 0008):
    # audience rules read it without parsing text for every contact.
    attributes: Mapped[dict[str, Any]] = mapped_column(
        JSON().with_variant(JSONB(), "postgresql"), default=dict
    )
    timezone: Mapped[str | None] = mapped_column(String(64), default=None)  # IANA name
    locale: Mapped[str | None] = mapped_column(String(35), default=None)  # BCP 47 tag
    # One of FREQUENCIES, or None for every campaign (the preference center sets it;
    # the campaign feeder enforces it).
    frequency: Mapped[str | None] = mapped_column(String(16), default=None)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class AttributeDef(Base):
    """A tenant's declared contact attribute: its name and type."""

    __tablename__ = "attribute_defs"
    __table_args__ = (UniqueConstraint("tenant_id", "name"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(64))
    type: Mapped[str] = mapped_column(String(8))  # one of ATTRIBUTE_TYPES
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class Consent(Base):
    """A consent record: how and when a contact agreed (kept, never edited)."""

    __tablename__ = "consents"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    contact_id: Mapped[int] = mapped_column(
        ForeignKey("contacts.id", ondelete="CASCADE"), index=True
    )
    source: Mapped[str] = mapped_column(String(100))  # signup form, import, API, ...
    wording_version: Mapped[str] = mapped_column(String(64), default="")
    purpose: Mapped[str] = mapped_column(String(100), default="")  # list, topic, "marketing"
    at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    ip: Mapped[str | None] = mapped_column(String(45), default=None)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class ContactList(Base):
    """A static list: members are added and removed explicitly."""

    __tablename__ = "lists"
    __table_args__ = (UniqueConstraint("tenant_id", "name"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(200))
    description: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class ListMember(Base):
    __tablename__ = "list_members"
    __table_args__ = (Index("ix_list_members_contact_id", "contact_id"),)

    list_id: Mapped[int] = mapped_column(
        ForeignKey("lists.id", ondelete="CASCADE"), primary_key=True
    )
    contact_id: Mapped[int] = mapped_column(
        ForeignKey("contacts.id", ondelete="CASCADE"), primary_key=True
    )
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    added_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class Topic(Base):
    """A subscription category contacts opt in to and out of (newsletter, offers)."""

    __tablename__ = "topics"
    __table_args__ = (UniqueConstraint("tenant_id", "name"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(200))
    description: Mapped[str] = mapped_column(Text, default="")
    # Whether a contact with no choice recorded counts as opted in.
    default_opt_in: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class TopicSubscription(Base):
    """A contact's choice for a topic (no row: the topic's default)."""

    __tablename__ = "topic_subscriptions"
    __table_args__ = (Index("ix_topic_subscriptions_contact_id", "contact_id"),)

    topic_id: Mapped[int] = mapped_column(
        ForeignKey("topics.id", ondelete="CASCADE"), primary_key=True
    )
    contact_id: Mapped[int] = mapped_column(
        ForeignKey("contacts.id", ondelete="CASCADE"), primary_key=True
    )
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    opted_in: Mapped[bool] = mapped_column(Boolean)
    changed_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
