"""/v1/tracking/keys: the tenant's keys of the links in its mail (tracking, unsubscribe,
preferences; docs/tracking.md). Rotation with overlap: a new key signs new links at
once, the older ones keep reading until retired, so links in inboxes keep working."""

from __future__ import annotations

import datetime as dt
import re
from typing import Any

from pydantic import BaseModel, Field

from postwarden.control.api import api
from postwarden.control.errors import ApiError, not_found
from postwarden.control.routing import Call
from postwarden.store import tenant_keys as store

_KID = re.compile(r"[0-9a-f]{8}")


class TrackingKeyOut(BaseModel):
    kid: str = Field(description="the key id the tokens carry in clear (8 hex digits)")
    generation: int
    signing: bool = Field(description="the key that signs new links (the newest not retired)")
    created_at: dt.datetime
    retired_at: dt.datetime | None = Field(
        description="when it was retired: its links answer 404 since"
    )


class TrackingKeyList(BaseModel):
    data: list[TrackingKeyOut]


def _out(rows: list[Any]) -> list[TrackingKeyOut]:
    live = [r.generation for r in rows if r.retired_at is None]
    newest = max(live) if live else None
    return [
        TrackingKeyOut(
            kid=r.kid,
            generation=r.generation,
            signing=r.generation == newest,
            created_at=r.created_at,
            retired_at=r.retired_at,
        )
        for r in rows
    ]


@api.op(
    "GET",
    "/v1/tracking/keys",
    summary="List the keys of the tenant's links",
    scope="read",
    response=TrackingKeyList,
)
async def list_tracking_keys(c: Call) -> Any:
    """Newest first; a tenant gets its first key with its first tracked message."""
    async with c.ctx.sessions() as s:
        return TrackingKeyList(data=_out(await store.links_keys(s, c.tenant_id)))


@api.op(
    "POST",
    "/v1/tracking/keys",
    summary="Rotate: a new key signs the tenant's new links",
    scope="manage",
    response=TrackingKeyList,
    status=201,
)
async def rotate_tracking_key(c: Call) -> Any:
    """The older keys keep reading the links already sent until they are retired."""
    made = await store.ensure(c.ctx.sessions, c.ctx.box, c.tenant_id)
    async with c.ctx.sessions() as s:
        if not made:
            await store.rotate(s, c.ctx.box, c.tenant_id)
            await s.commit()
        return TrackingKeyList(data=_out(await store.links_keys(s, c.tenant_id)))


@api.op(
    "POST",
    "/v1/tracking/keys/{kid}/retire",
    summary="Retire a key: the links it signed answer 404 from now on",
    scope="manage",
    response=TrackingKeyList,
    errors=(404, 409),
)
async def retire_tracking_key(c: Call) -> Any:
    """Not the key that signs new links (409: rotate first)."""
    kid = str(c.path["kid"])
    if not _KID.fullmatch(kid):
        raise not_found("key")
    async with c.ctx.sessions() as s:
        try:
            await store.retire(s, c.tenant_id, kid)
        except store.TenantKeyError as exc:
            if "no such" in str(exc):
                raise not_found("key") from exc
            raise ApiError(409, "conflict", str(exc)) from exc
        await s.commit()
        return TrackingKeyList(data=_out(await store.links_keys(s, c.tenant_id)))
