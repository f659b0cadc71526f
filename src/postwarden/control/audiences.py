"""/v1/audiences: saved rules over a tenant's contacts (docs/audiences.md), their
previews (a count and a sample) and snapshots (exactly who matched at a moment)."""

import datetime as dt
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from postwarden.audiences import Plan, RuleError
from postwarden.audiences.syntax import MAX_LENGTH
from postwarden.control.api import api, one_or_404, page, page_of
from postwarden.control.errors import ApiError, invalid
from postwarden.control.routing import Call
from postwarden.control.schemas import Deleted, Page, Strict, decode_cursor, encode_cursor, one_line
from postwarden.store.audience_models import Audience, AudienceSnapshot, SnapshotMember
from postwarden.store.audiences import CountTooSlow, count, plan_for, sample, take_snapshot
from postwarden.store.contact_models import Contact
from postwarden.store.models import utcnow

AudienceName = Annotated[
    str, StringConstraints(min_length=1, max_length=200), AfterValidator(one_line)
]
Rule = Annotated[
    str,
    StringConstraints(min_length=1, max_length=MAX_LENGTH),
    Field(description='the rule (docs/audiences.md), e.g. attributes.plan == "pro"'),
]
SAMPLE = 10


class AudienceCreate(Strict):
    name: AudienceName
    rule: Rule


class AudienceUpdate(Strict):
    name: AudienceName | None = None
    rule: Rule | None = None


class RuleIn(Strict):
    rule: Rule


class AudienceOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    name: str
    rule: str
    created_at: dt.datetime
    updated_at: dt.datetime


class AudienceList(BaseModel):
    data: list[AudienceOut]
    next_cursor: str | None


