"""contacts, attribute types, consent records, lists and topics (issue 20)

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-06 00:00:00
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _tenant() -> sa.Column[int]:
    return sa.Column("tenant_id", BigId, nullable=False)


def _tenant_fk(table: str) -> sa.ForeignKeyConstraint:
    return sa.ForeignKeyConstraint(
        ["tenant_id"],
        ["tenants.id"],
        name=op.f(f"fk_{table}_tenant_id_tenants"),
        ondelete="CASCADE",
    )


def _at(name: str) -> sa.Column[object]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=False)


def upgrade() -> None:
    op.create_table(
        "contacts",
        sa.Column("id", BigId, nullable=False),
        _tenant(),
        sa.Column("email", sa.String(length=320), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("attributes", sa.JSON(), nullable=False),
        sa.Column("timezone", sa.String(length=64), nullable=True),
        sa.Column("locale", sa.String(length=35), nullable=True),
        _at("created_at"),
        _at("updated_at"),
        _tenant_fk("contacts"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_contacts")),
        sa.UniqueConstraint("tenant_id", "email", name=op.f("uq_contacts_tenant_id_email")),
    )
    op.create_index("ix_contacts_tenant_id_id", "contacts", ["tenant_id", "id"])
    op.create_table(
        "attribute_defs",
        sa.Column("id", BigId, nullable=False),
        _tenant(),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("type", sa.String(length=8), nullable=False),
        _at("created_at"),
        _tenant_fk("attribute_defs"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_attribute_defs")),
        sa.UniqueConstraint("tenant_id", "name", name=op.f("uq_attribute_defs_tenant_id_name")),
    )
    op.create_table(
        "consents",
        sa.Column("id", BigId, nullable=False),
        _tenant(),
        sa.Column("contact_id", BigId, nullable=False),
        sa.Column("source", sa.String(length=100), nullable=False),
        sa.Column("wording_version", sa.String(length=64), nullable=False),
        sa.Column("purpose", sa.String(length=100), nullable=False),
        _at("at"),
        sa.Column("ip", sa.String(length=45), nullable=True),
        _at("created_at"),
        _tenant_fk("consents"),
        sa.ForeignKeyConstraint(
            ["contact_id"],
            ["contacts.id"],
            name=op.f("fk_consents_contact_id_contacts"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_consents")),
    )
    op.create_index(op.f("ix_consents_contact_id"), "consents", ["contact_id"])
    for table in ("lists", "topics"):
        extra: list[sa.Column[Any]] = (
            [sa.Column("default_opt_in", sa.Boolean(), nullable=False)] if table == "topics" else []
        )
        op.create_table(
            table,
            sa.Column("id", BigId, nullable=False),
            _tenant(),
            sa.Column("name", sa.String(length=200), nullable=False),
            sa.Column("description", sa.Text(), nullable=False),
            *extra,
            _at("created_at"),
            _at("updated_at"),
            _tenant_fk(table),
            sa.PrimaryKeyConstraint("id", name=op.f(f"pk_{table}")),
            sa.UniqueConstraint("tenant_id", "name", name=op.f(f"uq_{table}_tenant_id_name")),
        )
    for table, parent, key, cols in (
        ("list_members", "lists", "list_id", [_at("added_at")]),
        (
            "topic_subscriptions",
            "topics",
            "topic_id",
            [sa.Column("opted_in", sa.Boolean(), nullable=False), _at("changed_at")],
        ),
    ):
        op.create_table(
            table,
            sa.Column(key, BigId, nullable=False),
            sa.Column("contact_id", BigId, nullable=False),
            _tenant(),
            *cols,
            sa.ForeignKeyConstraint(
                [key], [f"{parent}.id"], name=op.f(f"fk_{table}_{key}_{parent}"), ondelete="CASCADE"
            ),
            sa.ForeignKeyConstraint(
                ["contact_id"],
                ["contacts.id"],
                name=op.f(f"fk_{table}_contact_id_contacts"),
                ondelete="CASCADE",
            ),
            _tenant_fk(table),
            sa.PrimaryKeyConstraint(key, "contact_id", name=op.f(f"pk_{table}")),
        )
        op.create_index(f"ix_{table}_contact_id", table, ["contact_id"])


def downgrade() -> None:
    for table in ("topic_subscriptions", "list_members", "topics", "lists", "consents"):
        op.drop_table(table)
    op.drop_table("attribute_defs")
    op.drop_index("ix_contacts_tenant_id_id", table_name="contacts")
    op.drop_table("contacts")
