"""audiences, their snapshots; contacts' attributes as JSONB on PostgreSQL (issue 20)

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-06 00:00:00

On PostgreSQL ``contacts.attributes`` becomes ``jsonb``: an audience rule reads
attributes of every contact of the tenant, and ``json`` is text parsed again for each
read (a count over 1 000 000 contacts: 1.1-1.7 s as json, 0.25-0.56 s as jsonb;
docs/performance.md, "Audience counts"). The rewrite takes the table's write lock while
it runs (about 15 s per million contacts). SQLite keeps its JSON text.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _tenant_fk(table: str) -> sa.ForeignKeyConstraint:
    return sa.ForeignKeyConstraint(
        ["tenant_id"],
        ["tenants.id"],
        name=op.f(f"fk_{table}_tenant_id_tenants"),
        ondelete="CASCADE",
    )


def upgrade() -> None:
    op.create_table(
        "audiences",
        sa.Column("id", BigId, nullable=False),
        sa.Column("tenant_id", BigId, nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("rule", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        _tenant_fk("audiences"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audiences")),
        sa.UniqueConstraint("tenant_id", "name", name=op.f("uq_audiences_tenant_id_name")),
    )
    op.create_table(
        "audience_snapshots",
        sa.Column("id", BigId, nullable=False),
        sa.Column("tenant_id", BigId, nullable=False),
        sa.Column("audience_id", BigId, nullable=False),
        sa.Column("rule", sa.Text(), nullable=False),
        sa.Column("count", BigId, nullable=False),
        sa.Column("taken_at", sa.DateTime(timezone=True), nullable=False),
        _tenant_fk("audience_snapshots"),
        sa.ForeignKeyConstraint(
            ["audience_id"],
            ["audiences.id"],
            name=op.f("fk_audience_snapshots_audience_id_audiences"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audience_snapshots")),
    )
    op.create_index(
        "ix_audience_snapshots_audience_id_id", "audience_snapshots", ["audience_id", "id"]
    )
    op.create_table(
        "audience_snapshot_members",
        sa.Column("snapshot_id", BigId, nullable=False),
        sa.Column("contact_id", BigId, nullable=False),
        sa.ForeignKeyConstraint(
            ["snapshot_id"],
            ["audience_snapshots.id"],
            name=op.f("fk_audience_snapshot_members_snapshot_id_audience_snapshots"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint(
            "snapshot_id", "contact_id", name=op.f("pk_audience_snapshot_members")
        ),
    )
    op.create_index(
        "ix_consents_tenant_id_purpose_contact_id",
        "consents",
        ["tenant_id", "purpose", "contact_id"],
    )
    if op.get_bind().dialect.name == "postgresql":
        op.alter_column(
            "contacts",
            "attributes",
            type_=postgresql.JSONB(),
            existing_type=sa.JSON(),
            existing_nullable=False,
            postgresql_using="attributes::jsonb",
        )


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.alter_column(
            "contacts",
            "attributes",
            type_=sa.JSON(),
            existing_type=postgresql.JSONB(),
            existing_nullable=False,
            postgresql_using="attributes::json",
        )
    op.drop_index("ix_consents_tenant_id_purpose_contact_id", table_name="consents")
    op.drop_table("audience_snapshot_members")
    op.drop_index("ix_audience_snapshots_audience_id_id", table_name="audience_snapshots")
    op.drop_table("audience_snapshots")
    op.drop_table("audiences")
