"""The messages API: injection (one or a batch, idempotent), status, and events."""

from __future__ import annotations

import asyncio
import base64
import binascii
import datetime as dt
import logging
import time
from collections.abc import Sequence
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    model_validator,
)
from sqlalchemy import select

from postwarden.content.links import rewrite_html
from postwarden.control.api import api, one_or_404
from postwarden.control.errors import ApiError, invalid
from postwarden.control.idempotency import IDEMPOTENCY, Found, idempotent, keyed
from postwarden.control.pool_cache import PoolNotAllowed
from postwarden.control.relay import Credentials
from postwarden.control.routing import Call
from postwarden.control.schemas import (
    Address,
    EventOut,
    PoolName,
    one_line,
)
from postwarden.control.tenant_keys import LinkKey
from postwarden.control.tracking import Tracker, tracking_base
from postwarden.mail.build import (
    BuildError,
    Draft,
    Mailbox,
    Part,
    build,
    is_reserved,
    needs_smtputf8,
)
from postwarden.mail.cleanup import Rejected
from postwarden.queue.spool import new_message_id
from postwarden.store.availability import LogLimiter
from postwarden.store.models import Event, Message, Recipient
from postwarden.values import LANE_BULK, LANE_HIGH, Envelope, SpoolFull

log = logging.getLogger("postwarden.control.messages")
_limited = LogLimiter(log)

OneLine = Annotated[str, AfterValidator(one_line)]
DisplayName = Annotated[OneLine, StringConstraints(max_length=200)]
HeaderName = Annotated[str, StringConstraints(pattern=r"^[!-9;-~]{1,76}$")]
HeaderValue = Annotated[OneLine, StringConstraints(max_length=998)]
Tag = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9.-]{0,63}$")]
MetaKey = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
MetaValue = Annotated[str, StringConstraints(max_length=1000)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Mailbox_(Strict):
    email: Address
    name: DisplayName = ""


def _from_text(value: Any) -> Any:
    return {"email": value} if isinstance(value, str) else value


# An address as a string, or {"email", "name"}: both validate as the object, so an
# error names one path (``to[1].email``) whichever form was sent.
MailboxIn = Annotated[
    Mailbox_, BeforeValidator(_from_text, json_schema_input_type=Mailbox_ | Address)
]


def _box(value: Mailbox_) -> Mailbox:
    return Mailbox(value.email, value.name)


class AttachmentIn(Strict):
    filename: Annotated[OneLine, StringConstraints(min_length=1, max_length=255)]
    content_type: Annotated[
        str,
        StringConstraints(
            pattern=r"^[a-zA-Z0-9][a-zA-Z0-9!#$&^_.+-]{0,63}/[a-zA-Z0-9][a-zA-Z0-9!#$&^_.+-]{0,63}$"
        ),
    ] = "application/octet-stream"
    content: str = Field(description="the file, base64-encoded")
    disposition: Literal["attachment", "inline"] = "attachment"
    content_id: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9._@-]{1,100}$")] | None = None


class MessageCreate(Strict):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    from_: MailboxIn = Field(alias="from")
    to: list[MailboxIn] = Field(default_factory=list)
    cc: list[MailboxIn] = Field(default_factory=list)
    bcc: list[MailboxIn] = Field(default_factory=list)
    reply_to: MailboxIn | None = None
    subject: Annotated[OneLine, StringConstraints(max_length=998)] = ""
    text: str | None = None
    html: str | None = None
    headers: dict[HeaderName, HeaderValue] = Field(default_factory=dict, max_length=50)
    attachments: list[AttachmentIn] = Field(default_factory=list, max_length=100)
    tags: list[Tag] = Field(default_factory=list, max_length=10)
    metadata: dict[MetaKey, MetaValue] = Field(default_factory=dict, max_length=20)
    pool: PoolName | None = Field(
        None,
        description="the IP pool to send from: the account's default pool, one of its allowed"
        " pools, or (for an account without a default) the appliance's default pool;"
        " none: the account's default pool",
    )
    priority: Literal["high", "bulk"] = Field(
        "high", description="high: transactional mail, sent first; bulk: campaign mail"
    )
    tracking: bool = Field(
        False,
        description="rewrite the HTML's links and add an open pixel (docs/tracking.md):"
        " the hits name this message (its recipients share the links)",
    )

    @model_validator(mode="after")
    def _complete(self) -> MessageCreate:
        if self.text is None and self.html is None:
            raise ValueError("give text, html or both")
        if not (self.to or self.cc or self.bcc):
            raise ValueError("give at least one recipient in to, cc or bcc")
        return self


