"""/v1/contacts/{id}/export and /v1/contacts/{id}/erase (issue 22, GDPR;
docs/privacy.md): everything the appliance holds about a contact, and its erasure with
a tombstone that keeps the address suppressed."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field
from starlette.responses import JSONResponse

from postwarden.control.api import api
from postwarden.control.errors import not_found
from postwarden.control.routing import Call
from postwarden.store import privacy
from postwarden.store.contact_models import Contact


class ContactExport(BaseModel):
    contact: dict[str, Any]
    lists: list[int]
    topics: list[dict[str, Any]]
    consents: list[dict[str, Any]]
    suppression: dict[str, Any] | None
    send_records: list[dict[str, Any]]
    message_recipients: list[dict[str, Any]]
    events: list[dict[str, Any]]
    unsubscribe_requests: list[dict[str, Any]]
    tracking_hits: list[dict[str, Any]]
    limit: int = Field(description="rows of each kind at most (the newest)")


class Erased(BaseModel):
    erased: bool
    tombstone: str = Field(
        description="what stays of the address: h1: and a keyed hash, suppressed"
    )
    rows: dict[str, int] = Field(description="rows changed per table")


@api.op(
    "GET",
    "/v1/contacts/{contact_id:int}/export",
    summary="Everything held about a contact (a data subject's access request)",
    scope="read",
    response=ContactExport,
    errors=(404,),
)
async def export_contact(c: Call) -> Any:
    """The contact, its lists, topic choices and consents, its suppression, and every
    send record, message recipient, event, unsubscribe request and tracking hit that
    names it (up to ``limit`` of each, the newest), as JSON."""
    async with c.ctx.sessions() as s:
        found = await privacy.export(s, c.tenant_id, c.path["contact_id"])
    if found is None:
        raise not_found("contact")
    return JSONResponse(
        ContactExport.model_validate(found).model_dump(mode="json"),
        headers={
            "Content-Disposition": f'attachment; filename="contact-{c.path["contact_id"]}.json"'
        },
    )


@api.op(
    "POST",
    "/v1/contacts/{contact_id:int}/erase",
    summary="Erase a contact: its personal data goes, its address stays suppressed",
    scope="manage",
    response=Erased,
    errors=(404,),
)
async def erase_contact(c: Call) -> Any:
    """In one transaction (docs/privacy.md): the contact is deleted; its address is
    replaced by its tombstone in send records, message recipients, events and
    unsubscribe requests, which lose responses, IP addresses and user agents too; its
    tracking hits lose IP, user agent and URL; its suppression (or a new one, reason
    ``manual``) becomes the tombstone's. Cannot be undone."""
    ctx = c.ctx
    cid = c.path["contact_id"]
    async with ctx.sessions() as s:
        email = await s.scalar(
            Contact.__table__.select()
            .with_only_columns(Contact.email)
            .where(Contact.tenant_id == c.tenant_id, Contact.id == cid)
        )
    if email is None:
        raise not_found("contact")
    await ctx.tenant_keys.signer(c.tenant_id)  # the tenant's keys, its tombstone key too
    tomb = ctx.tenant_keys.tombstone(c.tenant_id, email)
    if tomb is None:  # signer() made the keys: never so
        raise RuntimeError(f"tenant {c.tenant_id}: no tombstone key")
    async with ctx.sessions() as s:
        rows = await privacy.erase(s, c.tenant_id, cid, tomb)
        if rows is None:
            raise not_found("contact")
        await s.commit()
    await ctx.suppressions.refresh([(c.tenant_id, email), (c.tenant_id, tomb)])
    ctx.wake()
    return Erased(erased=True, tombstone=tomb, rows=rows)
