"""engagement: tenant keys, tracking hits, campaign tracking mode, first human open

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-07 01:00:00

``tenant_keys``: per tenant and purpose (``links``, ``tombstone``), generations of
sealed random keys with a unique ``kid`` (docs/decisions/0011). ``tracking_hits``:
every pixel and redirect request whose token read, judged later by the verdict pass
(``machine``, ``reason``, ``judged_at``). ``campaigns.tracking``: off, anonymous or
per_recipient (null: the tenant's). ``send_records.opened_at``: the first human open.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _at(name: str, nullable: bool = False) -> sa.Column[object]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def _tenant_fk(table: str) -> sa.ForeignKeyConstraint:
    return sa.ForeignKeyConstraint(
        ["tenant_id"],
        ["tenants.id"],
        name=op.f(f"fk_{table}_tenant_id_tenants"),
        ondelete="CASCADE",
    )


def upgrade() -> None:
    op.create_table(
        "tenant_keys",
        sa.Column("id", BigId, nullable=False),
        sa.Column("tenant_id", BigId, nullable=False),
        sa.Column("purpose", sa.String(length=16), nullable=False),
        sa.Column("generation", sa.Integer(), nullable=False),
        sa.Column("kid", sa.String(length=8), nullable=False),
        sa.Column("secret", sa.LargeBinary(), nullable=False),
        _at("created_at"),
        _at("retired_at", nullable=True),
        _tenant_fk("tenant_keys"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_tenant_keys")),
        sa.UniqueConstraint("kid", name=op.f("uq_tenant_keys_kid")),
        sa.UniqueConstraint(
            "tenant_id",
            "purpose",
            "generation",
            name=op.f("uq_tenant_keys_tenant_id_purpose_generation"),
        ),
    )
    op.create_table(
        "tracking_hits",
        sa.Column("id", BigId, nullable=False),
        sa.Column("tenant_id", BigId, nullable=False),
        sa.Column("kind", sa.String(length=8), nullable=False),
        sa.Column("campaign_id", BigId, nullable=True),
        sa.Column("contact_id", BigId, nullable=True),
        sa.Column("message_id", sa.String(length=64), nullable=True),
        sa.Column("link_index", sa.Integer(), nullable=True),
        sa.Column("url", sa.Text(), nullable=True),
        _at("at"),
        sa.Column("method", sa.String(length=8), nullable=False),
        sa.Column("ip", sa.String(length=45), nullable=True),
        sa.Column("user_agent", sa.String(length=500), nullable=False),
        sa.Column("ranged", sa.Boolean(), nullable=False, server_default=sa.false()),
        sa.Column("machine", sa.Boolean(), nullable=True),
        sa.Column("reason", sa.String(length=40), nullable=False),
        _at("judged_at", nullable=True),
        _tenant_fk("tracking_hits"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_tracking_hits")),
    )
    op.create_index("ix_tracking_hits_campaign_id_id", "tracking_hits", ["campaign_id", "id"])
    op.create_index("ix_tracking_hits_judged_at_id", "tracking_hits", ["judged_at", "id"])
    op.create_index("ix_tracking_hits_message_id", "tracking_hits", ["message_id"])
    op.create_index("ix_tracking_hits_at", "tracking_hits", ["at"])
    with op.batch_alter_table("campaigns") as b:
        b.add_column(sa.Column("tracking", sa.String(length=16), nullable=True))
    with op.batch_alter_table("send_records") as b:
        b.add_column(_at("opened_at", nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("send_records") as b:
        b.drop_column("opened_at")
    with op.batch_alter_table("campaigns") as b:
        b.drop_column("tracking")
    op.drop_table("tracking_hits")
    op.drop_table("tenant_keys")
