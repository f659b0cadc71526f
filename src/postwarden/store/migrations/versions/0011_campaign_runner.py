"""the campaign runner: launch and feed leases, send times, unsubscribe requests

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-06 17:00:00

A launching campaign is claimed by one runner (``campaigns.runner``/``lease_until``)
while it writes its send records; feeding is split in ``campaigns.parts`` parts
(record id modulo parts), each claimed by one runner (``campaign_feeds``). A record's
``sent_at`` is when it was handed to the spool (the frequency cap counts these);
``message_id`` is indexed for delivery's events; ``not_before``: a ``waiting`` record
(outside its send window in its recipient's time zone) is not sent before then;
``clicked_at``/``converted_at``: the first human click and the first conversion (what
an A/B test is decided on).
``unsubscribe_requests`` keeps what the List-Unsubscribe placeholder received until
the one-click endpoint (issue 22).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
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
    with op.batch_alter_table("campaigns") as b:
        b.add_column(sa.Column("parts", sa.Integer(), nullable=True))
        b.add_column(
            sa.Column("records_done", sa.Boolean(), nullable=False, server_default=sa.false())
        )
        b.add_column(sa.Column("runner", sa.String(length=80), nullable=True))
        b.add_column(_at("lease_until", nullable=True))
    op.create_index("ix_campaigns_state", "campaigns", ["state"])
    op.create_table(
        "campaign_feeds",
        sa.Column("campaign_id", BigId, nullable=False),
        sa.Column("part", sa.Integer(), nullable=False),
        sa.Column("runner", sa.String(length=80), nullable=True),
        _at("lease_until", nullable=True),
        _fk("campaign_feeds", "campaign_id", "campaigns"),
        sa.PrimaryKeyConstraint("campaign_id", "part", name=op.f("pk_campaign_feeds")),
    )
    with op.batch_alter_table("send_records") as b:
        b.add_column(_at("sent_at", nullable=True))
        b.add_column(_at("not_before", nullable=True))
        b.add_column(_at("clicked_at", nullable=True))
        b.add_column(_at("converted_at", nullable=True))
    op.create_index("ix_send_records_message_id", "send_records", ["message_id"])
    op.create_index("ix_send_records_contact_id_sent_at", "send_records", ["contact_id", "sent_at"])
    op.create_table(
        "unsubscribe_requests",
        sa.Column("id", BigId, nullable=False),
        sa.Column("tenant_id", BigId, nullable=False),
        sa.Column("campaign_id", BigId, nullable=True),
        sa.Column("contact_id", BigId, nullable=True),
        sa.Column("email", sa.String(length=320), nullable=False),
        sa.Column("method", sa.String(length=8), nullable=False),
        sa.Column("ip", sa.String(length=45), nullable=True),
        sa.Column("user_agent", sa.String(length=500), nullable=False),
        _at("at"),
        _fk("unsubscribe_requests", "tenant_id", "tenants"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_unsubscribe_requests")),
    )
    op.create_index(
        "ix_unsubscribe_requests_tenant_id_id", "unsubscribe_requests", ["tenant_id", "id"]
    )
    op.create_index("ix_unsubscribe_requests_campaign_id", "unsubscribe_requests", ["campaign_id"])


def downgrade() -> None:
    op.drop_table("unsubscribe_requests")
    op.drop_index("ix_send_records_contact_id_sent_at", table_name="send_records")
    op.drop_index("ix_send_records_message_id", table_name="send_records")
    with op.batch_alter_table("send_records") as b:
        b.drop_column("converted_at")
        b.drop_column("clicked_at")
        b.drop_column("not_before")
        b.drop_column("sent_at")
    op.drop_table("campaign_feeds")
    op.drop_index("ix_campaigns_state", table_name="campaigns")
    with op.batch_alter_table("campaigns") as b:
        b.drop_column("lease_until")
        b.drop_column("runner")
        b.drop_column("records_done")
        b.drop_column("parts")
