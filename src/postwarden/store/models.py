"""The control plane's data: SQLAlchemy 2 models (SQLite by default, PostgreSQL too).

Every row that belongs to a tenant carries ``tenant_id``, and every query made on a
tenant's behalf filters on it (``postwarden.store.repo``). The spool stays apart from
this database: the MTA's hot path never waits on it (docs/decisions/0005).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# Stable constraint names, so that Alembic migrations name them the same on every
# database.
NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class UTCDateTime(TypeDecorator[dt.datetime]):
    """Timezone-aware UTC datetimes on every database (SQLite keeps no zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Dialect) -> Any:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTCDateTime column")
        value = value.astimezone(dt.UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=dt.UTC)
        return value.astimezone(dt.UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {dt.datetime: UTCDateTime(), dict[str, Any]: JSON()}


# A 64-bit integer key that is still SQLite's rowid alias (SQLite only autoincrements
# a column declared exactly INTEGER PRIMARY KEY).
BigId = BigInteger().with_variant(Integer(), "sqlite")


class Tenant(Base):
    __tablename__ = "tenants"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)
    settings: Mapped[dict[str, Any]] = mapped_column(default=dict)
    # The pool of its mail that names none (None: the appliance's default pool), and
    # the other pools its mail may name (issue 7).
    default_pool: Mapped[str | None] = mapped_column(String(64), default=None)
    allowed_pools: Mapped[list[str]] = mapped_column(JSON, default=list)


class Pool(Base):
    """A pool made through the API: weighted sources (``[[sources]]`` of the config).
    Pools of the config are not stored here; a stored pool never takes their names."""

    __tablename__ = "pools"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    # [{"source": name, "weight": n > 0}, ...]
    members: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    overflow: Mapped[str] = mapped_column(String(5), default="wait")  # wait | spill
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class ApiKey(Base):
    """An API key: ``pw_<prefix>_<secret>``; only the SHA-256 of the whole key is kept."""

    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    # NULL for operator (admin) keys, which manage tenants and nothing inside them.
    tenant_id: Mapped[int | None] = mapped_column(
        ForeignKey("tenants.id", ondelete="CASCADE"), index=True
    )
    prefix: Mapped[str] = mapped_column(String(16), unique=True)
    secret_hash: Mapped[str] = mapped_column(String(64))
    name: Mapped[str] = mapped_column(String(200), default="")
    scopes: Mapped[str] = mapped_column(String(100))  # space-separated
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[dt.datetime | None] = mapped_column(default=None)
    last_used_at: Mapped[dt.datetime | None] = mapped_column(default=None)


class Domain(Base):
    __tablename__ = "domains"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    # One owner per domain across the appliance: its DKIM keys and return path are
    # one tenant's.
    name: Mapped[str] = mapped_column(String(253), unique=True)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    verified_at: Mapped[dt.datetime | None] = mapped_column(default=None)
    checked_at: Mapped[dt.datetime | None] = mapped_column(default=None)
    last_check: Mapped[dict[str, Any]] = mapped_column(default=dict)


