"""campaigns, their state changes and their send records (issue 21)

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-06 00:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _at(name: str, nullable: bool = False) -> sa.Column[object]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def _fk(table: str, column: str, target: str) -> sa.ForeignKeyConstraint:
    return sa.ForeignKeyConstraint(
        [column],
        [f"{target}.id"],
        name=op.f(f"fk_{table}_{column}_{target}"),
        ondelete="CASCADE",
    )


def upgrade() -> None:
    op.create_table(
        "campaigns",
        sa.Column("id", BigId, nullable=False),
        sa.Column("tenant_id", BigId, nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("audience_id", BigId, nullable=False),
        sa.Column("template_id", BigId, nullable=False),
        sa.Column("template_version", sa.Integer(), nullable=True),
        sa.Column("from_email", sa.String(length=320), nullable=False),
        sa.Column("from_name", sa.String(length=200), nullable=False),
        sa.Column("reply_to", sa.String(length=320), nullable=True),
        sa.Column("pool", sa.String(length=64), nullable=True),
        sa.Column("send_window", sa.JSON(), nullable=True),
        sa.Column("tags", sa.JSON(), nullable=False),
        sa.Column("meta", sa.JSON(), nullable=False),
        sa.Column("ab", sa.JSON(), nullable=True),
        _at("scheduled_at", nullable=True),
        sa.Column("snapshot_id", BigId, nullable=True),
        sa.Column("last_editor", sa.String(length=16), nullable=True),
        _at("created_at"),
        _at("updated_at"),
        _at("launched_at", nullable=True),
        _at("finished_at", nullable=True),
        _fk("campaigns", "tenant_id", "tenants"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_campaigns")),
    )
    op.create_index("ix_campaigns_tenant_id_id", "campaigns", ["tenant_id", "id"])
    op.create_table(
        "campaign_transitions",
        sa.Column("id", BigId, nullable=False),
        sa.Column("tenant_id", BigId, nullable=False),
        sa.Column("campaign_id", BigId, nullable=False),
        sa.Column("action", sa.String(length=16), nullable=False),
        sa.Column("before", sa.String(length=16), nullable=False),
        sa.Column("after", sa.String(length=16), nullable=False),
        sa.Column("key_prefix", sa.String(length=16), nullable=True),
        sa.Column("reason", sa.Text(), nullable=False),
        _at("at"),
        _fk("campaign_transitions", "tenant_id", "tenants"),
        _fk("campaign_transitions", "campaign_id", "campaigns"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_campaign_transitions")),
    )
    op.create_index(
        "ix_campaign_transitions_campaign_id_id", "campaign_transitions", ["campaign_id", "id"]
    )
    op.create_table(
        "send_records",
        sa.Column("id", BigId, nullable=False),
        sa.Column("tenant_id", BigId, nullable=False),
        sa.Column("campaign_id", BigId, nullable=False),
        sa.Column("contact_id", BigId, nullable=False),
        sa.Column("email", sa.String(length=320), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("reason", sa.String(length=200), nullable=False),
        sa.Column("variant", sa.String(length=32), nullable=True),
        sa.Column("message_id", sa.String(length=64), nullable=True),
        _at("updated_at"),
        _fk("send_records", "tenant_id", "tenants"),
        _fk("send_records", "campaign_id", "campaigns"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_send_records")),
        sa.UniqueConstraint(
            "campaign_id", "contact_id", name=op.f("uq_send_records_campaign_id_contact_id")
        ),
    )
    op.create_index(
        "ix_send_records_campaign_id_state_id", "send_records", ["campaign_id", "state", "id"]
    )


def downgrade() -> None:
    op.drop_table("send_records")
    op.drop_table("campaign_transitions")
    op.drop_table("campaigns")
