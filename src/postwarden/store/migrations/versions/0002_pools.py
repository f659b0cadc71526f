"""pools made through the API; a tenant's default and allowed pools (issue 7)

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02 00:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "pools",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("members", sa.JSON(), nullable=False),
        sa.Column("overflow", sa.String(length=5), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_pools")),
        sa.UniqueConstraint("name", name=op.f("uq_pools_name")),
    )
    # Plain ADD COLUMNs, on SQLite too (never batch mode: it rebuilds ``tenants`` for a
    # non-constant default, and with foreign keys on, dropping the old table cascades
    # into every tenant's keys, domains and suppressions).
    op.add_column("tenants", sa.Column("default_pool", sa.String(length=64), nullable=True))
    op.add_column(
        "tenants", sa.Column("allowed_pools", sa.JSON(), nullable=False, server_default="[]")
    )


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        # SQLite 3.35+ drops a column in place; a batch rebuild of ``tenants`` would
        # cascade into its keys and domains.
        op.execute("ALTER TABLE tenants DROP COLUMN allowed_pools")
        op.execute("ALTER TABLE tenants DROP COLUMN default_pool")
    else:
        op.drop_column("tenants", "allowed_pools")
        op.drop_column("tenants", "default_pool")
    op.drop_table("pools")