class DkimKey(Base):
    __tablename__ = "dkim_keys"
    __table_args__ = (UniqueConstraint("domain_id", "selector"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    domain_id: Mapped[int] = mapped_column(ForeignKey("domains.id", ondelete="CASCADE"), index=True)
    selector: Mapped[str] = mapped_column(String(63))
    algorithm: Mapped[str] = mapped_column(String(20))  # rsa-sha256 | ed25519-sha256
    generation: Mapped[int] = mapped_column(Integer, default=1)
    # Fernet token of the PEM (RSA) or raw 32-byte seed (Ed25519).
    private_key: Mapped[bytes] = mapped_column(LargeBinary)
    public_key: Mapped[str] = mapped_column(Text)  # the p= value
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    verified_at: Mapped[dt.datetime | None] = mapped_column(default=None)


class Suppression(Base):
    __tablename__ = "suppressions"
    __table_args__ = (UniqueConstraint("tenant_id", "address"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    address: Mapped[str] = mapped_column(String(320))
    # unsubscribe | hard_bounce | soft_bounce | complaint | manual
    reason: Mapped[str] = mapped_column(String(20))
    source: Mapped[str] = mapped_column(String(100), default="")
    note: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[dt.datetime | None] = mapped_column(default=None)


class Change(Base):
    """A change feed: every write that a process caches (keys, domains, suppressions)
    adds a row; processes poll the highest id and reload what changed."""

    __tablename__ = "changes"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    # suppression | domain | api_key | tenant | pool | tenant_key
    kind: Mapped[str] = mapped_column(String(20))
    tenant_id: Mapped[int | None] = mapped_column(BigInteger)
    ref: Mapped[str] = mapped_column(String(320), default="")
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class Message(Base):
    """What the control plane knows of a message, from the spool's events."""

    __tablename__ = "messages"
    # A tenant's list, newest first (control.message_list); created_at alone:
    # retention prunes by it (store.retention).
    __table_args__ = (Index(None, "tenant_id", "created_at", "id"), Index(None, "created_at"))

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[int | None] = mapped_column(BigInteger)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    mail_from: Mapped[str] = mapped_column(String(320), default="")
    subject: Mapped[str] = mapped_column(String(300), default="")
    source: Mapped[str] = mapped_column(String(10), default="smtp")  # smtp | api
    tags: Mapped[list[str]] = mapped_column(JSON, default=list)
    meta: Mapped[dict[str, Any]] = mapped_column(default=dict)


class Recipient(Base):
    __tablename__ = "message_recipients"
    # Listing messages by a recipient's state or address (control.message_list).
    __table_args__ = (
        Index(None, "tenant_id", "state", "message_id"),
        Index(None, "tenant_id", "address", "message_id"),
    )

    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # <message id>.<n>
    message_id: Mapped[str] = mapped_column(String(40), index=True)
    tenant_id: Mapped[int | None] = mapped_column(BigInteger)
    address: Mapped[str] = mapped_column(String(320))
    state: Mapped[str] = mapped_column(String(20))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_response: Mapped[str] = mapped_column(Text, default="")
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class Event(Base):
    __tablename__ = "events"
    __table_args__ = (
        Index(None, "tenant_id", "id"),
        Index(None, "message_id"),
        # The event list's filters walk in id order (store.event_query, migration 0005;
        # on PostgreSQL, triggers keep the event_hours and event_tags rollups too).
        Index(None, "tenant_id", "type", "id"),
        Index(None, "tenant_id", "recipient", "id"),
        Index(None, "ts"),  # retention prunes by it (store.retention)
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    tenant_id: Mapped[int | None] = mapped_column(BigInteger)
    ts: Mapped[dt.datetime] = mapped_column()
    type: Mapped[str] = mapped_column(String(20))
    message_id: Mapped[str] = mapped_column(String(40))
    recipient_id: Mapped[str | None] = mapped_column(String(64))
    recipient: Mapped[str | None] = mapped_column(String(320))
    # The message's tags as ",a,b," so that one portable LIKE finds a tag.
    tags: Mapped[str] = mapped_column(String(800), default="")
    detail: Mapped[dict[str, Any]] = mapped_column(default=dict)


class EventCursor(Base):
    """How far the events of each spool shard have been copied into ``events``."""

    __tablename__ = "event_cursors"

    shard: Mapped[str] = mapped_column(String(200), primary_key=True)
    last_id: Mapped[int] = mapped_column(BigInteger, default=0)


class IdempotencyKey(Base):
    __tablename__ = "idempotency_keys"

    tenant_id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    key: Mapped[str] = mapped_column(String(200), primary_key=True)
    request_hash: Mapped[str] = mapped_column(String(64))
    status_code: Mapped[int] = mapped_column(Integer)
    response: Mapped[dict[str, Any]] = mapped_column()
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow, index=True)
