"""indexes for listing messages (issue 18, item 5)

GET /v1/messages lists a tenant's messages by (created_at, id), newest first: the
index on (tenant_id, created_at) takes the id as well, so that a page, and the edge
of each window the list walks, is read from the index in its order. ?status= and
?recipient= look the matching recipients up by (tenant, state) and (tenant,
address); both carry the message id, so that the lookup reads the index alone.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-07 00:00:00
"""

from __future__ import annotations

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index(
        op.f("ix_messages_tenant_id_created_at_id"), "messages", ["tenant_id", "created_at", "id"]
    )
    op.drop_index(op.f("ix_messages_tenant_id_created_at"), table_name="messages")
    op.create_index(
        op.f("ix_message_recipients_tenant_id_state_message_id"),
        "message_recipients",
        ["tenant_id", "state", "message_id"],
    )
    op.create_index(
        op.f("ix_message_recipients_tenant_id_address_message_id"),
        "message_recipients",
        ["tenant_id", "address", "message_id"],
    )


def downgrade() -> None:
    op.drop_index(
        op.f("ix_message_recipients_tenant_id_address_message_id"),
        table_name="message_recipients",
    )
    op.drop_index(
        op.f("ix_message_recipients_tenant_id_state_message_id"),
        table_name="message_recipients",
    )
    op.create_index(
        op.f("ix_messages_tenant_id_created_at"), "messages", ["tenant_id", "created_at"]
    )
    op.drop_index(op.f("ix_messages_tenant_id_created_at_id"), table_name="messages")
