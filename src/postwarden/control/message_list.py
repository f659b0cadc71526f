"""Listing messages: a tenant's own (``GET /v1/messages``) and, for an operator, a
tenant's (``GET /v1/tenants/{id}/messages``), newest first, filtered, one summary per
message (what ``GET /v1/messages/{id}`` says of it, with its recipients counted by
state instead of listed)."""

from __future__ import annotations

import base64
import binascii
import datetime as dt
from typing import Any

from sqlalchemy import Text, and_, cast, func, literal, or_, select

from postwarden.control.api import api
from postwarden.control.errors import invalid, not_found
from postwarden.control.routing import Call
from postwarden.control.schemas import MessageList, MessageQuery, MessageSummary
from postwarden.store.models import Message, Recipient, Tenant

_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_MICRO = dt.timedelta(microseconds=1)


def encode_position(created_at: dt.datetime, msg_id: str) -> str:
    """The cursor after a message: its acceptance time (microseconds) and id."""
    micros = (created_at - _EPOCH) // _MICRO
    return base64.urlsafe_b64encode(f"{micros}.{msg_id}".encode()).decode().rstrip("=")


def decode_position(cursor: str) -> tuple[dt.datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode("ascii")
        micros_text, msg_id = raw.split(".", 1)
        when = _EPOCH + int(micros_text) * _MICRO
    except (ValueError, binascii.Error, UnicodeDecodeError, OverflowError):
        raise invalid("cursor", "not a cursor this API gave") from None
    if not msg_id or len(msg_id) > 40:
        raise invalid("cursor", "not a cursor this API gave")
    return when, msg_id


def _like_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


#: Up to this many messages match a filter on recipients (status, recipient): they are
#: found through its index and sorted here. Past it, matches are common enough that
#: walking the tenant's messages newest first finds a page soon.
LOOKUP_LIMIT = 5000
_CHUNK = 1000  # ids in one IN (...)
#: The walk reads the tenant's messages in windows of the index, newest first: the
#: first this many, each next one twice as many, up to WINDOW_MAX.
WINDOW_FIRST = 500
WINDOW_MAX = 32_000

Position = tuple[dt.datetime, str]


def after(m: Any, pos: Position | None) -> list[Any]:
    """Messages older than ``pos`` (acceptance time, then id)."""
    if pos is None:
        return []
    when, msg_id = pos
    # The first term lets the index bound the walk; the second breaks ties of time.
    return [
        m.created_at <= when,
        or_(m.created_at < when, and_(m.created_at == when, m.id < msg_id)),
    ]


def not_after(m: Any, pos: Position) -> list[Any]:
    """Messages at ``pos`` or newer (acceptance time, then id)."""
    when, msg_id = pos
    return [
        m.created_at >= when,
        or_(m.created_at > when, and_(m.created_at == when, m.id >= msg_id)),
    ]


def time_filters(q: MessageQuery, m: Any) -> list[Any]:
    conds: list[Any] = []
    if q.since is not None:
        conds.append(m.created_at >= q.since)
    if q.until is not None:
        conds.append(m.created_at < q.until)
    return conds


def column_filters(q: MessageQuery, m: Any) -> list[Any]:
    """The other conditions on the message's own columns (``m``: Message or an alias)."""
    conds: list[Any] = []
    if q.source is not None:
        conds.append(m.source == q.source)
    if q.from_ is not None:
        conds.append(m.mail_from == q.from_)
    if q.domain is not None:
        # Addresses keep their domain as sent over SMTP: compare it in lower case.
        pattern = f"%@{_like_escape(q.domain)}"
        conds.append(func.lower(m.mail_from).like(pattern, escape="\\"))
    if q.tag is not None:
        # Tags are stored as a JSON list of strings; a tag has no character JSON escapes,
        # so its quoted form is found only as a whole element.
        pattern = f'%"{_like_escape(q.tag)}"%'
        conds.append(cast(m.tags, Text).like(pattern, escape="\\"))
    return conds


def recipient_filters(q: MessageQuery) -> list[Any]:
    conds: list[Any] = []
    if q.status is not None:
        conds.append(Recipient.state == q.status)
    if q.recipient is not None:
        conds.append(Recipient.address == q.recipient)
    return conds


def newest_first(m: Any) -> tuple[Any, Any]:
    return m.created_at.desc(), m.id.desc()


async def find_messages(s: Any, tenant_id: int, q: MessageQuery) -> list[Message]:
    """One page: the tenant's messages matching ``q``, newest first (by acceptance
    time, then id), after ``q.cursor``. Each way goes through an index; none reads
    other tenants' messages or sorts a whole history:

    * only times (``since``, ``until``, the cursor): the ``(tenant_id, created_at)``
      index, walked backwards for one page;
    * a filter on recipients with at most LOOKUP_LIMIT matching messages: their ids
      from its index (``(tenant_id, state, …)``, ``(tenant_id, address, …)``), those
      messages read by id and sorted here;
    * else (other filters, or many matches): :func:`walk`, which stops at a page: a
      filter that matches few messages walks the tenant's history between ``since``
      and ``until`` (all of it without them)."""
    pos = decode_position(q.cursor) if q.cursor else None
    mine = Message.tenant_id == tenant_id
    rcpt = recipient_filters(q)
    if not rcpt and not column_filters(q, Message):
        stmt = (
            select(Message)
            .where(mine, *after(Message, pos), *time_filters(q, Message))
            .order_by(*newest_first(Message))
            .limit(q.limit)
        )
        return list((await s.execute(stmt)).scalars())
    if rcpt:
        lookup = (
            select(Recipient.message_id)
            .where(Recipient.tenant_id == tenant_id, *rcpt)
            .distinct()
            .limit(LOOKUP_LIMIT + 1)
        )
        ids = list((await s.execute(lookup)).scalars())
        if len(ids) <= LOOKUP_LIMIT:
            # Those messages by primary key, sorted here: a join would let a planner
            # walk every message of the tenant in time order for a handful of matches.
            own = [*after(Message, pos), *time_filters(q, Message), *column_filters(q, Message)]
            keys: list[Position] = []
            for i in range(0, len(ids), _CHUNK):
                chunk = select(Message.created_at, Message.id, Message.tenant_id).where(
                    Message.id.in_(ids[i : i + _CHUNK]), *own
                )
                got = (await s.execute(chunk)).all()
                keys += [(at, mid) for at, mid, t in got if t == tenant_id]
            return await by_id(s, [mid for _, mid in sorted(keys, reverse=True)[: q.limit]])
    return await walk(s, tenant_id, q, pos, rcpt)


async def walk(
    s: Any, tenant_id: int, q: MessageQuery, pos: Position | None, rcpt: list[Any]
) -> list[Message]:
    """The tenant's messages, newest first from ``pos``, read through the ``(tenant_id,
    created_at)`` index in growing windows: the window's oldest message is found by
    walking the index, then the window alone is searched for matches (their columns,
    and their recipients by one seek each in the recipients' index).

    Windows, rather than one query with every filter: a planner that cannot estimate
    how many messages a pattern matches (PostgreSQL, for a tag or a domain) reads the
    whole table and sorts it even when the newest hundred messages hold the page."""
    conds = column_filters(q, Message)
    if rcpt:
        # One seek a message in the recipients' index (tenant and message id too: no row
        # read). A subquery with LIMIT, not EXISTS: PostgreSQL would turn EXISTS into a
        # join and may hash every matching recipient of the tenant for one window.
        probe = (
            select(literal(1))
            .where(Recipient.tenant_id == tenant_id, Recipient.message_id == Message.id, *rcpt)
            .limit(1)
            .scalar_subquery()
        )
        conds.append(probe.is_not(None))
    found: list[str] = []
    size = WINDOW_FIRST
    while len(found) < q.limit:
        span = [Message.tenant_id == tenant_id, *after(Message, pos), *time_filters(q, Message)]
        edge = (
            await s.execute(
                select(Message.created_at, Message.id)
                .where(*span)
                .order_by(*newest_first(Message))
                .offset(size - 1)
                .limit(1)
            )
        ).first()
        if edge is not None:
            span += not_after(Message, (edge.created_at, edge.id))
        stmt = (
            select(Message.id)
            .where(*span, *conds)
            .order_by(*newest_first(Message))
            .limit(q.limit - len(found))
        )
        found += (await s.execute(stmt)).scalars()
        if edge is None:
            break  # the window reached the oldest message
        pos = (edge.created_at, edge.id)
        size = min(2 * size, WINDOW_MAX)
    return await by_id(s, found)


async def by_id(s: Any, wanted: list[str]) -> list[Message]:
    """The messages of ``wanted`` ids, in that order."""
    if not wanted:
        return []
    got = await s.execute(select(Message).where(Message.id.in_(wanted)))
    rows = {m.id: m for m in got.scalars()}
    return [rows[mid] for mid in wanted if mid in rows]  # (retention may prune meanwhile)


async def list_for(c: Call, tenant_id: int) -> MessageList:
    q: MessageQuery = c.query
    async with c.ctx.sessions() as s:
        rows = await find_messages(s, tenant_id, q)
        counts: dict[str, dict[str, int]] = {m.id: {} for m in rows}
        if rows:
            got = await s.execute(
                select(Recipient.message_id, Recipient.state, func.count())
                .where(Recipient.message_id.in_(counts), Recipient.tenant_id == tenant_id)
                .group_by(Recipient.message_id, Recipient.state)
            )
            for mid, state, n in got.all():
                counts[mid][state] = n
    data = [
        MessageSummary(
            id=m.id,
            tenant_id=tenant_id,
            created_at=m.created_at,
            mail_from=m.mail_from,
            subject=m.subject,
            source=m.source,
            tags=list(m.tags or []),
            metadata=dict(m.meta or {}),
            recipients=sum(counts[m.id].values()),
            states=dict(sorted(counts[m.id].items())),
        )
        for m in rows
    ]
    last = rows[-1] if len(rows) == q.limit else None
    return MessageList(
        data=data, next_cursor=encode_position(last.created_at, last.id) if last else None
    )


@api.op(
    "GET",
    "/v1/messages",
    summary="List messages, newest first",
    scope="read",
    query=MessageQuery,
    response=MessageList,
)
async def list_messages(c: Call) -> Any:
    """This tenant's messages (API and SMTP), newest first: each with its recipients
    counted by state. Filters combine (all must hold). Pass ``next_cursor`` back as
    ``cursor`` for older ones; it is null once a page comes back short."""
    return await list_for(c, c.tenant_id)


@api.op(
    "GET",
    "/v1/tenants/{tenant_id:int}/messages",
    summary="List a tenant's messages, newest first",
    scope="admin",
    query=MessageQuery,
    response=MessageList,
    errors=(404,),
)
async def list_tenant_messages(c: Call) -> Any:
    """As ``GET /v1/messages`` for the tenant's own keys."""
    async with c.ctx.sessions() as s:
        if await s.get(Tenant, c.path["tenant_id"]) is None:
            raise not_found("tenant")
    return await list_for(c, c.path["tenant_id"])
