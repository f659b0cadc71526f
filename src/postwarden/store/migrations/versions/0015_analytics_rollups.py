"""analytics: hourly rollups of events (stat_hours), campaigns' link URLs

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-07 03:30:00

docs/decisions/0012: one reader of ``events`` (``store.rollups``, after its own cursor
in ``event_cursors``) adds each event to counts per tenant, campaign and sending
domain, by hour and by breakdown. The cursor starts at 0: events already in the
database are rolled up after the upgrade, in batches.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None


_KEY = ("tenant_id", "scope", "key", "dim", "value", "hour", "metric")


def upgrade() -> None:
    op.create_table(
        "stat_hours",
        sa.Column("tenant_id", sa.BigInteger(), nullable=False),
        sa.Column("scope", sa.String(length=16), nullable=False),
        sa.Column("key", sa.String(length=255), nullable=False),
        sa.Column("dim", sa.String(length=16), nullable=False),
        sa.Column("value", sa.String(length=255), nullable=False),
        sa.Column("hour", sa.DateTime(timezone=True), nullable=False),
        sa.Column("metric", sa.String(length=48), nullable=False),
        sa.Column("n", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint(*_KEY, name=op.f("pk_stat_hours")),
    )
    op.create_index(op.f("ix_stat_hours_hour"), "stat_hours", ["hour"])
    op.create_table(
        "campaign_links",
        sa.Column("campaign_id", sa.BigInteger(), nullable=False),
        sa.Column("link_index", sa.Integer(), nullable=False),
        sa.Column("tenant_id", sa.BigInteger(), nullable=False),
        sa.Column("url", sa.String(length=2000), nullable=False),
        sa.PrimaryKeyConstraint("campaign_id", "link_index", name=op.f("pk_campaign_links")),
    )


def downgrade() -> None:
    op.drop_table("campaign_links")
    op.drop_index(op.f("ix_stat_hours_hour"), table_name="stat_hours")
    op.drop_table("stat_hours")
    op.execute("DELETE FROM event_cursors WHERE shard = 'analytics'")
