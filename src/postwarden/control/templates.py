"""/v1/templates: a tenant's templates and their immutable versions; lint, preview
and test sends.

Content (subject, preheader, HTML, text, declared variables) lives in versions: a
create writes version 1 and every PATCH that changes content writes the next one.
Templates render in the sandbox of ``content.render``, in a worker thread (a render
stops itself at its deadline: the thread is never left running); lint findings come
from ``content.lint``. A test send goes the way every message goes (``messages.prepare``
and ``spool``: cleanup, the sending-domain check, DKIM, the suppression check, the
spool), marked ``X-Postwarden-Test: 1`` and tagged ``test-send``.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    model_validator,
)
from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError

from postwarden.content.design import DesignError, compile_design, design_json, parse_design
from postwarden.content.lint import Finding, counts, lint
from postwarden.content.render import Parts, Rendered, RenderError, render_message
from postwarden.content.variables import BUILTINS, CONTRACT, VARIABLE_NAME, send_context
from postwarden.control.api import api, one_or_404, page, page_of
from postwarden.control.errors import ApiError, invalid, not_found
from postwarden.control.messages import (
    MailboxIn,
    MessageAccepted,
    MessageCreate,
    prepare,
    remember_message,
    spool,
)
from postwarden.control.routing import Call
from postwarden.control.schemas import MAX_ID, Address, Deleted, Page, one_line
from postwarden.store.contact_models import Contact
from postwarden.store.contacts import attribute_types
from postwarden.store.models import Tenant, utcnow
from postwarden.store.template_models import Template, TemplateVersion

#: The largest HTML or text part of a template, in characters.
MAX_PART = 512 * 1024
#: A template's body may carry both parts and their JSON escaping.
TEMPLATE_BODY_LIMIT = 4 * MAX_PART + 256 * 1024
#: The most recipients of one test send.
MAX_TEST_RECIPIENTS = 10
#: The header that marks a test send.
TEST_HEADER = ("X-Postwarden-Test", "1")
TEST_TAG = "test-send"

Category = Literal["transactional", "marketing", "other"]
Source = Annotated[str, StringConstraints(max_length=MAX_PART)]


OneLine = Annotated[str, AfterValidator(one_line)]
Subject = Annotated[OneLine, StringConstraints(max_length=998)]
Preheader = Annotated[OneLine, StringConstraints(max_length=500)]
TemplateName = Annotated[OneLine, StringConstraints(min_length=1, max_length=200)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class VariableIn(Strict):
    name: Annotated[str, StringConstraints(pattern=VARIABLE_NAME.pattern)]
    description: Annotated[str, StringConstraints(max_length=500)] = ""
    sample: Any = Field(None, description="the value previews use when no data gives one")

    @model_validator(mode="after")
    def _not_reserved(self) -> VariableIn:
        if self.name in CONTRACT or self.name in BUILTINS:
            raise ValueError(f"{self.name!r} is provided by every send or by the sandbox")
        return self


def _check_variables(variables: list[VariableIn] | None) -> None:
    names = [v.name for v in variables or ()]
    if len(set(names)) != len(names):
        raise ValueError("each variable is declared once")


class TemplateCreate(Strict):
    name: TemplateName
    category: Category = "transactional"
    subject: Subject = ""
    preheader: Preheader = ""
    html: Source | None = None
    text: Source | None = Field(None, description="null: made from the HTML at each send")
    variables: list[VariableIn] = Field(default_factory=list, max_length=100)
    design: dict[str, Any] | None = Field(
        None, description="a visual builder design (docs/design-json.md): the HTML is compiled"
        " from it"
    )  # fmt: skip

    @model_validator(mode="after")
    def _complete(self) -> TemplateCreate:
        if self.design is not None and self.html is not None:
            raise ValueError("give html or design, not both")
        if self.html is None and self.text is None and self.design is None:
            raise ValueError("give html, text, design, or html or design with text")
        _check_variables(self.variables)
        return self


class TemplateUpdate(Strict):
    name: TemplateName | None = None
    category: Category | None = None
    subject: Subject | None = None
    preheader: Preheader | None = None
    html: Source | None = None
    text: Source | None = None
    variables: list[VariableIn] | None = Field(None, max_length=100)
    design: dict[str, Any] | None = Field(
        None, description="a new design (the HTML is compiled from it); null: keep the HTML,"
        " drop the design"
    )  # fmt: skip

    @model_validator(mode="after")
    def _unique(self) -> TemplateUpdate:
        if self.design is not None and self.html is not None:
            raise ValueError("give html or design, not both")
        _check_variables(self.variables)
        return self


class TemplateQuery(Page):
    category: Category | None = None


class VariableOut(BaseModel):
    name: str
    description: str
    sample: Any = None


class VersionOut(BaseModel):
    id: int
    version: int
    subject: str
    preheader: str
    html: str | None
    text: str | None
    variables: list[VariableOut]
    design: dict[str, Any] | None
    created_at: dt.datetime
    created_by: str | None


class VersionSummary(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    version: int
    subject: str
    created_at: dt.datetime
    created_by: str | None


class VersionList(BaseModel):
    data: list[VersionSummary]
    next_cursor: str | None


class TemplateOut(BaseModel):
    id: int
    name: str
    category: str
    created_at: dt.datetime
    updated_at: dt.datetime
    version: int = Field(description="the current version's number")
    version_id: int
    subject: str
    preheader: str
    html: str | None
    text: str | None
    variables: list[VariableOut]
    design: dict[str, Any] | None


class TemplateSummary(BaseModel):
    id: int
    name: str
    category: str
    version: int
    subject: str
    created_at: dt.datetime
    updated_at: dt.datetime


class TemplateList(BaseModel):
    data: list[TemplateSummary]
    next_cursor: str | None


class LocationOut(BaseModel):
    part: str
    line: int | None
    column: int | None


class FindingOut(BaseModel):
    code: str
    severity: Literal["error", "warning", "info"]
    message: str
    location: LocationOut


class LintOut(BaseModel):
    template_id: int
    version: int
    errors: int
    warnings: int
    infos: int
    findings: list[FindingOut]


class RenderIn(Strict):
    contact_id: int | None = Field(None, ge=1, le=MAX_ID, description="render for this contact")
    data: dict[str, Any] = Field(
        default_factory=dict,
        description="variables on top of the contact's and the samples"
        " (a contact object is merged into the contact)",
    )
    version: int | None = Field(None, ge=1, le=2**31 - 1, description="default: the current one")


class PreviewOut(BaseModel):
    template_id: int
    version: int
    subject: str
    preheader: str
    html: str | None
    text: str | None
    text_generated: bool
    findings: list[FindingOut]


class TestSendIn(RenderIn):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    to: list[Address] = Field(min_length=1, max_length=MAX_TEST_RECIPIENTS)
    from_: MailboxIn = Field(alias="from")


class TestSendOut(BaseModel):
    template_id: int
    version: int
    messages: list[MessageAccepted]


# --------------------------------------------------------------- rendering helpers


def finding_out(f: Finding) -> FindingOut:
    return FindingOut.model_validate(f.as_dict())


def parts_of(v: TemplateVersion) -> Parts:
    return Parts(subject=v.subject, preheader=v.preheader, html=v.html, text=v.text)


def template_error(exc: RenderError) -> ApiError:
    message = exc.where() + (f" ({exc.limit} limit)" if exc.limit else "")
    path = exc.part or "template"
    return ApiError(
        422,
        "template_error",
        f"{path}: {message}",
        fields=[{"path": path, "message": f"{exc.code}: {message}"}],
    )


def _compile(raw: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """A design's HTML and its canonical form to store; 422 naming the design's field."""
    try:
        design = parse_design(raw)
        return compile_design(design).html, json.loads(design_json(design))
    except DesignError as exc:
        fields = exc.under("design")
        message = f"{fields[0]['path']}: {fields[0]['message']}"
        raise ApiError(422, "validation_error", message, fields=fields) from None


async def compile_design_of(raw: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    return await asyncio.to_thread(_compile, raw)


async def _render(parts: Parts, context: dict[str, Any]) -> Rendered:
    try:
        return await asyncio.to_thread(render_message, parts, context)
    except RenderError as exc:
        raise template_error(exc) from None


# --------------------------------------------------------------- database helpers


def _mine(template_id: int, tenant_id: int) -> Any:
    return select(Template).where(Template.id == template_id, Template.tenant_id == tenant_id)


async def _template(s: Any, c: Call, *, lock: bool = False) -> Template:
    stmt = _mine(c.path["template_id"], c.tenant_id)
    row: Template = await one_or_404(s, stmt.with_for_update() if lock else stmt, "template")
    return row


async def _version(s: Any, t: Template, number: int | None = None) -> TemplateVersion:
    if number is None:
        v = await s.get(TemplateVersion, t.current_version_id)
    else:
        stmt = select(TemplateVersion).where(
            TemplateVersion.template_id == t.id, TemplateVersion.version == number
        )
        v = (await s.execute(stmt)).scalar_one_or_none()
    if v is None:
        raise not_found("template version")
    return v


def _variables(variables: list[VariableIn]) -> list[dict[str, Any]]:
    return [v.model_dump() for v in variables]


def _content(v: TemplateVersion) -> dict[str, Any]:
    """A version's content, as both answers show it."""
    return {
        "subject": v.subject,
        "preheader": v.preheader,
        "html": v.html,
        "text": v.text,
        "variables": [VariableOut.model_validate(x) for x in v.variables or []],
        "design": v.design,
    }


