"""``GET /v1/events``: a tenant's events, filtered, oldest first, the page written
straight from the rows (store.event_query has the query)."""

import datetime as dt
from collections.abc import Sequence
from json.encoder import encode_basestring  # what json.dumps(ensure_ascii=False) uses
from operator import itemgetter
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, StringConstraints
from sqlalchemy import Row
from starlette.responses import Response

from postwarden.control.api import api
from postwarden.control.routing import Call
from postwarden.control.schemas import (
    Cursor,
    EventOut,
    Strict,
    Timestamp,
    decode_cursor,
    encode_cursor,
)
from postwarden.store.event_query import events_query

Tag = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9.-]{0,63}$")]


class EventList(BaseModel):
    data: list[EventOut]
    next_cursor: str | None


#: Every event type a tenant's events can have: the spool's recipient states and
#: operator actions (queue/spool.py), the bounce processor's ``complained``, and
#: engagement's ``opened``, ``clicked`` (with ``machine`` and ``reason`` in their
#: detail) and ``unsubscribed`` (docs/tracking.md). A filter on another is a typo: 422
#: with this list, never an empty page.
EventType = Literal[
    "accepted",
    "queued",
    "deferred",
    "delivered",
    "bounced",
    "expired",
    "dropped",
    "deleted",
    "complained",
    "held",
    "released",
    "flushed",
    "opened",
    "clicked",
    "unsubscribed",
]


class EventQuery(Strict):
    type: EventType | None = Field(None, description="only events of this type")
    recipient: Annotated[str, StringConstraints(max_length=320)] | None = None
    message_id: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9._-]{1,40}$")] | None = None
    tag: Tag | None = None
    since: Timestamp | None = Field(None, description="events at or after (ISO 8601)")
    until: Timestamp | None = Field(None, description="events before (ISO 8601)")
    cursor: Cursor | None = None
    limit: int = Field(100, ge=1, le=1000)


@api.op(
    "GET",
    "/v1/events",
    summary="Events, filtered, oldest first",
    scope="read",
    query=EventQuery,
    response=EventList,
)
async def list_events(c: Call) -> Any:
    """Cursor pagination: pass ``next_cursor`` back as ``cursor``; polling with the last
    cursor returns only newer events."""
    q: EventQuery = c.query
    tenant_id = c.tenant_id
    after = decode_cursor(q.cursor)
    async with c.ctx.sessions() as s:
        stmt = events_query(
            s.bind.dialect.name,
            tenant_id,
            after=after,
            type=q.type,
            recipient=q.recipient,
            message_id=q.message_id,
            tag=q.tag,
            since=q.since,
            until=q.until,
            limit=q.limit,
            detail_text=True,
        )
        # Core, not the ORM's execute: plain rows, a page of 1000 in a third less time
        rows = (await (await s.connection()).execute(stmt)).all()
    cursor = encode_cursor(rows[-1].id) if rows else q.cursor
    return Response(render_events(rows, cursor), media_type="application/json")


_RENDERED = ("id", "type", "ts", "message_id", "recipient_id", "recipient", "detail")


def _text(v: str | None) -> str:
    return "null" if v is None else encode_basestring(v)


def render_events(rows: Sequence[Row[Any]], next_cursor: str | None) -> bytes:
    """An :class:`EventList` as JSON, from rows whose ``detail`` is its stored JSON text.

    The same document pydantic writes (tests/control/test_event_render.py), at about a
    quarter of the cost for a page of 1000: no decoding of each detail only to encode
    it again, no model per row, no row attribute lookups (bench/events_query.py)."""
    if not rows:
        return f'{{"data":[],"next_cursor":{_text(next_cursor)}}}'.encode()
    fields = rows[0]._fields
    get = itemgetter(*(fields.index(name) for name in _RENDERED))
    out = []
    for id_, type_, ts, message_id, recipient_id, recipient, detail in map(get, rows):
        iso = ts.astimezone(dt.UTC).isoformat()
        if iso.endswith("+00:00"):
            iso = iso[:-6] + "Z"
        if not detail or detail == "null":
            detail = "{}"
        out.append(
            f'{{"id":{int(id_)},"type":{_text(type_)},"ts":"{iso}",'
            f'"message_id":{_text(message_id)},"recipient_id":{_text(recipient_id)},'
            f'"recipient":{_text(recipient)},"detail":{detail}}}'
        )
    return f'{{"data":[{",".join(out)}],"next_cursor":{_text(next_cursor)}}}'.encode()
