"""/v1/contacts: a tenant's contacts (upsert by email, one by one and in batches of up
to 1 000), their declared attribute types (/v1/contact-attributes) and their consent
records. The database work is in ``store.contacts``; a contact's status and the
tenant's suppressions are kept in step there."""

import datetime as dt
import functools
import ipaddress
import re
import zoneinfo
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
)
from sqlalchemy import select

from postwarden.contacts.attributes import NAME_RE, check_attributes
from postwarden.control.api import api, one_or_404, page, page_of
from postwarden.control.errors import ApiError, from_validation, not_found
from postwarden.control.routing import Call
from postwarden.control.schemas import Address, Deleted, Page, Strict, Timestamp, one_line
from postwarden.store import contacts as store
from postwarden.store.contact_models import AttributeDef, Consent, Contact
from postwarden.store.memberships import choices_of, lists_of

#: Most contacts in one batch request.
MAX_BATCH = 1000

Status = Literal["active", "unsubscribed", "bounced", "complained"]
AttributeType = Literal["string", "number", "boolean", "date", "list"]


@functools.cache
def _zones() -> frozenset[str]:
    return frozenset(zoneinfo.available_timezones())


def _timezone(value: str) -> str:
    if value and value not in _zones():
        raise ValueError(f"{value!r} is not an IANA time zone name (e.g. Europe/Paris)")
    return value


# A BCP 47 tag's shape: language, then script, region and variants (no extensions).
_LOCALE = re.compile(
    r"^[A-Za-z]{2,3}(-[A-Za-z]{4})?(-(?:[A-Za-z]{2}|[0-9]{3}))?(-(?:[A-Za-z0-9]{5,8}|[0-9][A-Za-z0-9]{3}))*$"
)


def _locale(value: str) -> str:
    if value and not _LOCALE.match(value):
        raise ValueError(f"{value!r} is not a BCP 47 language tag (e.g. fr, pt-BR, zh-Hant-TW)")
    return value


def _ip(value: str) -> str:
    try:
        # No zone index (fe80::1%eth0): it means nothing off its host.
        return str(ipaddress.ip_address(value if "%" not in value else "-"))
    except ValueError:
        raise ValueError(f"{value!r} is not an IPv4 or IPv6 address") from None


ContactName = Annotated[str, StringConstraints(max_length=200), AfterValidator(one_line)]
TimeZone = Annotated[
    str,
    StringConstraints(max_length=64),
    AfterValidator(_timezone),
    Field(description="an IANA time zone name; empty or null: none"),
]
Frequency = Annotated[
    Literal["weekly", "monthly"],
    Field(description="at most one campaign message a week or a month; null: every campaign"),
]
Locale = Annotated[
    str,
    StringConstraints(max_length=35),
    AfterValidator(_locale),
    Field(description="a BCP 47 language tag; empty or null: none"),
]
_ATTRIBUTES = (
    "values by attribute name, of the tenant's declared types (/v1/contact-attributes);"
    " null removes one"
)


class ContactCreate(Strict):
    email: Address
    name: ContactName | None = None
    status: Status | None = Field(
        None,
        description="unsubscribed, bounced or complained adds the address's suppression;"
        " active does not lift one here (PATCH does)",
    )
    attributes: dict[str, Any] | None = Field(None, description=_ATTRIBUTES + " (merged)")
    timezone: TimeZone | None = None
    locale: Locale | None = None


class ContactUpdate(Strict):
    name: ContactName | None = None
    status: Status | None = Field(
        None,
        description="unsubscribed, bounced or complained adds the address's suppression;"
        " active removes one of those reasons",
    )
    attributes: dict[str, Any] | None = Field(None, description=_ATTRIBUTES + " (merged)")
    timezone: TimeZone | None = None
    locale: Locale | None = None
    frequency: Frequency | None = None


class ContactOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    email: str
    name: str
    status: Status
    attributes: dict[str, Any]
    timezone: str | None
    locale: str | None
    frequency: str | None = Field(
        description="weekly or monthly (the preference center's choice); null: every campaign"
    )
    created_at: dt.datetime
    updated_at: dt.datetime


class TopicChoiceOut(BaseModel):
    topic_id: int
    opted_in: bool
    chosen_at: dt.datetime | None = Field(
        description="when the contact chose; null: no choice, the topic's default_opt_in"
    )


class ContactDetail(ContactOut):
    lists: list[int] = Field(description="ids of the lists the contact is in")
    topics: list[TopicChoiceOut] = Field(description="the contact's standing on every topic")