def template_out(t: Template, v: TemplateVersion) -> TemplateOut:
    return TemplateOut(
        id=t.id,
        name=t.name,
        category=t.category,
        created_at=t.created_at,
        updated_at=t.updated_at,
        version=v.version,
        version_id=v.id,
        **_content(v),
    )


def version_out(v: TemplateVersion) -> VersionOut:
    return VersionOut(
        id=v.id, version=v.version, created_at=v.created_at, created_by=v.created_by, **_content(v)
    )


def _conflict(name: str) -> ApiError:
    return ApiError(409, "conflict", f"a template named {name!r} exists")


def _author(c: Call) -> str | None:
    return c.principal.prefix if c.principal is not None else None


# --------------------------------------------------------------- CRUD


@api.op(
    "POST",
    "/v1/templates",
    summary="Create a template (its version 1)",
    scope="manage",
    body=TemplateCreate,
    response=TemplateOut,
    status=201,
    errors=(409,),
    body_limit=TEMPLATE_BODY_LIMIT,
    sync=False,  # no cache holds templates
)
async def create_template(c: Call) -> Any:
    """``text`` null (or left out): the text part is made from the HTML at each send.
    Templates with syntax errors are kept (lint reports them; previews and sends
    refuse them)."""
    b: TemplateCreate = c.body
    html, design = b.html, None
    if b.design is not None:
        html, design = await compile_design_of(b.design)
    async with c.ctx.sessions() as s:
        t = Template(tenant_id=c.tenant_id, name=b.name, category=b.category)
        s.add(t)
        try:
            await s.flush()
        except IntegrityError:
            raise _conflict(b.name) from None
        v = TemplateVersion(
            template_id=t.id,
            tenant_id=c.tenant_id,
            version=1,
            subject=b.subject,
            preheader=b.preheader,
            html=html,
            text=b.text,
            variables=_variables(b.variables),
            design=design,
            created_by=_author(c),
        )
        s.add(v)
        await s.flush()
        t.current_version_id = v.id
        await s.commit()
        return template_out(t, v)


