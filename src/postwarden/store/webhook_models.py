"""Event webhooks out (issue 23; docs/decisions/0012): a tenant's endpoints, the outbox
that a trigger on ``events`` fills in the event's own transaction, and the log of each
try.

``webhook_endpoints.events``: the event types it takes as ``,a,b,`` (a LIKE finds one),
or ``*`` for all. ``secrets``: the HMAC secrets as a JSON list of ``{"id", "sealed",
"expires_at"}`` (sealed under the control encryption key; several while a rotation
overlaps). ``signing_key``: the Ed25519 private key, sealed.

``webhook_outbox``: one row per (endpoint, event) to send: ``pending`` until a try
answers 2xx (``delivered``) or the retries run out (``failed``); ``next_at`` is when it
is due (a dispatcher taking it moves it forward in the same transaction).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import JSON, BigInteger, ForeignKey, Index, Integer, LargeBinary, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from postwarden.store.models import Base, BigId, utcnow

#: States of an outbox row.
OUTBOX_STATES = ("pending", "delivered", "failed")


class WebhookEndpoint(Base):
    __tablename__ = "webhook_endpoints"
    # The trigger's lookup for every event: a tenant's enabled endpoints.
    __table_args__ = (Index("ix_webhook_endpoints_tenant_id", "tenant_id"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    url: Mapped[str] = mapped_column(String(2000))
    events: Mapped[str] = mapped_column(String(1000), default="*")
    description: Mapped[str] = mapped_column(String(200), default="")
    secrets: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    signing_key: Mapped[bytes] = mapped_column(LargeBinary)
    enabled: Mapped[int] = mapped_column(Integer, default=1)  # 0/1: the triggers read it
    disabled_reason: Mapped[str] = mapped_column(String(200), default="")
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class WebhookOutbox(Base):
    __tablename__ = "webhook_outbox"
    __table_args__ = (
        # The dispatcher: what is due, oldest first.
        Index("ix_webhook_outbox_state_next_at", "state", "next_at"),
        # An endpoint's deliveries (its log, its replays).
        Index("ix_webhook_outbox_endpoint_id_id", "endpoint_id", "id"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    endpoint_id: Mapped[int] = mapped_column(ForeignKey("webhook_endpoints.id", ondelete="CASCADE"))
    tenant_id: Mapped[int] = mapped_column(BigInteger)
    event_id: Mapped[int] = mapped_column(BigInteger)
    state: Mapped[str] = mapped_column(String(10), default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    last_status: Mapped[int | None] = mapped_column(Integer, default=None)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    delivered_at: Mapped[dt.datetime | None] = mapped_column(default=None)


class WebhookAttempt(Base):
    __tablename__ = "webhook_attempts"
    __table_args__ = (Index("ix_webhook_attempts_outbox_id", "outbox_id"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    outbox_id: Mapped[int] = mapped_column(ForeignKey("webhook_outbox.id", ondelete="CASCADE"))
    endpoint_id: Mapped[int] = mapped_column(BigInteger)
    at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    status: Mapped[int | None] = mapped_column(Integer, default=None)  # None: no answer
    duration_ms: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str] = mapped_column(String(300), default="")
    response: Mapped[str] = mapped_column(Text, default="")  # its first kilobyte