class ContactList(BaseModel):
    data: list[ContactOut]
    next_cursor: str | None


class ContactQuery(Page):
    email: Annotated[str, StringConstraints(min_length=1, max_length=320)] | None = Field(
        None, description="the contact of this address (any spelling of it)"
    )
    status: Status | None = None


class ContactBatch(Strict):
    contacts: list[Any] = Field(
        min_length=1, max_length=MAX_BATCH, description="contacts as POST /v1/contacts takes"
    )


class ItemError(BaseModel):
    message: str
    fields: list[dict[str, str]]


class BatchItem(BaseModel):
    index: int
    id: int | None
    created: bool | None
    error: ItemError | None


class BatchResult(BaseModel):
    created: int
    updated: int
    failed: int
    results: list[BatchItem]


def contact_out(row: Contact) -> ContactOut:
    return ContactOut.model_validate(row)


async def checked_attributes(
    s: Any, tenant_id: int, values: dict[str, Any] | None, prefix: str = ""
) -> dict[str, Any] | None:
    """The attributes converted to the tenant's declared types, or 422 naming each
    bad one (``attributes.<name>``)."""
    if values is None:
        return None
    converted, errors = check_attributes(values, await store.attribute_types(s, tenant_id))
    if errors:
        raise attribute_error(errors, prefix)
    return converted


def attribute_error(errors: dict[str, str], prefix: str = "") -> ApiError:
    """A 422 naming each bad attribute (``attributes.<name>``, after ``prefix``)."""
    fields = [
        {"path": f"{prefix}attributes" + (f".{k}" if k else ""), "message": m}
        for k, m in errors.items()
    ]
    first = fields[0]
    return ApiError(422, "validation_error", f"{first['path']}: {first['message']}", fields=fields)


def _contact_in(b: ContactCreate, attributes: dict[str, Any] | None) -> store.ContactIn:
    return store.ContactIn(b.email, b.name, attributes, b.timezone, b.locale, b.status)


async def _contact(s: Any, c: Call) -> Contact:
    stmt = select(Contact).where(
        Contact.tenant_id == c.tenant_id, Contact.id == c.path["contact_id"]
    )
    row: Contact = await one_or_404(s, stmt, "contact")
    return row


@api.op(
    "POST",
    "/v1/contacts",
    summary="Create or update a contact (upsert by email)",
    scope="manage",
    body=ContactCreate,
    response=ContactOut,
    status=201,
    also=(200,),
)
async def upsert_contact(c: Call) -> Any:
    """201 when the contact was created, 200 when one of that address existed (the
    fields given are set and the attributes merged). The email is stored as the
    suppression check compares addresses (lower case, Unicode domain)."""
    b: ContactCreate = c.body
    async with c.ctx.sessions() as s:
        attrs = await checked_attributes(s, c.tenant_id, b.attributes)
        (done,) = await store.save_contacts(s, c.tenant_id, [_contact_in(b, attrs)])
        await s.commit()
        row = await store.contact_of(s, c.tenant_id, done.id)
        assert row is not None
    return (201 if done.created else 200), contact_out(row)


@api.op(
    "POST",
    "/v1/contacts/batch",
    summary="Create or update up to 1000 contacts",
    scope="manage",
    body=ContactBatch,
    response=BatchResult,
    body_limit=16 * 1024 * 1024,
)
async def batch_contacts(c: Call) -> Any:
    """Each item as ``POST /v1/contacts`` takes; one result per item, in order. A bad
    item is reported with its field path (``contacts[3].attributes.seats``) and
    written not at all; the good ones are written together."""
    items = c.body.contacts
    results: list[BatchItem | None] = [None] * len(items)
    good: list[tuple[int, store.ContactIn]] = []
    async with c.ctx.sessions() as s:
        types = await store.attribute_types(s, c.tenant_id)
        for i, raw in enumerate(items):
            try:
                b = ContactCreate.model_validate(raw)
                attrs = None
                if b.attributes is not None:
                    attrs, errors = check_attributes(b.attributes, types)
                    if errors:
                        raise attribute_error(errors, f"contacts[{i}].")
            except (ValidationError, ApiError) as exc:
                err = (
                    from_validation(exc, ("contacts", i))
                    if isinstance(exc, ValidationError)
                    else exc
                )
                error = ItemError(message=err.message, fields=err.fields)
                results[i] = BatchItem(index=i, id=None, created=None, error=error)
                continue
            good.append((i, _contact_in(b, attrs)))
        done = await store.save_contacts(s, c.tenant_id, [item for _, item in good])
        await s.commit()
    for (i, _), d in zip(good, done, strict=True):
        results[i] = BatchItem(index=i, id=d.id, created=d.created, error=None)
    out = [r for r in results if r is not None]
    created = sum(1 for r in out if r.created)
    failed = sum(1 for r in out if r.error is not None)
    return BatchResult(
        created=created, updated=len(out) - created - failed, failed=failed, results=out
    )