@api.op(
    "GET",
    "/v1/templates",
    summary="List templates",
    scope="read",
    query=TemplateQuery,
    response=TemplateList,
)
async def list_templates(c: Call) -> Any:
    q: TemplateQuery = c.query
    stmt = select(Template).where(Template.tenant_id == c.tenant_id)
    if q.category is not None:
        stmt = stmt.where(Template.category == q.category)
    async with c.ctx.sessions() as s:
        rows = await page(s, stmt, Template, q.cursor, q.limit)
        ids = [t.current_version_id for t in rows]
        versions = {
            v.id: v
            for v in (
                await s.execute(
                    select(
                        TemplateVersion.id, TemplateVersion.version, TemplateVersion.subject
                    ).where(TemplateVersion.id.in_(ids))
                )
            ).all()
        }
    return TemplateList(
        data=[
            TemplateSummary(
                id=t.id,
                name=t.name,
                category=t.category,
                version=versions[t.current_version_id].version,
                subject=versions[t.current_version_id].subject,
                created_at=t.created_at,
                updated_at=t.updated_at,
            )
            for t in rows
            if t.current_version_id in versions
        ],
        next_cursor=page_of(rows, q.limit),
    )


@api.op(
    "GET",
    "/v1/templates/{template_id:int}",
    summary="Show a template (its current version)",
    scope="read",
    response=TemplateOut,
    errors=(404,),
)
async def get_template(c: Call) -> Any:
    async with c.ctx.sessions() as s:
        t = await _template(s, c)
        return template_out(t, await _version(s, t))


_CONTENT = ("subject", "preheader", "html", "text", "variables", "design")