class ContactBrief(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    email: str
    name: str
    status: str
    attributes: dict[str, Any]


class Preview(BaseModel):
    count: int = Field(description="how many contacts the rule selects now")
    sample: list[ContactBrief] = Field(description=f"the first {SAMPLE} of them, by id")


class SnapshotOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    audience_id: int
    rule: str = Field(description="the audience's rule when the snapshot was taken")
    count: int
    taken_at: dt.datetime


class SnapshotMemberOut(BaseModel):
    contact_id: int
    email: str | None = Field(description="the contact's address now; null: deleted since")


class SnapshotMemberList(BaseModel):
    data: list[SnapshotMemberOut]
    next_cursor: str | None


def rule_error(exc: RuleError) -> ApiError:
    """422 naming ``rule``, with the place: ``line 1, column 9: no list named 'beta'``
    (the field also carries ``line``, ``column`` and ``caret``, the rule's line with a
    ``^`` under the place)."""
    detail: dict[str, Any] = {"path": "rule", "message": str(exc), "line": exc.line,
                              "column": exc.column, "caret": exc.caret()}  # fmt: skip
    return ApiError(422, "validation_error", f"rule: {exc}", fields=[detail])


async def _plan(s: Any, tenant_id: int, rule: str) -> Plan:
    try:
        return await plan_for(s, tenant_id, rule)
    except RuleError as exc:
        raise rule_error(exc) from None


async def _audience(s: Any, c: Call) -> Audience:
    stmt = select(Audience).where(
        Audience.tenant_id == c.tenant_id, Audience.id == c.path["audience_id"]
    )
    row: Audience = await one_or_404(s, stmt, "audience")
    return row


def _conflict(name: str) -> ApiError:
    return ApiError(409, "conflict", f"an audience named {name!r} exists")


def too_slow(exc: CountTooSlow) -> ApiError:
    """422 naming ``rule``: its count passed ``control.count_timeout``."""
    return invalid("rule", f"{exc} (control.count_timeout): narrow the rule")


async def _preview(c: Call, s: Any, plan: Plan) -> Preview:
    found = await sample(s, c.tenant_id, plan, SAMPLE)
    try:
        n = await count(s, c.tenant_id, plan, c.ctx.cfg.control.count_timeout)
    except CountTooSlow as exc:
        raise too_slow(exc) from None
    return Preview(
        count=n,
        sample=[ContactBrief.model_validate(x) for x in found],
    )


@api.op(
    "POST",
    "/v1/audiences",
    summary="Create an audience (a rule over the tenant's contacts)",
    scope="manage",
    body=AudienceCreate,
    response=AudienceOut,
    status=201,
    errors=(409,),
    sync=False,
)
async def create_audience(c: Call) -> Any:
    """The rule is checked against the tenant's lists, topics and attribute types now:
    an error is a 422 naming ``rule`` with its line and column."""
    b: AudienceCreate = c.body
    async with c.ctx.sessions() as s:
        await _plan(s, c.tenant_id, b.rule)
        row = Audience(tenant_id=c.tenant_id, name=b.name, rule=b.rule)
        s.add(row)
        try:
            await s.commit()
        except IntegrityError:
            raise _conflict(b.name) from None
        return AudienceOut.model_validate(row)


@api.op(
    "GET",
    "/v1/audiences",
    summary="List audiences",
    scope="read",
    query=Page,
    response=AudienceList,
)
async def list_audiences(c: Call) -> Any:
    q: Page = c.query
    async with c.ctx.sessions() as s:
        stmt = select(Audience).where(Audience.tenant_id == c.tenant_id)
        rows = await page(s, stmt, Audience, q.cursor, q.limit)
    return AudienceList(
        data=[AudienceOut.model_validate(r) for r in rows], next_cursor=page_of(rows, q.limit)
    )


@api.op(
    "GET",
    "/v1/audiences/{audience_id:int}",
    summary="Show an audience",
    scope="read",
    response=AudienceOut,
    errors=(404,),
)
async def get_audience(c: Call) -> Any:
    async with c.ctx.sessions() as s:
        return AudienceOut.model_validate(await _audience(s, c))


@api.op(
    "PATCH",
    "/v1/audiences/{audience_id:int}",
    summary="Rename an audience or change its rule",
    scope="manage",
    body=AudienceUpdate,
    response=AudienceOut,
    errors=(404, 409),
    sync=False,
)
async def update_audience(c: Call) -> Any:
    """Snapshots taken before keep the rule they were taken with."""
    b: AudienceUpdate = c.body
    async with c.ctx.sessions() as s:
        row = await _audience(s, c)
        if b.rule is not None:
            await _plan(s, c.tenant_id, b.rule)
            row.rule = b.rule
        if b.name is not None:
            row.name = b.name
        row.updated_at = utcnow()
        try:
            await s.commit()
        except IntegrityError:
            raise _conflict(b.name or "") from None
        return AudienceOut.model_validate(row)


@api.op(
    "DELETE",
    "/v1/audiences/{audience_id:int}",
    summary="Delete an audience and its snapshots",
    scope="manage",
    response=Deleted,
    errors=(404,),
    sync=False,
)
async def delete_audience(c: Call) -> Any:
    async with c.ctx.sessions() as s:
        await s.delete(await _audience(s, c))
        await s.commit()
    return Deleted(deleted=True)


@api.op(
    "GET",
    "/v1/audiences/{audience_id:int}/preview",
    summary="Count an audience's contacts now, with a sample",
    scope="read",
    response=Preview,
    errors=(404, 422),
)
async def preview_audience(c: Call) -> Any:
    """Only ``active`` contacts count unless the rule names ``status``. A rule that
    names a list or topic deleted since is a 422 (``rule``, with the place)."""
    async with c.ctx.sessions() as s:
        row = await _audience(s, c)
        return await _preview(c, s, await _plan(s, c.tenant_id, row.rule))


@api.op(
    "POST",
    "/v1/audiences/preview",
    summary="Count the contacts of a rule not saved, with a sample",
    scope="read",
    body=RuleIn,
    response=Preview,
    errors=(422,),
    sync=False,
)
async def preview_rule(c: Call) -> Any:
    b: RuleIn = c.body
    async with c.ctx.sessions() as s:
        return await _preview(c, s, await _plan(s, c.tenant_id, b.rule))


@api.op(
    "POST",
    "/v1/audiences/{audience_id:int}/snapshots",
    summary="Record exactly who is in an audience now",
    scope="manage",
    response=SnapshotOut,
    status=201,
    errors=(404, 422),
    sync=False,
)
async def create_snapshot(c: Call) -> Any:
    """The members are written by the database in one statement (``INSERT …
    SELECT``): a consistent view of the contacts at ``taken_at``."""
    async with c.ctx.sessions() as s:
        row = await _audience(s, c)
        plan = await _plan(s, c.tenant_id, row.rule)
        snap = await take_snapshot(s, c.tenant_id, row.id, row.rule, plan)
        await s.commit()
        return SnapshotOut.model_validate(snap)


async def _snapshot(s: Any, c: Call) -> AudienceSnapshot:
    stmt = select(AudienceSnapshot).where(
        AudienceSnapshot.tenant_id == c.tenant_id,
        AudienceSnapshot.audience_id == c.path["audience_id"],
        AudienceSnapshot.id == c.path["snapshot_id"],
    )
    row: AudienceSnapshot = await one_or_404(s, stmt, "snapshot")
    return row


@api.op(
    "GET",
    "/v1/audiences/{audience_id:int}/snapshots/{snapshot_id:int}",
    summary="Show a snapshot",
    scope="read",
    response=SnapshotOut,
    errors=(404,),
)
async def get_snapshot(c: Call) -> Any:
    async with c.ctx.sessions() as s:
        return SnapshotOut.model_validate(await _snapshot(s, c))


@api.op(
    "GET",
    "/v1/audiences/{audience_id:int}/snapshots/{snapshot_id:int}/members",
    summary="A snapshot's contacts, by contact id",
    scope="read",
    query=Page,
    response=SnapshotMemberList,
    errors=(404,),
)
async def snapshot_members(c: Call) -> Any:
    q: Page = c.query
    after = decode_cursor(q.cursor)
    async with c.ctx.sessions() as s:
        snap = await _snapshot(s, c)
        stmt = (
            select(SnapshotMember.contact_id, Contact.email)
            .outerjoin(Contact, Contact.id == SnapshotMember.contact_id)
            .where(SnapshotMember.snapshot_id == snap.id, SnapshotMember.contact_id > after)
            .order_by(SnapshotMember.contact_id)
            .limit(q.limit)
        )
        rows = (await s.execute(stmt)).all()
    data = [SnapshotMemberOut(contact_id=cid, email=email) for cid, email in rows]
    more = encode_cursor(rows[-1][0]) if len(rows) == q.limit else None
    return SnapshotMemberList(data=data, next_cursor=more)
