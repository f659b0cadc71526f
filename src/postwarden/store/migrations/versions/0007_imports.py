"""contact imports, their stored bodies and rejected rows, data sources (issue 20)

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-06 00:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
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


def _at(name: str, nullable: bool = False) -> sa.Column[object]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def _import_fk(table: str) -> sa.ForeignKeyConstraint:
    return sa.ForeignKeyConstraint(
        ["import_id"],
        ["imports.id"],
        name=op.f(f"fk_{table}_import_id_imports"),
        ondelete="CASCADE",
    )


def upgrade() -> None:
    op.create_table(
        "data_sources",
        sa.Column("id", BigId, nullable=False),
        sa.Column("tenant_id", BigId, nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("url", sa.Text(), nullable=False),
        sa.Column("format", sa.String(length=8), nullable=False),
        sa.Column("options", sa.JSON(), nullable=False),
        sa.Column("interval", sa.Integer(), nullable=False),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        _at("next_run_at"),
        sa.Column("last_import_id", sa.BigInteger(), nullable=True),
        _at("created_at"),
        _at("updated_at"),
        _tenant_fk("data_sources"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_data_sources")),
    )
    op.create_index("ix_data_sources_tenant_id_id", "data_sources", ["tenant_id", "id"])
    op.create_index("ix_data_sources_next_run_at", "data_sources", ["next_run_at"])
    op.create_table(
        "imports",
        sa.Column("id", BigId, nullable=False),
        sa.Column("tenant_id", BigId, nullable=False),
        sa.Column("data_source_id", BigId, nullable=True),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("options", sa.JSON(), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("rows_total", sa.Integer(), nullable=True),
        sa.Column("header", sa.JSON(), nullable=True),
        *(
            sa.Column(name, sa.Integer(), nullable=False)
            for name in (
                "rows_done",
                "rows_imported",
                "rows_rejected",
                "contacts_created",
                "contacts_updated",
                "next_record",
            )
        ),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("claimed_by", sa.String(length=100), nullable=True),
        _at("lease_until", nullable=True),
        _at("created_at"),
        _at("started_at", nullable=True),
        _at("finished_at", nullable=True),
        _tenant_fk("imports"),
        sa.ForeignKeyConstraint(
            ["data_source_id"],
            ["data_sources.id"],
            name=op.f("fk_imports_data_source_id_data_sources"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_imports")),
    )
    op.create_index("ix_imports_tenant_id_id", "imports", ["tenant_id", "id"])
    op.create_index("ix_imports_state_id", "imports", ["state", "id"])
    op.create_index(op.f("ix_imports_data_source_id"), "imports", ["data_source_id"])
    op.create_table(
        "import_chunks",
        sa.Column("import_id", BigId, nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        _import_fk("import_chunks"),
        sa.PrimaryKeyConstraint("import_id", "seq", name=op.f("pk_import_chunks")),
    )
    op.create_table(
        "import_rejects",
        sa.Column("import_id", BigId, nullable=False),
        sa.Column("row", sa.Integer(), nullable=False),
        sa.Column("column_name", sa.String(length=200), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("cells", sa.JSON(), nullable=False),
        _import_fk("import_rejects"),
        sa.PrimaryKeyConstraint("import_id", "row", name=op.f("pk_import_rejects")),
    )


def downgrade() -> None:
    op.drop_table("import_rejects")
    op.drop_table("import_chunks")
    op.drop_index(op.f("ix_imports_data_source_id"), table_name="imports")
    op.drop_index("ix_imports_state_id", table_name="imports")
    op.drop_index("ix_imports_tenant_id_id", table_name="imports")
    op.drop_table("imports")
    op.drop_index("ix_data_sources_next_run_at", table_name="data_sources")
    op.drop_index("ix_data_sources_tenant_id_id", table_name="data_sources")
    op.drop_table("data_sources")