@api.op(
    "PATCH",
    "/v1/templates/{template_id:int}",
    summary="Change a template: new content is a new version",
    scope="manage",
    body=TemplateUpdate,
    response=TemplateOut,
    errors=(404, 409),
    body_limit=TEMPLATE_BODY_LIMIT,
    sync=False,
)
async def update_template(c: Call) -> Any:
    """Fields left out stay as they are; ``text`` given as null goes back to a text part
    made from the HTML. A change of subject, preheader, html, text or variables writes
    the next version (the versions before stay as they were); a change of name or
    category alone writes none, and neither does content equal to the current."""
    b: TemplateUpdate = c.body
    given = b.model_fields_set
    for name in ("name", "category", "subject", "preheader", "variables"):
        if name in given and getattr(b, name) is None:
            raise invalid(name, "may not be null")
    compiled: tuple[str, dict[str, Any]] | None = None
    if b.design is not None:
        compiled = await compile_design_of(b.design)
    async with c.ctx.sessions() as s:
        t = await _template(s, c, lock=True)
        cur = await _version(s, t)
        content = {
            "subject": cur.subject,
            "preheader": cur.preheader,
            "html": cur.html,
            "text": cur.text,
            "variables": list(cur.variables or []),
            "design": cur.design,
        }
        new = dict(content)
        for name in _CONTENT:
            if name in given:
                value = getattr(b, name)
                new[name] = _variables(value) if name == "variables" else value
        if compiled is not None:
            new["html"], new["design"] = compiled
        elif "html" in given:
            new["design"] = None  # HTML written by hand: no longer the design's
        if new["html"] is None and new["text"] is None:
            raise invalid("html", "a template needs html, text or both")
        if b.name is not None:
            t.name = b.name
        if b.category is not None:
            t.category = b.category
        v = cur
        if new != content:
            v = TemplateVersion(
                template_id=t.id,
                tenant_id=c.tenant_id,
                version=cur.version + 1,
                created_by=_author(c),
                **new,
            )
            s.add(v)
        t.updated_at = utcnow()
        template_id = t.id  # for after a rollback, which expires t
        try:
            await s.flush()
            t.current_version_id = v.id
            await s.commit()
        except IntegrityError:
            await s.rollback()
            if b.name is not None:
                clash = select(Template.id).where(
                    Template.tenant_id == c.tenant_id,
                    Template.name == b.name,
                    Template.id != template_id,
                )
                if (await s.execute(clash)).first() is not None:
                    raise _conflict(b.name) from None
            raise ApiError(
                409, "conflict", "the template was changed at the same time: try again"
            ) from None
        return template_out(t, v)


@api.op(
    "DELETE",
    "/v1/templates/{template_id:int}",
    summary="Delete a template and its versions",
    scope="manage",
    response=Deleted,
    errors=(404,),
    sync=False,
)
async def delete_template(c: Call) -> Any:
    async with c.ctx.sessions() as s:
        t = await _template(s, c)
        await s.execute(delete(TemplateVersion).where(TemplateVersion.template_id == t.id))
        await s.delete(t)
        await s.commit()
    return Deleted(deleted=True)


# --------------------------------------------------------------- versions


@api.op(
    "GET",
    "/v1/templates/{template_id:int}/versions",
    summary="List a template's versions, oldest first",
    scope="read",
    query=Page,
    response=VersionList,
    errors=(404,),
)
async def list_versions(c: Call) -> Any:
    async with c.ctx.sessions() as s:
        t = await _template(s, c)
        stmt = select(TemplateVersion).where(TemplateVersion.template_id == t.id)
        rows = await page(s, stmt, TemplateVersion, c.query.cursor, c.query.limit)
    return VersionList(
        data=[VersionSummary.model_validate(v) for v in rows],
        next_cursor=page_of(rows, c.query.limit),
    )


@api.op(
    "GET",
    "/v1/templates/{template_id:int}/versions/{version:int}",
    summary="Show one version of a template",
    scope="read",
    response=VersionOut,
    errors=(404,),
)
async def get_version(c: Call) -> Any:
    number = c.path["version"]
    async with c.ctx.sessions() as s:
        t = await _template(s, c)
        if number > 2**31 - 1:
            raise not_found("template version")
        return version_out(await _version(s, t, number))


# --------------------------------------------------------------- lint, preview, test send


async def lint_findings(
    s: Any, tenant_id: int, t: Template, v: TemplateVersion, rendered: Rendered | None = None
) -> list[Finding]:
    """The lint of a template's version for its tenant (also run when a campaign is
    validated)."""
    tenant = await s.get(Tenant, tenant_id)
    attributes = await attribute_types(s, tenant_id)
    html_bytes = None
    if rendered is not None and rendered.html is not None:
        html_bytes = len(rendered.html.encode("utf-8", "surrogatepass"))
    return await asyncio.to_thread(
        lint,
        parts_of(v),
        category=t.category,
        variables=[x["name"] for x in v.variables or []],
        attributes=set(attributes),
        postal_address=postal_address_of(tenant),
        rendered_html_bytes=html_bytes,
    )


