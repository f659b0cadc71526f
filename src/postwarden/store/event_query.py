"""The query behind ``GET /v1/events``: a tenant's events after a cursor, filtered,
oldest (lowest id) first.

Every filter walks an index in id order and stops at the page's end, so a page costs
about its own length however long the history is (docs/performance.md):

* no filter, ``type``, ``recipient``: ``(tenant_id, id)``, ``(tenant_id, type, id)``,
  ``(tenant_id, recipient, id)``; ``message_id``: ``(message_id)`` (a message has few
  events);
* PostgreSQL: ``since`` and ``until`` also bound the ids, through ``event_hours`` (the
  lowest id of the tenant's events in the hour of ``since`` or later, the highest up to
  the hour of ``until``). Times are only roughly in id order (each shard is copied in
  batches, reports arrive late), so no index on ``ts`` can bound an id walk; the time
  filter still applies, to a walk that starts at most an hour and the late events early;
* PostgreSQL: ``tag`` walks ``event_tags`` (tenant, tag, event id) and fetches each
  event by its id in a LATERAL subquery: the planner cannot turn it into a merge over
  the whole history, which it would pick for a tag that is common but all in one place
  (a campaign's).

The rollup tables are migration 0005's, kept by triggers on ``events``. SQLite keeps
the plain query (a LIKE on the tag text): the same answers, walked without rollups.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import (
    BigInteger,
    DateTime,
    Select,
    Table,
    Text,
    cast,
    column,
    func,
    select,
    table,
    true,
)

from postwarden.store.models import Event

EVENTS: Table = Event.__table__  # type: ignore[assignment]

# Migration 0005's rollups (PostgreSQL only; written by its triggers, never by the app).
EVENT_HOURS = table(
    "event_hours",
    column("tenant_id", BigInteger()),
    column("hour", DateTime()),  # UTC, no zone
    column("first_id", BigInteger()),
    column("last_id", BigInteger()),
)
EVENT_TAGS = table(
    "event_tags",
    column("tenant_id", BigInteger()),
    column("tag", Text()),
    column("event_id", BigInteger()),
)


def utc_hour(t: dt.datetime) -> dt.datetime:
    """The UTC hour ``t`` falls in, without a zone: an ``event_hours`` key."""
    return t.astimezone(dt.UTC).replace(minute=0, second=0, microsecond=0, tzinfo=None)


def tag_pattern(tag: str) -> str:
    """The LIKE pattern that finds ``tag`` in an event's ``,a,b,`` tag text."""
    return "%," + tag.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + ",%"


def events_query(
    dialect: str,
    tenant_id: int,
    *,
    after: int = 0,
    type: str | None = None,
    recipient: str | None = None,
    message_id: str | None = None,
    tag: str | None = None,
    since: dt.datetime | None = None,
    until: dt.datetime | None = None,
    limit: int = 100,
    detail_text: bool = False,
) -> Select[Any]:
    """The first ``limit`` of the tenant's events with an id above ``after`` that pass
    every filter given, in id order: rows of the ``events`` columns (plain rows, not
    :class:`Event` objects: a page of 1000 loads in about half the time). ``dialect``
    is the database's (``postgresql`` uses the rollups). ``detail_text``: the detail
    column as its stored JSON text, not decoded (for a renderer that passes it on)."""
    cols: list[Any] = [
        cast(c, Text).label("detail") if detail_text and c.name == "detail" else c for c in EVENTS.c
    ]
    where: list[Any] = [Event.tenant_id == tenant_id, Event.id > after]
    if type:
        where.append(Event.type == type)
    if recipient:
        where.append(Event.recipient == recipient)
    if message_id:
        where.append(Event.message_id == message_id)
    if since:
        where.append(Event.ts >= since)
    if until:
        where.append(Event.ts < until)
    if dialect != "postgresql":
        if tag:
            where.append(Event.tags.like(tag_pattern(tag), escape="\\"))
        return select(*cols).where(*where).order_by(Event.id).limit(limit)

    def id_range(col: Any) -> list[Any]:
        """``col`` (an event id) within the hours of ``since`` and ``until``; NULL, and
        so nothing, when the tenant has no events there."""
        out = []
        mine = EVENT_HOURS.c.tenant_id == tenant_id
        if since:
            first = select(func.min(EVENT_HOURS.c.first_id)).where(
                mine, EVENT_HOURS.c.hour >= utc_hour(since)
            )
            out.append(col >= first.scalar_subquery())
        if until:
            last = select(func.max(EVENT_HOURS.c.last_id)).where(
                mine, EVENT_HOURS.c.hour <= utc_hour(until)
            )
            out.append(col <= last.scalar_subquery())
        return out

    if not tag:
        return select(*cols).where(*where, *id_range(Event.id)).order_by(Event.id).limit(limit)
    # LIMIT 1 (an id names one event) keeps the subquery a subquery: fetched per tag row.
    one = select(*cols).where(Event.id == EVENT_TAGS.c.event_id, *where).limit(1).lateral()
    return (
        select(*one.c)
        .select_from(EVENT_TAGS)
        .join(one, true())
        .where(
            EVENT_TAGS.c.tenant_id == tenant_id,
            EVENT_TAGS.c.tag == tag,
            EVENT_TAGS.c.event_id > after,
            *id_range(EVENT_TAGS.c.event_id),
        )
        .order_by(EVENT_TAGS.c.event_id)
        .limit(limit)
    )
