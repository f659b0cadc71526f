"""contacts.frequency (the preference center); unsubscribe_requests.method wider

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-07 02:00:00

Null: every campaign; ``weekly`` or ``monthly``: at most one campaign message in that
period (the campaign feeder enforces it). Set by the contact on the preference center
(``/p/<token>``) or through the contacts API.

``unsubscribe_requests.method`` grows from 8 to 16 characters: the preference center's
opt-out is recorded with method ``preferences`` (11). Going down, such rows become
``prefs``.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("contacts") as b:
        b.add_column(sa.Column("frequency", sa.String(length=16), nullable=True))
    with op.batch_alter_table("unsubscribe_requests") as b:
        b.alter_column(
            "method",
            existing_type=sa.String(length=8),
            type_=sa.String(length=16),
            existing_nullable=False,
        )


def downgrade() -> None:
    op.execute("UPDATE unsubscribe_requests SET method = 'prefs' WHERE length(method) > 8")
    with op.batch_alter_table("unsubscribe_requests") as b:
        b.alter_column(
            "method",
            existing_type=sa.String(length=16),
            type_=sa.String(length=8),
            existing_nullable=False,
        )
    with op.batch_alter_table("contacts") as b:
        b.drop_column("frequency")