@api.op(
    "GET",
    "/v1/contacts",
    summary="List contacts, or find one by email",
    scope="read",
    query=ContactQuery,
    response=ContactList,
)
async def list_contacts(c: Call) -> Any:
    q: ContactQuery = c.query
    stmt = select(Contact).where(Contact.tenant_id == c.tenant_id)
    if q.email is not None:
        stmt = stmt.where(Contact.email == store.normalize_email(q.email))
    if q.status is not None:
        stmt = stmt.where(Contact.status == q.status)
    async with c.ctx.sessions() as s:
        rows = await page(s, stmt, Contact, q.cursor, q.limit)
    return ContactList(data=[contact_out(r) for r in rows], next_cursor=page_of(rows, q.limit))


@api.op(
    "GET",
    "/v1/contacts/{contact_id:int}",
    summary="Show a contact with its lists and topic choices",
    scope="read",
    response=ContactDetail,
    errors=(404,),
)
async def get_contact(c: Call) -> Any:
    async with c.ctx.sessions() as s:
        row = await _contact(s, c)
        lists = await lists_of(s, c.tenant_id, row.id)
        choices = await choices_of(s, c.tenant_id, row.id)
    return ContactDetail(
        **contact_out(row).model_dump(),
        lists=lists,
        topics=[
            TopicChoiceOut(topic_id=x.topic_id, opted_in=x.opted_in, chosen_at=x.chosen_at)
            for x in choices
        ],
    )


@api.op(
    "PATCH",
    "/v1/contacts/{contact_id:int}",
    summary="Change a contact",
    scope="manage",
    body=ContactUpdate,
    response=ContactOut,
    errors=(404,),
)
async def update_contact(c: Call) -> Any:
    """The fields given change (attributes are merged; null removes one; null or ""
    clears the time zone or locale; null the frequency); the email cannot change. A
    status moves the suppressions with it: ``active`` lifts an unsubscribe, bounce or
    complaint."""
    b: ContactUpdate = c.body
    given = b.model_fields_set
    async with c.ctx.sessions() as s:
        attrs = await checked_attributes(s, c.tenant_id, b.attributes)
        row = await store.update_contact(
            s,
            c.tenant_id,
            c.path["contact_id"],
            name=b.name,
            attributes=attrs,
            timezone=(b.timezone or "") if "timezone" in given else None,
            locale=(b.locale or "") if "locale" in given else None,
            status=b.status,
        )
        if row is None:
            raise not_found("contact")
        if "frequency" in given:
            row.frequency = b.frequency
        await s.commit()
        await s.refresh(row)
    return contact_out(row)


@api.op(
    "DELETE",
    "/v1/contacts/{contact_id:int}",
    summary="Delete a contact",
    scope="manage",
    response=Deleted,
    errors=(404,),
    sync=False,
)
async def delete_contact(c: Call) -> Any:
    """Its list memberships, topic choices and consents go with it; a suppression of
    its address stays."""
    async with c.ctx.sessions() as s:
        if not await store.delete_contact(s, c.tenant_id, c.path["contact_id"]):
            raise not_found("contact")
        await s.commit()
    return Deleted(deleted=True)


# ---------------------------------------------------------------- declared attributes


class AttributeDefIn(Strict):
    name: Annotated[str, StringConstraints(pattern=NAME_RE.pattern)] = Field(
        description="a letter or _ then letters, digits or _ (64 at most)"
    )
    type: AttributeType


class AttributeDefOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    name: str
    type: AttributeType
    created_at: dt.datetime


class AttributeDefList(BaseModel):
    data: list[AttributeDefOut]
    next_cursor: str | None