class BatchCreate(Strict):
    messages: list[MessageCreate] = Field(min_length=1, max_length=10_000)


class RecipientAccepted(BaseModel):
    id: str
    email: str
    status: Literal["queued", "dropped"]
    reason: str | None = None


class MessageAccepted(BaseModel):
    id: str
    recipients: list[RecipientAccepted]


class BatchItem(BaseModel):
    index: int
    status: int
    message: MessageAccepted | None = None
    error: dict[str, Any] | None = None


class BatchAccepted(BaseModel):
    results: list[BatchItem]


class RecipientState(BaseModel):
    id: str
    email: str
    state: str
    attempts: int
    last_response: str
    updated_at: dt.datetime


class MessageStatus(BaseModel):
    id: str
    created_at: dt.datetime
    mail_from: str
    subject: str
    source: str
    tags: list[str]
    metadata: dict[str, Any]
    recipients: list[RecipientState]
    events: list[EventOut]


# ---------------------------------------------------------------- injection


def _decode(att: AttachmentIn, path: str) -> bytes:
    try:
        return base64.b64decode(att.content.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise invalid(path, "not valid base64") from None


def too_large(path: str, what: str, limit: int) -> ApiError:
    """413: the message (or one attachment of it) is larger than smtp.max_message_size."""
    msg = f"{what}; the limit (smtp.max_message_size) is {limit} bytes"
    return ApiError(413, "too_large", f"{path}: {msg}", fields=[{"path": path, "message": msg}])


async def tracking(c: Call, m: MessageCreate) -> tuple[LinkKey, str] | None:
    """The links key and base of a message that asks for tracking (None otherwise):
    the From domain's tracking host once its CNAME is found, else control.public_url."""
    if not m.tracking or m.html is None:
        return None
    domain = _box(m.from_).email.rpartition("@")[2]
    async with c.ctx.sessions() as s:
        base = await tracking_base(s, c.ctx, c.tenant_id, domain)
    return await c.ctx.tenant_keys.signer(c.tenant_id), base


def prepare(
    c: Call,
    m: MessageCreate,
    prefix: str = "",
    *,
    own_headers: Sequence[tuple[str, str]] = (),
    track: tuple[LinkKey, str] | None = None,
) -> tuple[Envelope, bytes, str]:
    """Check a message against the tenant's rules and build it; raises ApiError (422,
    or 413 when the built message is larger than smtp.max_message_size).
    ``own_headers`` are the appliance's (a test send's ``X-Postwarden-Test``), added
    after the caller's, which may not use those names. ``track``: the tenant's links
    key and the links' base, for a message that asks for tracking (:func:`tracking`)."""
    cfg = c.ctx.cfg
    p = (lambda s: f"{prefix}{s}") if prefix else (lambda s: s)
    sender = _box(m.from_)
    domain = sender.email.rpartition("@")[2]
    if not c.ctx.may_send_as(c.tenant_id, domain):
        raise invalid(p("from"), f"{domain} is not a verified sending domain of this account")
    rcpts = [_box(x).email for x in (*m.to, *m.cc, *m.bcc)]
    if len(rcpts) > cfg.control.max_api_recipients:
        raise invalid(p("to"), f"more than {cfg.control.max_api_recipients} recipients")
    for name in m.headers:
        if is_reserved(name) or name.lower().startswith("x-postwarden-"):
            raise invalid(p(f"headers.{name}"), "this header is set by the appliance")
    try:
        pool = c.ctx.pool_cache.pool_for(c.tenant_id, m.pool)
    except PoolNotAllowed as exc:
        raise invalid(p("pool"), str(exc)) from None
    limit = cfg.smtp.max_message_size
    parts = []
    for i, att in enumerate(m.attachments):
        data = _decode(att, p(f"attachments[{i}].content"))
        if len(data) > limit:
            raise too_large(p(f"attachments[{i}].content"), f"{len(data)} bytes", limit)
        parts.append(Part(att.filename, att.content_type, data, att.disposition, att.content_id))
    msg_id = new_message_id()
    html = m.html
    if html is not None and track is not None:
        tracker = Tracker(c.ctx.tenant_keys, track[0], track[1], 0, message_id=msg_id)
        html = rewrite_html(html, tracker.click, pixel_url=tracker.pixel).html
    draft = Draft(
        sender=sender,
        to=[_box(x) for x in m.to],
        cc=[_box(x) for x in m.cc],
        reply_to=_box(m.reply_to) if m.reply_to else None,
        subject=m.subject,
        text=m.text,
        html=html,
        headers=[*m.headers.items(), *own_headers],
        attachments=parts,
    )
    try:
        data = build(draft, message_id=f"<{msg_id}@{cfg.server.hostname}>", date=time.time())
    except BuildError as exc:
        raise invalid(p("body"), str(exc)) from None
    if len(data) > limit:
        raise too_large(p("body"), f"the message would be {len(data)} bytes", limit)
    env = Envelope(
        mail_from=sender.email,
        rcpt_tos=rcpts,
        client_ip=c.request.client.host if c.request.client else "",
        helo="api",
        auth=c.principal.prefix if c.principal else None,
        tenant=str(c.tenant_id),
        smtputf8=needs_smtputf8(draft) or any(not r.isascii() for r in rcpts),
        meta={"source": "api", "subject": m.subject[:300], "tags": m.tags, "metadata": m.metadata},
        pool=pool,
        lane=LANE_BULK if m.priority == "bulk" else LANE_HIGH,
    )
    return env, data, msg_id


async def spool(c: Call, env: Envelope, data: bytes, msg_id: str) -> MessageAccepted:
    if c.ctx.inject is None:
        raise ApiError(503, "unavailable", "this process does not accept mail (role control)")
    try:
        creds = None
        if c.principal is not None and c.principal.tenant_name is not None:
            token = c.request.headers.get("authorization", "").partition(" ")[2].strip()
            creds = Credentials(c.principal.tenant_name, token)
        stored = await c.ctx.inject(env, data, msg_id, creds)
    except Rejected as exc:  # the cleanup stage's verdict: the message, not the spool
        if exc.code < 500:  # a temporary refusal (the control database is down)
            raise ApiError(
                503, "unavailable", "the message cannot be accepted now; try again shortly",
                headers={"Retry-After": "5"},
            ) from None  # fmt: skip
        raise invalid(exc.field, exc.text) from None
    except SpoolFull as exc:
        raise ApiError(
            503, "insufficient_storage", "the spool is out of disk space; try again later",
            headers={"Retry-After": "60"},
        ) from exc  # fmt: skip
    except Exception as exc:
        raise ApiError(503, "unavailable", f"the spool refused the message: {exc}") from exc
    rows = zip(env.rcpt_tos, stored.rcpt_ids, strict=True)
    return accepted(stored.msg_id, [(r, rid, stored.drops.get(r)) for r, rid in rows])


async def remember_message(c: Call, env: Envelope, msg: MessageAccepted) -> None:
    """Make GET /v1/messages/{id} answer at once (the event copier would, a moment later).

    The message is spooled already: a failure here is logged, never the request's
    answer (a 5xx would invite a retry that sends it twice)."""
    try:
        await _remember(c, env, msg)
    except Exception as exc:
        _limited(logging.WARNING, "remember", "event=remember_failed msg=%s", msg.id, exc=exc)


async def _remember(c: Call, env: Envelope, msg: MessageAccepted) -> None:
    meta = env.meta or {}
    async with c.ctx.sessions() as s:
        from postwarden.control.events import insert_ignore

        now = dt.datetime.now(dt.UTC)
        await s.execute(
            insert_ignore(s, Message),
            [
                {
                    "id": msg.id,
                    "tenant_id": c.tenant_id,
                    "created_at": now,
                    "mail_from": env.mail_from,
                    "subject": meta.get("subject", ""),
                    "source": "api",
                    "tags": list(meta.get("tags", [])),
                    "meta": dict(meta.get("metadata", {})),
                }
            ],
        )
        await s.execute(
            insert_ignore(s, Recipient),
            [
                {
                    "id": r.id,
                    "message_id": msg.id,
                    "tenant_id": c.tenant_id,
                    "address": r.email,
                    "state": r.status,
                    "attempts": 0,
                    "last_response": r.reason or "",
                    "updated_at": now,
                }
                for r in msg.recipients
            ],
        )
        await s.commit()


def accepted(msg_id: str, rows: list[tuple[str, int, str | None]]) -> MessageAccepted:
    """The 202 answer for a message: its recipients (address, id, drop reason)."""
    return MessageAccepted(
        id=msg_id,
        recipients=[
            RecipientAccepted(
                id=f"{msg_id}.{rid}",
                email=rcpt,
                status="dropped" if reason else "queued",
                reason=reason,
            )
            for rcpt, rid, reason in rows
        ],
    )


# JSON slack: the fields around the content (addresses, headers, JSON syntax).
API_BODY_SLACK = 256 * 1024


def api_body_limit(ctx: Any) -> int:
    """The largest body that can still become a message: smtp.max_message_size after
    base64's 4/3 expansion (attachments travel base64 in the JSON), plus the fields
    around it. A larger body is refused (413) before it is read; the built message is
    then held to smtp.max_message_size. A batch is held to the same total."""
    size: int = ctx.cfg.smtp.max_message_size
    return -(-size // 3) * 4 + API_BODY_SLACK


@api.op(
    "POST",
    "/v1/messages",
    summary="Send a message",
    scope="send",
    body=MessageCreate,
    response=MessageAccepted,
    status=202,
    errors=(409, 503),
    body_limit=api_body_limit,
    headers=IDEMPOTENCY,
    sync=False,  # spools mail; changes no cache
)
async def send_message(c: Call) -> Any:
    """Answers 202 once the message is in the spool, fsync'd. Suppressed recipients
    come back with status ``dropped`` and the reason."""

    async def run(found: Found) -> tuple[int, Any]:
        if 0 in found:  # accepted before, under this key: the same answer
            return 202, found[0]
        env, data, msg_id = prepare(c, c.body, track=await tracking(c, c.body))
        env = keyed(c, env, 0)
        msg = await spool(c, env, data, msg_id)
        await remember_message(c, env, msg)
        return 202, msg

    return await idempotent(c, run, accepted)


@api.op(
    "POST",
    "/v1/messages/batch",
    summary="Send up to control.max_batch messages",
    scope="send",
    body=BatchCreate,
    response=BatchAccepted,
    status=202,
    errors=(409,),
    body_limit=api_body_limit,
    headers=IDEMPOTENCY,
    sync=False,  # spools mail; changes no cache
)
async def send_batch(c: Call) -> Any:
    """Every message is checked first: one invalid message fails the whole batch with a
    422 naming it (``messages[3].to[0]``), and nothing is sent. Then each is spooled;
    the results list each message's id or, rarely, its spool error."""
    body: BatchCreate = c.body
    limit = c.ctx.cfg.control.max_batch
    if len(body.messages) > limit:
        raise invalid("messages", f"more than {limit} messages in one batch")

    async def run(found: Found) -> tuple[int, Any]:
        prepared = [
            prepare(c, m, f"messages[{i}].", track=await tracking(c, m))
            for i, m in enumerate(body.messages)
        ]

        async def one(i: int, env: Envelope, data: bytes, msg_id: str) -> BatchItem:
            if i in found:  # accepted before, under this key
                return BatchItem(index=i, status=202, message=found[i])
            env = keyed(c, env, i)
            try:
                msg = await spool(c, env, data, msg_id)
            except ApiError as exc:
                return BatchItem(index=i, status=exc.status, error=exc.body(c.request_id)["error"])
            await remember_message(c, env, msg)
            return BatchItem(index=i, status=202, message=msg)

        results = await asyncio.gather(*(one(i, *p) for i, p in enumerate(prepared)))
        return 202, BatchAccepted(results=list(results))

    return await idempotent(c, run, accepted)


# ---------------------------------------------------------------- status and events


def event_out(e: Event) -> EventOut:
    return EventOut.model_validate(e)


@api.op(
    "GET",
    "/v1/messages/{message_id}",
    summary="A message's recipients and events",
    scope="read",
    response=MessageStatus,
    errors=(404,),
)
async def get_message(c: Call) -> Any:
    mid = c.path["message_id"]
    async with c.ctx.sessions() as s:
        stmt = select(Message).where(Message.id == mid, Message.tenant_id == c.tenant_id)
        m = await one_or_404(s, stmt, "message")
        mine = (Recipient.message_id == mid, Recipient.tenant_id == c.tenant_id)
        rcpts = (await s.execute(select(Recipient).where(*mine).order_by(Recipient.id))).scalars()
        mine = (Event.message_id == mid, Event.tenant_id == c.tenant_id)
        evs = (await s.execute(select(Event).where(*mine).order_by(Event.id))).scalars()
    return MessageStatus(
        id=m.id,
        created_at=m.created_at,
        mail_from=m.mail_from,
        subject=m.subject,
        source=m.source,
        tags=list(m.tags or []),
        metadata=dict(m.meta or {}),
        recipients=[
            RecipientState(
                id=r.id,
                email=r.address,
                state=r.state,
                attempts=r.attempts,
                last_response=r.last_response,
                updated_at=r.updated_at,
            )
            for r in rcpts
        ],
        events=[event_out(e) for e in evs],
    )
