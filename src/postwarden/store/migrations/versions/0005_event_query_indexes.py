"""indexes for the event filters; PostgreSQL's hour and tag rollups (issue 18, item 6)

``GET /v1/events`` walks a tenant's events in id order; each filter gets an index that
walks in that order too: ``(tenant_id, type, id)``, and ``(tenant_id, recipient, id)``
instead of ``(tenant_id, recipient)``. On PostgreSQL, two tables kept by triggers on
``events`` (every writer and COPY goes through them) serve the filters an index on
``events`` cannot serve in id order:

* ``event_hours``: per tenant and UTC hour of ``ts``, the lowest and highest event id.
  ``since`` and ``until`` become an id range (times are only roughly in id order, so no
  index on ``ts`` can bound a walk by id);
* ``event_tags``: one row per tag of an event, for ``tag`` (a LIKE on the ``,a,b,``
  text matches anywhere and uses no index).

Both are filled from the events already there, and derived: events are never updated;
every writer of events takes lock_events (store.feed), so an hour's row cannot be
pruned by a delete while an insert adds to it; a data-only restore (pg_restore
--data-only) needs --disable-triggers. See docs/performance.md.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-07 00:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

# One statement a string (asyncpg prepares each). An event's hour is the UTC hour of its
# ``ts`` (postwarden.store.event_query.utc_hour gives a filter's the same way); its tags
# are its ``,a,b,`` text split at the commas (control.events.tags_text), a tag given twice
# one row; events of no tenant (a trusted network's relay) are nobody's to list.
_FUNCTIONS = [
    """
CREATE FUNCTION events_rollup_insert() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO event_hours AS h (tenant_id, hour, first_id, last_id)
    SELECT n.tenant_id, date_trunc('hour', n.ts AT TIME ZONE 'UTC'), min(n.id), max(n.id)
    FROM new_events AS n WHERE n.tenant_id IS NOT NULL GROUP BY 1, 2
    ON CONFLICT (tenant_id, hour) DO UPDATE
        SET first_id = least(h.first_id, excluded.first_id),
            last_id = greatest(h.last_id, excluded.last_id);
    INSERT INTO event_tags (tenant_id, tag, event_id)
    SELECT DISTINCT n.tenant_id, x.tag, n.id
    FROM new_events AS n, unnest(string_to_array(n.tags, ',')) AS x(tag)
    WHERE n.tenant_id IS NOT NULL AND x.tag <> '';
    RETURN NULL;
END $$""",
    """
CREATE FUNCTION events_rollup_delete() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM event_tags AS et USING (
        SELECT DISTINCT o.tenant_id, x.tag, o.id
        FROM old_events AS o, unnest(string_to_array(o.tags, ',')) AS x(tag)
        WHERE o.tenant_id IS NOT NULL AND x.tag <> ''
    ) AS d
    WHERE et.tenant_id = d.tenant_id AND et.tag = d.tag AND et.event_id = d.id;
    -- An hour keeps its row while it has events left: its ids still bound them.
    DELETE FROM event_hours AS h USING (
        SELECT DISTINCT o.tenant_id, date_trunc('hour', o.ts AT TIME ZONE 'UTC') AS hour
        FROM old_events AS o WHERE o.tenant_id IS NOT NULL
    ) AS d
    WHERE h.tenant_id = d.tenant_id AND h.hour = d.hour AND NOT EXISTS (
        SELECT 1 FROM events AS e
        WHERE e.tenant_id = d.tenant_id
          AND e.ts >= d.hour AT TIME ZONE 'UTC'
          AND e.ts < (d.hour + interval '1 hour') AT TIME ZONE 'UTC'
    );
    RETURN NULL;
END $$""",
    """
CREATE FUNCTION events_rollup_truncate() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    TRUNCATE event_hours, event_tags;
    RETURN NULL;
END $$""",
]

_TRIGGERS = [
    "CREATE TRIGGER events_rollup_insert AFTER INSERT ON events"
    " REFERENCING NEW TABLE AS new_events"
    " FOR EACH STATEMENT EXECUTE FUNCTION events_rollup_insert()",
    "CREATE TRIGGER events_rollup_delete AFTER DELETE ON events"
    " REFERENCING OLD TABLE AS old_events"
    " FOR EACH STATEMENT EXECUTE FUNCTION events_rollup_delete()",
    "CREATE TRIGGER events_rollup_truncate AFTER TRUNCATE ON events"
    " FOR EACH STATEMENT EXECUTE FUNCTION events_rollup_truncate()",
]

_BACKFILL = [
    """
INSERT INTO event_hours (tenant_id, hour, first_id, last_id)
SELECT e.tenant_id, date_trunc('hour', e.ts AT TIME ZONE 'UTC'), min(e.id), max(e.id)
FROM events AS e WHERE e.tenant_id IS NOT NULL GROUP BY 1, 2""",
    """
INSERT INTO event_tags (tenant_id, tag, event_id)
SELECT DISTINCT e.tenant_id, x.tag, e.id
FROM events AS e, unnest(string_to_array(e.tags, ',')) AS x(tag)
WHERE e.tenant_id IS NOT NULL AND x.tag <> ''""",
]


def upgrade() -> None:
    op.create_index(op.f("ix_events_tenant_id_type_id"), "events", ["tenant_id", "type", "id"])
    op.create_index(
        op.f("ix_events_tenant_id_recipient_id"), "events", ["tenant_id", "recipient", "id"]
    )
    op.drop_index(op.f("ix_events_tenant_id_recipient"), table_name="events")
    if op.get_bind().dialect.name != "postgresql":
        return
    op.create_table(
        "event_hours",
        sa.Column("tenant_id", sa.BigInteger(), nullable=False),
        sa.Column("hour", sa.DateTime(), nullable=False),  # UTC, no zone
        sa.Column("first_id", sa.BigInteger(), nullable=False),
        sa.Column("last_id", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", "hour", name=op.f("pk_event_hours")),
    )
    op.create_table(
        "event_tags",
        sa.Column("tenant_id", sa.BigInteger(), nullable=False),
        sa.Column("tag", sa.Text(), nullable=False),
        sa.Column("event_id", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", "tag", "event_id", name=op.f("pk_event_tags")),
    )
    # No other writer can slip events in between the backfill and the triggers.
    op.execute("LOCK TABLE events IN SHARE ROW EXCLUSIVE MODE")
    for sql in (*_FUNCTIONS, *_TRIGGERS, *_BACKFILL):
        op.execute(sql)
    op.execute("ANALYZE event_hours")
    op.execute("ANALYZE event_tags")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for name in ("insert", "delete", "truncate"):
            op.execute(f"DROP TRIGGER events_rollup_{name} ON events")
            op.execute(f"DROP FUNCTION events_rollup_{name}()")
        op.drop_table("event_tags")
        op.drop_table("event_hours")
    op.create_index(op.f("ix_events_tenant_id_recipient"), "events", ["tenant_id", "recipient"])
    op.drop_index(op.f("ix_events_tenant_id_recipient_id"), table_name="events")
    op.drop_index(op.f("ix_events_tenant_id_type_id"), table_name="events")
