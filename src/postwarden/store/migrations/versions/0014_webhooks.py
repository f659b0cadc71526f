"""event webhooks: endpoints, the outbox a trigger on events fills, the attempts log

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-07 02:30:00

docs/decisions/0012: every event inserted into ``events`` gets, in its own transaction,
one ``webhook_outbox`` row per enabled endpoint of its tenant whose filter takes its
type (``events`` is ``*``, or ``,a,b,`` holding it). On PostgreSQL a statement-level
trigger with the inserted rows as a transition table (a batch of events, one INSERT);
on SQLite a row trigger. Both take the event's ``ts`` as the row's creation and due
time.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

_PG = [
    """
CREATE FUNCTION events_webhook_outbox() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO webhook_outbox (endpoint_id, tenant_id, event_id, state, attempts,
                                next_at, created_at)
    SELECT w.id, n.tenant_id, n.id, 'pending', 0, n.ts, n.ts
    FROM new_events AS n
    JOIN webhook_endpoints AS w ON w.tenant_id = n.tenant_id AND w.enabled = 1
    WHERE w.events = '*' OR position(',' || n.type || ',' in w.events) > 0;
    RETURN NULL;
END $$""",
    "CREATE TRIGGER events_webhook_outbox AFTER INSERT ON events"
    " REFERENCING NEW TABLE AS new_events"
    " FOR EACH STATEMENT EXECUTE FUNCTION events_webhook_outbox()",
]

_SQLITE = [
    """
CREATE TRIGGER events_webhook_outbox AFTER INSERT ON events
WHEN NEW.tenant_id IS NOT NULL
BEGIN
    INSERT INTO webhook_outbox (endpoint_id, tenant_id, event_id, state, attempts,
                                next_at, created_at)
    SELECT w.id, NEW.tenant_id, NEW.id, 'pending', 0, NEW.ts, NEW.ts
    FROM webhook_endpoints AS w
    WHERE w.tenant_id = NEW.tenant_id AND w.enabled = 1
      AND (w.events = '*' OR instr(w.events, ',' || NEW.type || ',') > 0);
END"""
]


def _at(name: str, nullable: bool = False) -> sa.Column[object]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "webhook_endpoints",
        sa.Column("id", BigId, nullable=False),
        sa.Column("tenant_id", BigId, nullable=False),
        sa.Column("url", sa.String(length=2000), nullable=False),
        sa.Column("events", sa.String(length=1000), nullable=False),
        sa.Column("description", sa.String(length=200), nullable=False),
        sa.Column("secrets", sa.JSON(), nullable=False),
        sa.Column("signing_key", sa.LargeBinary(), nullable=False),
        sa.Column("enabled", sa.Integer(), nullable=False),
        sa.Column("disabled_reason", sa.String(length=200), nullable=False),
        _at("created_at"),
        _at("updated_at"),
        sa.ForeignKeyConstraint(
            ["tenant_id"],
            ["tenants.id"],
            name=op.f("fk_webhook_endpoints_tenant_id_tenants"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_webhook_endpoints")),
    )
    op.create_index("ix_webhook_endpoints_tenant_id", "webhook_endpoints", ["tenant_id"])
    op.create_table(
        "webhook_outbox",
        sa.Column("id", BigId, nullable=False),
        sa.Column("endpoint_id", BigId, nullable=False),
        sa.Column("tenant_id", sa.BigInteger(), nullable=False),
        sa.Column("event_id", sa.BigInteger(), nullable=False),
        sa.Column("state", sa.String(length=10), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        _at("next_at"),
        sa.Column("last_status", sa.Integer(), nullable=True),
        _at("created_at"),
        _at("delivered_at", nullable=True),
        sa.ForeignKeyConstraint(
            ["endpoint_id"],
            ["webhook_endpoints.id"],
            name=op.f("fk_webhook_outbox_endpoint_id_webhook_endpoints"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_webhook_outbox")),
    )
    op.create_index("ix_webhook_outbox_state_next_at", "webhook_outbox", ["state", "next_at"])
    op.create_index("ix_webhook_outbox_endpoint_id_id", "webhook_outbox", ["endpoint_id", "id"])
    op.create_table(
        "webhook_attempts",
        sa.Column("id", BigId, nullable=False),
        sa.Column("outbox_id", BigId, nullable=False),
        sa.Column("endpoint_id", sa.BigInteger(), nullable=False),
        _at("at"),
        sa.Column("status", sa.Integer(), nullable=True),
        sa.Column("duration_ms", sa.Integer(), nullable=False),
        sa.Column("error", sa.String(length=300), nullable=False),
        sa.Column("response", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(
            ["outbox_id"],
            ["webhook_outbox.id"],
            name=op.f("fk_webhook_attempts_outbox_id_webhook_outbox"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_webhook_attempts")),
    )
    op.create_index("ix_webhook_attempts_outbox_id", "webhook_attempts", ["outbox_id"])
    for sql in _PG if op.get_bind().dialect.name == "postgresql" else _SQLITE:
        op.execute(sql)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER events_webhook_outbox ON events")
        op.execute("DROP FUNCTION events_webhook_outbox()")
    else:
        op.execute("DROP TRIGGER events_webhook_outbox")
    op.drop_table("webhook_attempts")
    op.drop_table("webhook_outbox")
    op.drop_table("webhook_endpoints")
