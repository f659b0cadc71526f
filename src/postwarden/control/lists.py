"""/v1/lists: a tenant's static lists of contacts and their members (added and
removed by contact id or email, up to 1 000 at once). The membership queries are in
``store.memberships``."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    Field,
    StringConstraints,
    model_validator,
)
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from postwarden.control.api import api, one_or_404, page, page_of
from postwarden.control.errors import ApiError, not_found
from postwarden.control.routing import Call
from postwarden.control.schemas import (
    MAX_ID,
    Deleted,
    Page,
    Strict,
    decode_cursor,
    encode_cursor,
    one_line,
)
from postwarden.store import memberships
from postwarden.store.contact_models import ContactList, ListMember
from postwarden.store.models import utcnow

#: Most contacts added or removed in one request.
MAX_MEMBERS = 1000

ObjectName = Annotated[
    str,
    StringConstraints(min_length=1, max_length=200, strip_whitespace=True),
    AfterValidator(one_line),
]
Description = Annotated[str, StringConstraints(max_length=10_000)]


async def save_named(s: Any, row: Any, what: str) -> None:
    """Write and commit a new or changed list or topic (a name unique per tenant): 409
    when the name is taken."""
    now = utcnow()
    row.created_at = row.created_at or now
    row.updated_at = now
    name = row.name
    s.add(row)
    try:
        await s.flush()
    except IntegrityError:
        raise ApiError(409, "conflict", f"a {what} named {name!r} exists") from None
    await s.commit()


def patch(row: Any, body: BaseModel) -> None:
    """Set the fields given (not null) in ``body`` on ``row``."""
    for name, value in body.model_dump(exclude_none=True).items():
        setattr(row, name, value)


class ListCreate(Strict):
    name: ObjectName = Field(description="unique among the tenant's lists")
    description: Description = ""


class ListUpdate(Strict):
    name: ObjectName | None = None
    description: Description | None = None


class ListOut(BaseModel):
    id: int
    name: str
    description: str
    members: int = Field(description="how many contacts are in the list")
    created_at: dt.datetime
    updated_at: dt.datetime


class ListPage(BaseModel):
    data: list[ListOut]
    next_cursor: str | None


class MembersIn(Strict):
    contact_ids: list[Annotated[int, Field(ge=1, le=MAX_ID)]] | None = Field(
        None, min_length=1, max_length=MAX_MEMBERS
    )
    emails: list[Annotated[str, StringConstraints(max_length=320)]] | None = Field(
        None, min_length=1, max_length=MAX_MEMBERS
    )

    @model_validator(mode="after")
    def _one_of(self) -> MembersIn:
        if (self.contact_ids is None) == (self.emails is None):
            raise ValueError("give contact_ids or emails (one of them)")
        return self


class MemberResult(BaseModel):
    index: int
    contact_id: int | None
    changed: bool = Field(description="added (POST) or removed (DELETE); false: already so")
    error: str | None = None


class MembersResult(BaseModel):
    changed: int = Field(description="how many were added (POST) or removed (DELETE)")
    failed: int
    results: list[MemberResult]


class MemberOut(BaseModel):
    contact_id: int
    email: str
    added_at: dt.datetime


class MemberPage(BaseModel):
    data: list[MemberOut]
    next_cursor: str | None


async def _counts(s: Any, tenant_id: int, ids: list[int]) -> dict[int, int]:
    if not ids:
        return {}
    rows = await s.execute(
        select(ListMember.list_id, func.count())
        .where(ListMember.tenant_id == tenant_id, ListMember.list_id.in_(ids))
        .group_by(ListMember.list_id)
    )
    return {lid: n for lid, n in rows.all()}


def list_out(row: ContactList, members: int) -> ListOut:
    return ListOut(
        id=row.id,
        name=row.name,
        description=row.description,
        members=members,
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


async def _list(s: Any, c: Call) -> ContactList:
    stmt = select(ContactList).where(
        ContactList.tenant_id == c.tenant_id, ContactList.id == c.path["list_id"]
    )
    row: ContactList = await one_or_404(s, stmt, "list")
    return row


async def _one_out(s: Any, c: Call, row: ContactList) -> ListOut:
    return list_out(row, (await _counts(s, c.tenant_id, [row.id])).get(row.id, 0))


@api.op(
    "POST",
    "/v1/lists",
    summary="Create a list",
    scope="manage",
    body=ListCreate,
    response=ListOut,
    status=201,
    errors=(409,),
    sync=False,
)
async def create_list(c: Call) -> Any:
    b: ListCreate = c.body
    row = ContactList(tenant_id=c.tenant_id, **b.model_dump())
    async with c.ctx.sessions() as s:
        await save_named(s, row, "list")
    return list_out(row, 0)


@api.op("GET", "/v1/lists", summary="List lists", scope="read", query=Page, response=ListPage)
async def list_lists(c: Call) -> Any:
    q: Page = c.query
    async with c.ctx.sessions() as s:
        stmt = select(ContactList).where(ContactList.tenant_id == c.tenant_id)
        rows = await page(s, stmt, ContactList, q.cursor, q.limit)
        counts = await _counts(s, c.tenant_id, [r.id for r in rows])
    return ListPage(
        data=[list_out(r, counts.get(r.id, 0)) for r in rows], next_cursor=page_of(rows, q.limit)
    )


@api.op(
    "GET",
    "/v1/lists/{list_id:int}",
    summary="Show a list",
    scope="read",
    response=ListOut,
    errors=(404,),
)
async def get_list(c: Call) -> Any:
    async with c.ctx.sessions() as s:
        return await _one_out(s, c, await _list(s, c))


@api.op(
    "PATCH",
    "/v1/lists/{list_id:int}",
    summary="Rename a list or change its description",
    scope="manage",
    body=ListUpdate,
    response=ListOut,
    errors=(404, 409),
    sync=False,
)
async def update_list(c: Call) -> Any:
    b: ListUpdate = c.body
    async with c.ctx.sessions() as s:
        row = await _list(s, c)
        patch(row, b)
        await save_named(s, row, "list")
        return await _one_out(s, c, row)


@api.op(
    "DELETE",
    "/v1/lists/{list_id:int}",
    summary="Delete a list (its contacts stay)",
    scope="manage",
    response=Deleted,
    errors=(404,),
    sync=False,
)
async def delete_list(c: Call) -> Any:
    async with c.ctx.sessions() as s:
        await s.delete(await _list(s, c))
        await s.commit()
    return Deleted(deleted=True)


# ---------------------------------------------------------------- members


@api.op(
    "GET",
    "/v1/lists/{list_id:int}/members",
    summary="List a list's members",
    scope="read",
    query=Page,
    response=MemberPage,
    errors=(404,),
)
async def list_members(c: Call) -> Any:
    """In contact id order."""
    q: Page = c.query
    async with c.ctx.sessions() as s:
        row = await _list(s, c)
        got = await memberships.members_page(
            s, c.tenant_id, row.id, decode_cursor(q.cursor), q.limit
        )
    return MemberPage(
        data=[MemberOut(contact_id=m.contact_id, email=m.email, added_at=m.added_at) for m in got],
        next_cursor=encode_cursor(got[-1].contact_id) if len(got) == q.limit else None,
    )


async def _change_members(c: Call, add: bool) -> MembersResult:
    b: MembersIn = c.body
    given: list[int | str] = list(b.contact_ids if b.contact_ids is not None else b.emails or [])
    async with c.ctx.sessions() as s:
        row = await _list(s, c)
        if b.contact_ids is not None:
            known = await memberships.contact_ids(s, c.tenant_id, ids=b.contact_ids)
        else:
            known = await memberships.contact_ids(s, c.tenant_id, emails=b.emails or [])
        ids = [known[k] for k in given if k in known]
        change = memberships.add_members if add else memberships.remove_members
        done = await change(s, c.tenant_id, row.id, ids)
        row.updated_at = utcnow()
        await s.commit()
    results = []
    seen: set[int] = set()
    for i, k in enumerate(given):
        cid = known.get(k)
        if cid is None:
            what = (
                "no contact with this id"
                if b.contact_ids is not None
                else "no contact with this email"
            )
            results.append(MemberResult(index=i, contact_id=None, changed=False, error=what))
            continue
        # An id given twice changed once: the first time.
        results.append(
            MemberResult(index=i, contact_id=cid, changed=cid in done and cid not in seen)
        )
        seen.add(cid)
    return MembersResult(
        changed=len(done), failed=sum(1 for r in results if r.error), results=results
    )


@api.op(
    "POST",
    "/v1/lists/{list_id:int}/members",
    summary="Add contacts to a list (by id or email)",
    scope="manage",
    body=MembersIn,
    response=MembersResult,
    errors=(404,),
    sync=False,
)
async def add_members(c: Call) -> Any:
    """``{"contact_ids": [...]}`` or ``{"emails": [...]}``, up to 1000; one result per
    item, in order: contacts the tenant does not have are reported, the others added."""
    return await _change_members(c, add=True)


@api.op(
    "DELETE",
    "/v1/lists/{list_id:int}/members",
    summary="Remove contacts from a list (by id or email)",
    scope="manage",
    body=MembersIn,
    response=MembersResult,
    errors=(404,),
    sync=False,
)
async def remove_members(c: Call) -> Any:
    """The body of the POST; the contacts stay, only their membership goes."""
    return await _change_members(c, add=False)


@api.op(
    "DELETE",
    "/v1/lists/{list_id:int}/members/{contact_id:int}",
    summary="Remove one contact from a list",
    scope="manage",
    response=Deleted,
    errors=(404,),
    sync=False,
)
async def remove_member(c: Call) -> Any:
    """404 when the contact is not a member."""
    async with c.ctx.sessions() as s:
        row = await _list(s, c)
        done = await memberships.remove_members(s, c.tenant_id, row.id, [c.path["contact_id"]])
        if not done:
            raise not_found("member")
        await s.commit()
    return Deleted(deleted=True)
