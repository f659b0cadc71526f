"""/v1/webhooks: a tenant's event webhook endpoints (issue 23; docs/decisions/0012,
docs/api.md "Webhooks"): made with a signing secret shown once (``whsec_…``) and an
Ed25519 key (its public half in the tenant's JWKS), rotated with overlap, their
deliveries listed, events sent again on demand."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator
from sqlalchemy import delete, func, select

from postwarden.control.api import api, page, page_of
from postwarden.control.errors import invalid, not_found
from postwarden.control.event_list import EventType
from postwarden.control.routing import Call
from postwarden.control.schemas import Page, Strict
from postwarden.store.models import Event
from postwarden.store.webhook_models import (
    OUTBOX_STATES,
    WebhookAttempt,
    WebhookEndpoint,
    WebhookOutbox,
)
from postwarden.webhooks import signing

EVENT_TYPES: tuple[str, ...] = get_args(EventType)
#: How long a rotated-out secret still signs, by default (both sign meanwhile).
OVERLAP_HOURS = 24
URL = Annotated[str, StringConstraints(min_length=8, max_length=2000, pattern=r"^https?://\S+$")]


def _events_text(events: list[str]) -> str:
    if events == ["*"]:
        return "*"
    return "," + ",".join(sorted(set(events))) + ","


def _events_list(text: str) -> list[str]:
    return ["*"] if text == "*" else [e for e in text.split(",") if e]


def _check_events(v: list[str]) -> list[str]:
    if v == ["*"]:
        return v
    unknown = [e for e in v if e not in EVENT_TYPES]
    if unknown:
        raise ValueError(f"unknown event type {unknown[0]!r}; one of {', '.join(EVENT_TYPES)}")
    return v


class WebhookCreate(Strict):
    url: URL = Field(description="http(s) URL the events are POSTed to")
    events: list[str] = Field(
        min_length=1,
        max_length=len(EVENT_TYPES),
        description='event types to send (the events API\'s), or ["*"] for all',
    )
    description: Annotated[str, StringConstraints(max_length=200)] = ""

    @field_validator("events")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        return _check_events(v)


class WebhookUpdate(Strict):
    url: URL | None = None
    events: list[str] | None = Field(None, min_length=1, max_length=len(EVENT_TYPES))
    description: Annotated[str, StringConstraints(max_length=200)] | None = None
    enabled: bool | None = Field(None, description="false stops sending; true starts again")

    @field_validator("events")
    @classmethod
    def _known(cls, v: list[str] | None) -> list[str] | None:
        return None if v is None else _check_events(v)


class WebhookOut(BaseModel):
    id: int
    url: str
    events: list[str]
    description: str
    enabled: bool
    disabled_reason: str = Field(description="why the appliance disabled it (a 410 Gone)")
    public_key: str = Field(description="the Ed25519 key that signs v1a (whpk_…)")
    secrets: int = Field(description="HMAC secrets that sign now (2 while a rotation overlaps)")
    created_at: dt.datetime


class WebhookCreated(WebhookOut):
    secret: str = Field(description="the HMAC signing secret (whsec_…): shown this once")


class WebhookList(BaseModel):
    data: list[WebhookOut]
    next_cursor: str | None


class RotateIn(Strict):
    overlap_hours: float = Field(
        OVERLAP_HOURS, ge=0, le=24 * 7, description="how long the old secret still signs"
    )


class DeliveryQuery(Page):
    state: Literal["pending", "delivered", "failed"] | None = None


class DeliveryOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    event_id: int
    state: str = Field(description=", ".join(OUTBOX_STATES))
    attempts: int
    next_at: dt.datetime = Field(description="when it is (or was) due")
    last_status: int | None = Field(description="the last try's HTTP status; null: no answer")
    created_at: dt.datetime
    delivered_at: dt.datetime | None


class DeliveryList(BaseModel):
    data: list[DeliveryOut]
    next_cursor: str | None


class ReplayIn(Strict):
    event_id: int | None = Field(None, ge=1, description="one event again")
    since: dt.datetime | None = Field(None, description="or every event from this time…")
    until: dt.datetime | None = Field(None, description="…up to this time (exclusive)")


class Replayed(BaseModel):
    queued: int


class WebhookDeleted(BaseModel):
    deleted: bool
    dropped: int = Field(description="its deliveries not yet made, dropped with it")


def _live(secrets: list[dict[str, Any]], now: dt.datetime) -> list[dict[str, Any]]:
    return [
        x
        for x in secrets
        if x.get("expires_at") is None or dt.datetime.fromisoformat(x["expires_at"]) > now
    ]


def _out(row: WebhookEndpoint) -> WebhookOut:
    now = dt.datetime.now(dt.UTC)
    return WebhookOut(
        id=row.id,
        url=row.url,
        events=_events_list(row.events),
        description=row.description,
        enabled=bool(row.enabled),
        disabled_reason=row.disabled_reason,
        public_key="",
        secrets=len(_live(row.secrets, now)),
        created_at=row.created_at,
    )


def _with_key(c: Call, row: WebhookEndpoint) -> WebhookOut:
    out = _out(row)
    out.public_key = signing.public_text(c.ctx.box.open(row.signing_key))
    return out


def _sealed_secret(c: Call, secret: bytes) -> dict[str, Any]:
    return {"sealed": c.ctx.box.seal(secret).decode("ascii"), "expires_at": None}


async def _saved_with_secret(
    s: Any, c: Call, row: WebhookEndpoint, secret: bytes
) -> WebhookCreated:
    """Commit ``row`` and answer it with ``secret``, shown this once."""
    await s.commit()
    await s.refresh(row)
    out = _with_key(c, row)
    return WebhookCreated(**out.model_dump(), secret=signing.secret_text(secret))


async def _endpoint(s: Any, c: Call) -> WebhookEndpoint:
    row = await s.scalar(
        select(WebhookEndpoint).where(
            WebhookEndpoint.tenant_id == c.tenant_id, WebhookEndpoint.id == c.path["webhook_id"]
        )
    )
    if row is None:
        raise not_found("webhook")
    return row


@api.op(
    "POST",
    "/v1/webhooks",
    summary="Add an event webhook endpoint (its signing secret is shown once)",
    scope="manage",
    body=WebhookCreate,
    response=WebhookCreated,
    status=201,
    errors=(422,),
    sync=False,
)
async def create_webhook(c: Call) -> Any:
    """Events of the chosen types are POSTed to ``url`` from the next one on, signed
    (Standard Webhooks: ``v1`` with the secret, ``v1a`` with the Ed25519 key)."""
    b: WebhookCreate = c.body
    secret = signing.new_secret()
    row = WebhookEndpoint(
        tenant_id=c.tenant_id,
        url=b.url,
        events=_events_text(b.events),
        description=b.description,
        secrets=[_sealed_secret(c, secret)],
        signing_key=c.ctx.box.seal(signing.new_signing_key()),
        enabled=1,
        disabled_reason="",
    )
    async with c.ctx.sessions() as s:
        s.add(row)
        return await _saved_with_secret(s, c, row, secret)


@api.op(
    "GET",
    "/v1/webhooks",
    summary="List event webhook endpoints",
    scope="read",
    query=Page,
    response=WebhookList,
)
async def list_webhooks(c: Call) -> Any:
    q: Page = c.query
    async with c.ctx.sessions() as s:
        stmt = select(WebhookEndpoint).where(WebhookEndpoint.tenant_id == c.tenant_id)
        rows = await page(s, stmt, WebhookEndpoint, q.cursor, q.limit)
    return WebhookList(data=[_with_key(c, r) for r in rows], next_cursor=page_of(rows, q.limit))


@api.op(
    "GET",
    "/v1/webhooks/{webhook_id:int}",
    summary="Show an event webhook endpoint",
    scope="read",
    response=WebhookOut,
    errors=(404,),
)
async def get_webhook(c: Call) -> Any:
    async with c.ctx.sessions() as s:
        return _with_key(c, await _endpoint(s, c))


@api.op(
    "PATCH",
    "/v1/webhooks/{webhook_id:int}",
    summary="Change an event webhook endpoint",
    scope="manage",
    body=WebhookUpdate,
    response=WebhookOut,
    errors=(404, 422),
    sync=False,
)
async def update_webhook(c: Call) -> Any:
    """A new filter applies from the next event on; ``enabled: true`` starts an endpoint
    the appliance disabled (a 410) again."""
    b: WebhookUpdate = c.body
    async with c.ctx.sessions() as s:
        row = await _endpoint(s, c)
        if b.url is not None:
            row.url = b.url
        if b.events is not None:
            row.events = _events_text(b.events)
        if b.description is not None:
            row.description = b.description
        if b.enabled is not None:
            row.enabled = int(b.enabled)
            row.disabled_reason = "" if b.enabled else "disabled through the API"
        await s.commit()
        await s.refresh(row)
        return _with_key(c, row)


@api.op(
    "DELETE",
    "/v1/webhooks/{webhook_id:int}",
    summary="Remove an event webhook endpoint",
    scope="manage",
    response=WebhookDeleted,
    errors=(404,),
    sync=False,
)
async def delete_webhook(c: Call) -> Any:
    """Its deliveries not yet made go with it (``dropped``)."""
    async with c.ctx.sessions() as s:
        row = await _endpoint(s, c)
        left = await s.scalar(
            select(func.count()).where(
                WebhookOutbox.endpoint_id == row.id, WebhookOutbox.state == "pending"
            )
        )
        await s.execute(delete(WebhookEndpoint).where(WebhookEndpoint.id == row.id))
        await s.commit()
    return WebhookDeleted(deleted=True, dropped=int(left or 0))


@api.op(
    "POST",
    "/v1/webhooks/{webhook_id:int}/secret",
    summary="Rotate the signing secret (the old one still signs for the overlap)",
    scope="manage",
    body=RotateIn,
    response=WebhookCreated,
    errors=(404,),
    sync=False,
)
async def rotate_webhook_secret(c: Call) -> Any:
    """Every delivery carries a ``v1`` signature of each live secret: a receiver moves
    to the new one at its own pace within ``overlap_hours``."""
    b: RotateIn = c.body
    now = dt.datetime.now(dt.UTC)
    until = (now + dt.timedelta(hours=b.overlap_hours)).isoformat()
    secret = signing.new_secret()
    async with c.ctx.sessions() as s:
        row = await _endpoint(s, c)
        # Every secret signing now stops at the overlap's end (or sooner, as it was).
        old = [
            {**x, "expires_at": min(x.get("expires_at") or until, until)}
            for x in _live(row.secrets, now)
        ]
        row.secrets = [_sealed_secret(c, secret), *old]
        return await _saved_with_secret(s, c, row, secret)


@api.op(
    "GET",
    "/v1/webhooks/{webhook_id:int}/deliveries",
    summary="An endpoint's deliveries: each event's state, tries and last status",
    scope="read",
    query=DeliveryQuery,
    response=DeliveryList,
    errors=(404,),
)
async def list_deliveries(c: Call) -> Any:
    q: DeliveryQuery = c.query
    async with c.ctx.sessions() as s:
        row = await _endpoint(s, c)
        stmt = select(WebhookOutbox).where(WebhookOutbox.endpoint_id == row.id)
        if q.state is not None:
            stmt = stmt.where(WebhookOutbox.state == q.state)
        rows = await page(s, stmt, WebhookOutbox, q.cursor, q.limit)
    data = [DeliveryOut.model_validate(r) for r in rows]
    return DeliveryList(data=data, next_cursor=page_of(rows, q.limit))


class AttemptOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    at: dt.datetime
    status: int | None = Field(description="the HTTP status; null: no answer (see error)")
    duration_ms: int
    error: str = Field(description="why there was no answer (a refused address, a timeout)")
    response: str = Field(description="the answer's first kilobyte")


class AttemptList(BaseModel):
    data: list[AttemptOut]


@api.op(
    "GET",
    "/v1/webhooks/{webhook_id:int}/deliveries/{delivery_id:int}/attempts",
    summary="Every try of one delivery: status, time, error, the answer's first kilobyte",
    scope="read",
    response=AttemptList,
    errors=(404,),
)
async def list_attempts(c: Call) -> Any:
    async with c.ctx.sessions() as s:
        row = await _endpoint(s, c)
        found = await s.scalar(
            select(WebhookOutbox.id).where(
                WebhookOutbox.endpoint_id == row.id, WebhookOutbox.id == c.path["delivery_id"]
            )
        )
        if found is None:
            raise not_found("delivery")
        rows = (
            await s.execute(
                select(WebhookAttempt)
                .where(WebhookAttempt.outbox_id == found)
                .order_by(WebhookAttempt.id)
                .limit(100)
            )
        ).scalars()
        return AttemptList(data=[AttemptOut.model_validate(a) for a in rows])


@api.op(
    "POST",
    "/v1/webhooks/{webhook_id:int}/replay",
    summary="Send events again: one, or a time range (the same webhook-id each)",
    scope="manage",
    body=ReplayIn,
    response=Replayed,
    errors=(404, 422),
    sync=False,
)
async def replay_webhook(c: Call) -> Any:
    """The tenant's events the endpoint's filter takes: ``event_id``, or those from
    ``since`` to ``until`` (at most 100 000). Each gets a new delivery, due now."""
    b: ReplayIn = c.body
    now = dt.datetime.now(dt.UTC)
    async with c.ctx.sessions() as s:
        row = await _endpoint(s, c)  # another tenant's: 404 before anything else
        if (b.event_id is None) == (b.since is None):
            raise invalid("event_id", "give event_id, or since (and until)")
        stmt = select(Event.id, Event.type).where(Event.tenant_id == c.tenant_id)
        if b.event_id is not None:
            stmt = stmt.where(Event.id == b.event_id)
        else:
            stmt = stmt.where(Event.ts >= b.since)
            if b.until is not None:
                stmt = stmt.where(Event.ts < b.until)
        found = (await s.execute(stmt.order_by(Event.id).limit(100_000))).all()
        wanted = _events_list(row.events)
        ids = [eid for eid, kind in found if wanted == ["*"] or kind in wanted]
        if b.event_id is not None and not found:
            raise not_found("event")
        s.add_all(
            WebhookOutbox(
                endpoint_id=row.id,
                tenant_id=c.tenant_id,
                event_id=eid,
                state="pending",
                attempts=0,
                next_at=now,
                created_at=now,
            )
            for eid in ids
        )
        await s.commit()
    return Replayed(queued=len(ids))


class Jwks(BaseModel):
    keys: list[dict[str, str]] = Field(description="one Ed25519 JWK per endpoint (kid wh_<id>)")


@api.op(
    "GET",
    "/v1/webhooks/jwks",
    summary="The public keys that sign v1a, as a JWKS",
    scope="read",
    response=Jwks,
)
async def webhooks_jwks(c: Call) -> Any:
    """For a receiver that verifies ``v1a`` (Ed25519): the key of each endpoint, its
    ``kid`` ``wh_<endpoint id>``."""
    async with c.ctx.sessions() as s:
        rows = (
            await s.execute(select(WebhookEndpoint).where(WebhookEndpoint.tenant_id == c.tenant_id))
        ).scalars()
        return Jwks(keys=[signing.jwk(c.ctx.box.open(r.signing_key), f"wh_{r.id}") for r in rows])