def postal_address_of(tenant: Tenant | None) -> str:
    return str(((tenant.settings if tenant else None) or {}).get("postal_address") or "")


@api.op(
    "POST",
    "/v1/templates/{template_id:int}/lint",
    summary="Lint a template's current version",
    scope="read",
    response=LintOut,
    errors=(404,),
    sync=False,
)
async def lint_template(c: Call) -> Any:
    """Findings, each with a code, a severity (error, warning, info) and a location
    (part, line, column): docs/api.md lists the codes."""
    async with c.ctx.sessions() as s:
        t = await _template(s, c)
        v = await _version(s, t)
        findings = await lint_findings(s, c.tenant_id, t, v)
    n = counts(findings)
    return LintOut(
        template_id=t.id,
        version=v.version,
        errors=n["error"],
        warnings=n["warning"],
        infos=n["info"],
        findings=[finding_out(f) for f in findings],
    )


async def _context(s: Any, c: Call, body: RenderIn, v: TemplateVersion) -> dict[str, Any]:
    contact = None
    if body.contact_id is not None:
        row = (
            await s.execute(
                select(Contact).where(
                    Contact.id == body.contact_id, Contact.tenant_id == c.tenant_id
                )
            )
        ).scalar_one_or_none()
        if row is None:
            raise invalid("contact_id", "no such contact")
        contact = {"email": row.email, "name": row.name, "attributes": dict(row.attributes or {})}
    tenant = await s.get(Tenant, c.tenant_id)
    samples = {x["name"]: x.get("sample") for x in v.variables or []}
    return send_context(
        contact=contact, postal_address=postal_address_of(tenant), samples=samples, data=body.data
    )


@api.op(
    "POST",
    "/v1/templates/{template_id:int}/preview",
    summary="Render a template for a contact or with sample data",
    scope="read",
    body=RenderIn,
    response=PreviewOut,
    errors=(404,),
    sync=False,
)
async def preview_template(c: Call) -> Any:
    """Variables: the declared variables' samples, the contact's (``contact_id``), the
    account's postal address and placeholder links, then ``data`` on top. A template
    that does not compile or stops at a limit is a ``422 template_error`` naming the
    part, line and limit."""
    body: RenderIn = c.body
    async with c.ctx.sessions() as s:
        t = await _template(s, c)
        v = await _version(s, t, body.version)
        context = await _context(s, c, body, v)
        out = await _render(parts_of(v), context)
        findings = await lint_findings(s, c.tenant_id, t, v, out)
    return PreviewOut(
        template_id=t.id,
        version=v.version,
        subject=out.subject,
        preheader=out.preheader,
        html=out.html,
        text=out.text,
        text_generated=out.text_generated,
        findings=[finding_out(f) for f in findings],
    )


@api.op(
    "POST",
    "/v1/templates/{template_id:int}/test-send",
    summary="Send a template to up to 10 addresses, marked as a test",
    scope="send",
    body=TestSendIn,
    response=TestSendOut,
    status=202,
    errors=(404, 503),
    sync=False,
)
async def test_send(c: Call) -> Any:
    """Rendered as a preview is, then one message per address through the path every
    message takes (the From domain must be a verified sending domain; suppressed
    addresses are dropped), each with ``X-Postwarden-Test: 1``, the tag ``test-send``
    and the template's id and version in its metadata."""
    body: TestSendIn = c.body
    async with c.ctx.sessions() as s:
        t = await _template(s, c)
        v = await _version(s, t, body.version)
        context = await _context(s, c, body, v)
    out = await _render(parts_of(v), context)
    sent = []
    for rcpt in dict.fromkeys(body.to):
        message = MessageCreate.model_validate(
            {
                "from": body.from_.model_dump(),
                "to": [rcpt],
                "subject": out.subject,
                "text": out.text,
                "html": out.html,
                "tags": [TEST_TAG],
                "metadata": {"template_id": str(t.id), "template_version": str(v.version)},
            }
        )
        env, data, msg_id = prepare(c, message, own_headers=[TEST_HEADER])
        accepted = await spool(c, env, data, msg_id)
        await remember_message(c, env, accepted)
        sent.append(accepted)
    return TestSendOut(template_id=t.id, version=v.version, messages=sent)