@api.op(
    "POST",
    "/v1/contact-attributes",
    summary="Declare a contact attribute's type",
    scope="manage",
    body=AttributeDefIn,
    response=AttributeDefOut,
    status=201,
    also=(200,),
    errors=(409,),
    sync=False,
)
async def declare_attribute(c: Call) -> Any:
    """201 when declared, 200 when it was declared already (with this type, or with
    another that every value held fits). Refused (409) while a contact holds a value
    of that name the type does not take: change or remove those values first."""
    b: AttributeDefIn = c.body
    async with c.ctx.sessions() as s:
        got = await store.declare_attribute(s, c.tenant_id, b.name, b.type)
        if isinstance(got, store.Misfit):
            raise ApiError(
                409,
                "conflict",
                f"contact {got.contact_id} holds {got.value!r} as {b.name}, which is not a"
                f" {b.type}: {got.reason}",
            )
        row, how = got
        await s.commit()
    return (201 if how == "created" else 200), AttributeDefOut.model_validate(row)


@api.op(
    "GET",
    "/v1/contact-attributes",
    summary="List the declared contact attributes",
    scope="read",
    query=Page,
    response=AttributeDefList,
)
async def list_attributes(c: Call) -> Any:
    q: Page = c.query
    async with c.ctx.sessions() as s:
        stmt = select(AttributeDef).where(AttributeDef.tenant_id == c.tenant_id)
        rows = await page(s, stmt, AttributeDef, q.cursor, q.limit)
    return AttributeDefList(
        data=[AttributeDefOut.model_validate(r) for r in rows], next_cursor=page_of(rows, q.limit)
    )


@api.op(
    "DELETE",
    "/v1/contact-attributes/{name}",
    summary="Forget an attribute's declared type",
    scope="manage",
    response=Deleted,
    errors=(404,),
    sync=False,
)
async def undeclare_attribute(c: Call) -> Any:
    """The contacts' values stay, as attributes of no declared type."""
    async with c.ctx.sessions() as s:
        if not await store.undeclare_attribute(s, c.tenant_id, c.path["name"]):
            raise not_found("attribute")
        await s.commit()
    return Deleted(deleted=True)


# ---------------------------------------------------------------- consents


class ConsentCreate(Strict):
    source: Annotated[
        str, StringConstraints(min_length=1, max_length=100), AfterValidator(one_line)
    ] = Field(description="where the consent was given: a signup form, an import, ...")
    wording_version: Annotated[str, StringConstraints(max_length=64), AfterValidator(one_line)] = (
        Field("", description="the version of the text the contact agreed to")
    )
    purpose: Annotated[str, StringConstraints(max_length=100), AfterValidator(one_line)] = Field(
        "", description="what it was given for: marketing, a list or topic, ..."
    )
    at: Timestamp | None = Field(None, description="when (ISO 8601 with zone); default now")
    ip: Annotated[str, StringConstraints(max_length=45), AfterValidator(_ip)] | None = None


class ConsentOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    contact_id: int
    source: str
    wording_version: str
    purpose: str
    at: dt.datetime
    ip: str | None
    created_at: dt.datetime


class ConsentList(BaseModel):
    data: list[ConsentOut]
    next_cursor: str | None


@api.op(
    "POST",
    "/v1/contacts/{contact_id:int}/consents",
    summary="Record a contact's consent",
    scope="manage",
    body=ConsentCreate,
    response=ConsentOut,
    status=201,
    errors=(404,),
    sync=False,
)
async def add_consent(c: Call) -> Any:
    """Consent records are only ever added: there is no change or delete (they go with
    the contact)."""
    b: ConsentCreate = c.body
    async with c.ctx.sessions() as s:
        row = await store.add_consent(
            s,
            c.tenant_id,
            c.path["contact_id"],
            source=b.source,
            wording_version=b.wording_version,
            purpose=b.purpose,
            at=b.at,
            ip=b.ip,
        )
        if row is None:
            raise not_found("contact")
        await s.commit()
    return ConsentOut.model_validate(row)


@api.op(
    "GET",
    "/v1/contacts/{contact_id:int}/consents",
    summary="List a contact's consent records",
    scope="read",
    query=Page,
    response=ConsentList,
    errors=(404,),
)
async def list_consents(c: Call) -> Any:
    q: Page = c.query
    async with c.ctx.sessions() as s:
        row = await _contact(s, c)
        stmt = select(Consent).where(Consent.tenant_id == c.tenant_id, Consent.contact_id == row.id)
        rows = await page(s, stmt, Consent, q.cursor, q.limit)
    return ConsentList(
        data=[ConsentOut.model_validate(r) for r in rows], next_cursor=page_of(rows, q.limit)
    )
