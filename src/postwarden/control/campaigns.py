"""/v1/campaigns: a tenant's campaigns, their lifecycle (``campaigns.lifecycle``) and
its history (issue 21; docs/campaigns.md).

Each action is a transition the lifecycle allows in the campaign's state, recorded
with the key and the reason. An edit after validation returns the campaign to draft.
Validation checks what would stop a send (the template's lint, the audience, the From
domain, DMARC, the pool). Approval needs the ``approve`` scope and a key other than
the one that last changed the campaign (unless the tenant allows single-key approval).
"""

import datetime as dt
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints
from sqlalchemy import func, select

from postwarden.audiences import RuleError
from postwarden.campaigns.lifecycle import (
    DRAFT,
    Transition,
    TransitionError,
    approval_refused,
    transition,
)
from postwarden.campaigns.windows import WindowError, parse_window
from postwarden.content.lint import counts
from postwarden.control.api import api, one_or_404, page, page_of
from postwarden.control.errors import ApiError, invalid
from postwarden.control.pool_cache import PoolNotAllowed
from postwarden.control.routing import Call
from postwarden.control.schemas import MAX_ID, Address, Page, Strict, TrackingMode, one_line
from postwarden.control.templates import lint_findings
from postwarden.control.unsubscribe import list_unsubscribe_problem
from postwarden.mail.addresses import suppression_key
from postwarden.store.audience_models import Audience
from postwarden.store.audiences import CountTooSlow, count, plan_for
from postwarden.store.campaign_models import (
    RECORD_STATES,
    Campaign,
    CampaignTransition,
    SendRecord,
    UnsubscribeRequest,
)
from postwarden.store.campaigns import AB_RUNTIME, record_counts, tracking_counts
from postwarden.store.engagement_models import TrackingHit
from postwarden.store.models import Domain, Tenant, utcnow
from postwarden.store.template_models import Template, TemplateVersion

Name = Annotated[str, StringConstraints(min_length=1, max_length=200), AfterValidator(one_line)]
Tag = Annotated[str, StringConstraints(min_length=1, max_length=64), AfterValidator(one_line)]
Reason = Annotated[str, StringConstraints(max_length=500), AfterValidator(one_line)]
Id = Annotated[int, Field(ge=1, le=MAX_ID)]
WINDOW = (
    'when it may send, in the recipient\'s time zone when known: {"days": ["mon", …],'
    ' "start": "09:00", "end": "17:00", "timezone": "Europe/Berlin"} (docs/campaigns.md)'
)


class FromIn(Strict):
    email: Address
    name: Annotated[str, StringConstraints(max_length=200), AfterValidator(one_line)] = ""


class VariantIn(Strict):
    name: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{1,32}$")]
    weight: float = Field(1.0, gt=0, le=1000, description="its share of the test portion")
    subject: Annotated[str, StringConstraints(min_length=1, max_length=998)] | None = Field(
        None, description="a subject line (Jinja, like the template's) instead of the template's"
    )
    template_id: Id | None = Field(None, description="another template instead of the campaign's")
    from_: FromIn | None = Field(None, alias="from", description="another From")


class AbIn(Strict):
    variants: list[VariantIn] = Field(min_length=2, max_length=5)
    portion: float = Field(
        0.2, gt=0, le=1, description="the share of the audience in the test; the rest gets"
        " the winner"
    )  # fmt: skip
    metric: Literal["clicks", "conversions", "opens"] = Field(
        "conversions",
        description="what decides: conversions (POST /v1/campaigns/{id}/conversions) or"
        " bot-filtered clicks; opens only with allow_opens (Apple Mail Privacy Protection"
        " opens every message)",
    )
    allow_opens: bool = False
    min_sample: int = Field(1000, ge=1, le=10_000_000, description="sends per variant, at least")
    winner_by: Literal["auto", "approval"] = Field(
        "auto",
        description="auto: the remainder gets the winner as soon as the test is decided;"
        " approval: POST /v1/campaigns/{id}/ab/winner",
    )
    wait_hours: float = Field(
        4.0, ge=0, le=24 * 30, description="how long after the test portion was sent the"
        " test is decided (one look: peeking as results come in finds false winners)"
    )  # fmt: skip


class CampaignCreate(Strict):
    name: Name
    audience_id: Id
    template_id: Id
    from_: FromIn = Field(alias="from")
    reply_to: Address | None = None
    pool: Annotated[str, StringConstraints(min_length=1, max_length=64)] | None = None
    tags: list[Tag] = Field(default_factory=list, max_length=20)
    metadata: dict[str, str] = Field(default_factory=dict, max_length=20)
    send_window: dict[str, Any] | None = Field(default=None, description=WINDOW)
    ab: AbIn | None = Field(default=None, description="an A/B test (docs/campaigns.md)")
    tracking: TrackingMode | None = Field(
        default=None, description="open and click tracking; null: the tenant's setting"
    )


class CampaignUpdate(Strict):
    name: Name | None = None
    audience_id: Id | None = None
    template_id: Id | None = None
    from_: FromIn | None = Field(default=None, alias="from")
    reply_to: Address | None = None
    pool: Annotated[str, StringConstraints(min_length=1, max_length=64)] | None = None
    tags: list[Tag] | None = Field(default=None, max_length=20)
    metadata: dict[str, str] | None = Field(default=None, max_length=20)
    send_window: dict[str, Any] | None = Field(default=None, description=WINDOW)
    ab: AbIn | None = Field(default=None, description="an A/B test; null: none")
    tracking: TrackingMode | None = Field(
        default=None, description="open and click tracking; null: the tenant's setting"
    )


class ActionIn(Strict):
    reason: Reason = ""


class ScheduleIn(Strict):
    at: dt.datetime | None = Field(default=None, description="when; omitted: now")
    reason: Reason = ""


class FromOut(BaseModel):
    email: str
    name: str


class CampaignOut(BaseModel):
    model_config = ConfigDict(serialize_by_alias=True)  # "from", as requests send it

    id: int
    name: str
    state: str
    audience_id: int
    template_id: int
    template_version: int | None = Field(description="the version validation fixed")
    from_: FromOut = Field(serialization_alias="from")
    reply_to: str | None
    pool: str | None
    send_window: dict[str, Any] | None
    ab: dict[str, Any] | None = Field(
        description="the A/B test: its settings, the variants' template versions once"
        " validated, and its winner and verdict once decided"
    )
    tags: list[str]
    metadata: dict[str, Any]
    tracking: str | None = Field(description="off, anonymous or per_recipient; null: the tenant's")
    scheduled_at: dt.datetime | None
    created_at: dt.datetime
    updated_at: dt.datetime


class CampaignList(BaseModel):
    data: list[CampaignOut]
    next_cursor: str | None


class TransitionOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    action: str
    before: str
    after: str
    key_prefix: str | None = Field(description="the key that asked; null: the runner")
    reason: str
    at: dt.datetime


class History(BaseModel):
    data: list[TransitionOut]
    next_cursor: str | None


class Stats(BaseModel):
    campaign_id: int
    state: str
    recipients: int = Field(description="send records: one per contact of the snapshot")
    suppressed: int = Field(description="not sent: suppressed, unsubscribed, or not active")
    pending: int = Field(description="written at launch, not yet handed to the spool")
    waiting: int = Field(
        description="pending, outside the send window in the recipient's time zone"
    )
    queued: int = Field(description="in the spool, not yet delivered or failed")
    delivered: int
    deferred: int = Field(description="in the spool after a temporary failure")
    bounced: int = Field(description="failed for good (a bounce, or expired in the queue)")
    complained: int
    unsubscribed: int
    cancelled: int = Field(description="not sent: the campaign was cancelled first")
    failed: int = Field(description="not sent: the message could not be made (render error)")
    opened: int = Field(
        0, description="recipients who opened, judged a person (per_recipient tracking)"
    )
    clicked: int = Field(
        0, description="recipients who clicked, judged a person (per_recipient tracking)"
    )
    opens: int = Field(0, description="opens judged a person's (pixel fetches)")
    clicks: int = Field(0, description="clicks judged a person's")
    machine_opens: int = Field(
        0, description="pixel fetches judged a machine's: a proxy, a scanner (GET …/hits)"
    )
    machine_clicks: int = Field(0, description="clicks judged a machine's: scanners, prefetch")


class Problem(BaseModel):
    code: str
    field: str
    message: str


def _out(row: Campaign) -> CampaignOut:
    return CampaignOut(
        id=row.id, name=row.name, state=row.state, audience_id=row.audience_id,
        template_id=row.template_id, template_version=row.template_version,
        from_=FromOut(email=row.from_email, name=row.from_name), reply_to=row.reply_to,
        pool=row.pool, send_window=row.send_window, ab=row.ab, tags=list(row.tags or []),
        metadata=dict(row.meta or {}), tracking=row.tracking,
        scheduled_at=row.scheduled_at, created_at=row.created_at, updated_at=row.updated_at,
    )  # fmt: skip


def _key(c: Call) -> str | None:
    return c.principal.prefix if c.principal is not None else None


async def campaign_of(s: Any, c: Call, *, lock: bool = False) -> Campaign:
    stmt = select(Campaign).where(
        Campaign.tenant_id == c.tenant_id, Campaign.id == c.path["campaign_id"]
    )
    row: Campaign = await one_or_404(s, stmt.with_for_update() if lock else stmt, "campaign")
    return row


async def _check_refs(s: Any, c: Call, audience_id: int | None, template_id: int | None) -> None:
    """The audience and template named are the tenant's (422 naming the field)."""
    for field, model, wanted in (
        ("audience_id", Audience, audience_id),
        ("template_id", Template, template_id),
    ):
        if wanted is None:
            continue
        found = await s.scalar(
            select(model.id).where(model.tenant_id == c.tenant_id, model.id == wanted)
        )
        if found is None:
            raise invalid(field, f"no {field.removesuffix('_id')} {wanted}")


async def _check_ab_refs(s: Any, c: Call, ab: dict[str, Any] | None) -> None:
    """The variants' templates are the tenant's (422 naming the field)."""
    for i, v in enumerate((ab or {}).get("variants", [])):
        if "template_id" in v:
            found = await s.scalar(
                select(Template.id).where(
                    Template.tenant_id == c.tenant_id, Template.id == v["template_id"]
                )
            )
            if found is None:
                raise invalid(f"ab.variants[{i}].template_id", f"no template {v['template_id']}")


def _ab(ab: AbIn | None) -> dict[str, Any] | None:
    """The A/B test as stored, or 422 naming the field."""
    if ab is None:
        return None
    names = [v.name for v in ab.variants]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise invalid(f"ab.variants[{i}].name", f"another variant is named {name!r}")
    if ab.metric == "opens" and not ab.allow_opens:
        raise invalid("ab.metric", "opens are not a winning metric (Apple Mail Privacy"
                      " Protection opens every message): use conversions or clicks, or set"
                      " allow_opens")  # fmt: skip
    variants = []
    for v in ab.variants:
        out: dict[str, Any] = {"name": v.name, "weight": v.weight}
        if v.subject is not None:
            out["subject"] = v.subject
        if v.template_id is not None:
            out["template_id"] = v.template_id
        if v.from_ is not None:
            out["from_email"] = suppression_key(v.from_.email)
            out["from_name"] = v.from_.name
        variants.append(out)
    return {
        "variants": variants, "portion": ab.portion, "metric": ab.metric,
        "allow_opens": ab.allow_opens, "min_sample": ab.min_sample,
        "winner_by": ab.winner_by, "wait_hours": ab.wait_hours,
    }  # fmt: skip


def _window(data: dict[str, Any] | None) -> dict[str, Any] | None:
    """The send window as stored (normalized), or 422 naming the field."""
    if data is None:
        return None
    try:
        return dict(parse_window(data).to_json())
    except WindowError as exc:
        raise invalid(exc.path, exc.reason) from None


def _check_pool(c: Call, pool: str | None) -> None:
    try:
        c.ctx.pool_cache.pool_for(c.tenant_id, pool)
    except PoolNotAllowed as exc:
        raise invalid("pool", str(exc)) from None


def _record(s: Any, c: Call, row: Campaign, action: str, after: str, why: str) -> None:
    """``row`` moved to ``after`` by ``action``, and the step in its history."""
    step = CampaignTransition(
        tenant_id=row.tenant_id, campaign_id=row.id, action=action, before=row.state,
        after=after, key_prefix=_key(c), reason=why,
    )  # fmt: skip
    s.add(step)
    row.state = after
    row.updated_at = utcnow()


async def _add_draft(s: Any, c: Call, row: Campaign, why: str = "") -> CampaignOut:
    """A new campaign stored, with ``create`` as the first step of its history."""
    s.add(row)
    await s.flush()
    s.add(CampaignTransition(tenant_id=c.tenant_id, campaign_id=row.id, action="create",
                             before="", after=DRAFT, key_prefix=_key(c), reason=why))  # fmt: skip
    await s.commit()
    return _out(row)


def _allowed(action: str, row: Campaign) -> Transition:
    """Where ``action`` takes the campaign; 409 naming the states where it is allowed."""
    try:
        return transition(action, row.state, launched=row.launched_at is not None)
    except TransitionError as exc:
        raise ApiError(409, "conflict", str(exc)) from None


@api.op(
    "POST",
    "/v1/campaigns",
    summary="Create a campaign (a draft)",
    scope="manage",
    body=CampaignCreate,
    response=CampaignOut,
    status=201,
    errors=(422,),
    sync=False,
)
async def create_campaign(c: Call) -> Any:
    """The audience and template must be the tenant's, the pool one it may use."""
    b: CampaignCreate = c.body
    _check_pool(c, b.pool)
    window = _window(b.send_window)
    ab = _ab(b.ab)
    async with c.ctx.sessions() as s:
        await _check_refs(s, c, b.audience_id, b.template_id)
        await _check_ab_refs(s, c, ab)
        row = Campaign(
            tenant_id=c.tenant_id, name=b.name, state=DRAFT, audience_id=b.audience_id,
            template_id=b.template_id, from_email=suppression_key(b.from_.email),
            from_name=b.from_.name, reply_to=b.reply_to, pool=b.pool, tags=b.tags,
            meta=b.metadata, send_window=window, last_editor=_key(c), ab=ab,
            tracking=b.tracking,
        )  # fmt: skip
        return await _add_draft(s, c, row)


@api.op(
    "GET",
    "/v1/campaigns",
    summary="List campaigns",
    scope="read",
    query=Page,
    response=CampaignList,
)
async def list_campaigns(c: Call) -> Any:
    q: Page = c.query
    async with c.ctx.sessions() as s:
        stmt = select(Campaign).where(Campaign.tenant_id == c.tenant_id)
        rows = await page(s, stmt, Campaign, q.cursor, q.limit)
    return CampaignList(data=[_out(r) for r in rows], next_cursor=page_of(rows, q.limit))


@api.op(
    "GET",
    "/v1/campaigns/{campaign_id:int}",
    summary="Show a campaign and its state",
    scope="read",
    response=CampaignOut,
    errors=(404,),
)
async def get_campaign(c: Call) -> Any:
    async with c.ctx.sessions() as s:
        return _out(await campaign_of(s, c))


@api.op(
    "PATCH",
    "/v1/campaigns/{campaign_id:int}",
    summary="Change a campaign (back to draft if it was validated or later)",
    scope="manage",
    body=CampaignUpdate,
    response=CampaignOut,
    errors=(404, 409, 422),
    sync=False,
)
async def update_campaign(c: Call) -> Any:
    """Only a campaign that is not sending, paused, sent or cancelled changes (409);
    what was validated or approved is no longer what would be sent, so it is a draft
    again."""
    b: CampaignUpdate = c.body
    if b.pool is not None:
        _check_pool(c, b.pool)
    window = _window(b.send_window)
    ab = _ab(b.ab)
    async with c.ctx.sessions() as s:
        row = await campaign_of(s, c, lock=True)
        moved = _allowed("edit", row)
        await _check_refs(s, c, b.audience_id, b.template_id)
        await _check_ab_refs(s, c, ab)
        if "ab" in b.model_fields_set:
            row.ab = ab
        for name in ("name", "audience_id", "template_id", "reply_to", "pool", "tags"):
            value = getattr(b, name)
            if value is not None:
                setattr(row, name, value)
        if b.metadata is not None:
            row.meta = b.metadata
        if "tracking" in b.model_fields_set:
            row.tracking = b.tracking
        if window is not None:
            row.send_window = window
        if b.from_ is not None:
            row.from_email, row.from_name = suppression_key(b.from_.email), b.from_.name
        if moved.after != row.state:
            _record(s, c, row, "edit", moved.after, "changed after validation")
            row.template_version = None
        row.last_editor = _key(c)
        row.updated_at = utcnow()
        await s.commit()
        return _out(row)


@api.op(
    "GET",
    "/v1/campaigns/{campaign_id:int}/history",
    summary="A campaign's changes of state: the action, who and why",
    scope="read",
    query=Page,
    response=History,
    errors=(404,),
)
async def campaign_history(c: Call) -> Any:
    q: Page = c.query
    async with c.ctx.sessions() as s:
        row = await campaign_of(s, c)
        stmt = select(CampaignTransition).where(CampaignTransition.campaign_id == row.id)
        rows = await page(s, stmt, CampaignTransition, q.cursor, q.limit)
    return History(
        data=[TransitionOut.model_validate(r) for r in rows], next_cursor=page_of(rows, q.limit)
    )


RecordState = Literal[
    "pending", "waiting", "suppressed", "queued", "delivered", "deferred", "bounced", "complained",
    "cancelled", "failed",
]  # fmt: skip


class RecordQuery(Page):
    state: RecordState | None = Field(None, description="only records in this state")


class RecordOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    contact_id: int
    email: str
    state: str = Field(description=", ".join(RECORD_STATES))
    reason: str = Field(description="why it was not sent, or the bounce's category")
    variant: str | None
    message_id: str | None = Field(description="its message (GET /v1/messages/{id})")
    sent_at: dt.datetime | None
    updated_at: dt.datetime


class RecordList(BaseModel):
    data: list[RecordOut]
    next_cursor: str | None


@api.op(
    "GET",
    "/v1/campaigns/{campaign_id:int}/records",
    summary="A campaign's send records: one per contact of its snapshot",
    scope="read",
    query=RecordQuery,
    response=RecordList,
    errors=(404,),
)
async def campaign_records(c: Call) -> Any:
    """What became of each recipient, in record order, filtered by ``state``."""
    q: RecordQuery = c.query
    async with c.ctx.sessions() as s:
        row = await campaign_of(s, c)
        stmt = select(SendRecord).where(SendRecord.campaign_id == row.id)
        if q.state is not None:
            stmt = stmt.where(SendRecord.state == q.state)
        rows = await page(s, stmt, SendRecord, q.cursor, q.limit)
    return RecordList(
        data=[RecordOut.model_validate(r) for r in rows], next_cursor=page_of(rows, q.limit)
    )


class HitQuery(Page):
    kind: Literal["open", "click"] | None = Field(None, description="only opens or clicks")
    machine: bool | None = Field(None, description="only hits judged a machine's (or not)")


class HitOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    kind: str = Field(description="open or click")
    contact_id: int | None = Field(description="null: an anonymous link")
    message_id: str | None
    link_index: int | None = Field(
        description="a click: which link (0, 1… in the message); an open: how many links"
        " the message had"
    )
    url: str | None = Field(description="a click's destination")
    at: dt.datetime
    method: str
    ip: str | None = Field(description="truncated (a /24 or /48) when the tenant asks")
    user_agent: str
    machine: bool | None = Field(description="null until judged (tracking.settle)")
    reason: str = Field(description="the verdict rule that decided (person: none matched)")


class HitList(BaseModel):
    data: list[HitOut]
    next_cursor: str | None


@api.op(
    "GET",
    "/v1/campaigns/{campaign_id:int}/hits",
    summary="A campaign's tracking hits with their verdicts (people versus machines)",
    scope="read",
    query=HitQuery,
    response=HitList,
    errors=(404,),
)
async def campaign_hits(c: Call) -> Any:
    """Every pixel fetch and click of the campaign's links, machine ones included (for
    forensics: they never count as human), in id order."""
    q: HitQuery = c.query
    async with c.ctx.sessions() as s:
        row = await campaign_of(s, c)
        stmt = select(TrackingHit).where(
            TrackingHit.tenant_id == c.tenant_id, TrackingHit.campaign_id == row.id
        )
        if q.kind is not None:
            stmt = stmt.where(TrackingHit.kind == q.kind)
        if q.machine is not None:
            stmt = stmt.where(TrackingHit.machine == q.machine)
        rows = await page(s, stmt, TrackingHit, q.cursor, q.limit)
    return HitList(
        data=[HitOut.model_validate(r) for r in rows], next_cursor=page_of(rows, q.limit)
    )


@api.op(
    "GET",
    "/v1/campaigns/{campaign_id:int}/stats",
    summary="A campaign's recipients by what became of them",
    scope="read",
    response=Stats,
    errors=(404,),
)
async def campaign_stats(c: Call) -> Any:
    """Counts of the campaign's send records by state (all 0 before launch)."""
    async with c.ctx.sessions() as s:
        row = await campaign_of(s, c)
        n = await record_counts(s, row.id)
        seen = await tracking_counts(s, row.id)
        # One-click unsubscribes from its messages (the List-Unsubscribe placeholder).
        unsubscribed = await s.scalar(
            select(func.count(func.distinct(UnsubscribeRequest.contact_id))).where(
                UnsubscribeRequest.campaign_id == row.id, UnsubscribeRequest.method == "POST"
            )
        )
    return Stats(
        campaign_id=row.id, state=row.state, recipients=sum(n.values()),
        suppressed=n.get("suppressed", 0), pending=n.get("pending", 0),
        queued=n.get("queued", 0), delivered=n.get("delivered", 0),
        deferred=n.get("deferred", 0), bounced=n.get("bounced", 0),
        complained=n.get("complained", 0), unsubscribed=int(unsubscribed or 0),
        cancelled=n.get("cancelled", 0), failed=n.get("failed", 0), waiting=n.get("waiting", 0),
        **seen,
    )  # fmt: skip


# --------------------------------------------------------------- validation


async def problems(s: Any, c: Call, row: Campaign) -> tuple[list[Problem], int | None]:
    """What stops this campaign from sending, and the template version it would
    send."""
    out: list[Problem] = []
    version = None
    t = await s.scalar(
        select(Template).where(Template.tenant_id == c.tenant_id, Template.id == row.template_id)
    )
    v = await s.get(TemplateVersion, t.current_version_id) if t is not None else None
    if t is None or v is None:
        out.append(Problem(code="template_missing", field="template_id",
                           message=f"no template {row.template_id}"))  # fmt: skip
    else:
        version = v.version
        errors = counts(await lint_findings(s, c.tenant_id, t, v))["error"]
        if errors:
            out.append(Problem(code="template_lint", field="template_id",
                               message=f"the template's lint has {errors} error(s):"
                               f" POST /v1/templates/{t.id}/lint"))  # fmt: skip
    audience = await s.scalar(
        select(Audience).where(Audience.tenant_id == c.tenant_id, Audience.id == row.audience_id)
    )
    if audience is None:
        out.append(Problem(code="audience_missing", field="audience_id",
                           message=f"no audience {row.audience_id}"))  # fmt: skip
    else:
        try:
            plan = await plan_for(s, c.tenant_id, audience.rule)
            async with s.begin_nested():  # a count stopped rolls back only itself
                n = await count(s, c.tenant_id, plan, c.ctx.cfg.control.count_timeout)
        except RuleError as exc:
            out.append(Problem(code="audience_rule", field="audience_id", message=str(exc)))
        except CountTooSlow as exc:
            out.append(Problem(code="audience_too_slow", field="audience_id",
                               message=f"{exc} (control.count_timeout)"))  # fmt: skip
        else:
            if n == 0:
                out.append(Problem(code="audience_empty", field="audience_id",
                                   message="the audience has no contacts"))  # fmt: skip
    out += await _from_problems(s, c, row)
    out += (await ab_problems(s, c, row))[0]
    try:
        c.ctx.pool_cache.pool_for(c.tenant_id, row.pool)
    except PoolNotAllowed as exc:
        out.append(Problem(code="pool_not_allowed", field="pool", message=str(exc)))
    return out, version


async def ab_problems(s: Any, c: Call, row: Campaign) -> tuple[list[Problem], Any]:
    """What stops the campaign's A/B test, and its settings with each variant's
    template version fixed (None without a test)."""
    if not row.ab:
        return [], None
    out: list[Problem] = []
    ab = {**row.ab, "variants": [dict(v) for v in row.ab["variants"]]}
    if ab["metric"] == "clicks":
        tenant = await s.get(Tenant, c.tenant_id)
        settings = (tenant.settings if tenant is not None else None) or {}
        mode = row.tracking or settings.get("tracking") or "anonymous"
        if mode != "per_recipient":
            out.append(Problem(code="ab_metric_unavailable", field="ab.metric",
                               message=f"clicks are counted per recipient only with"
                               f" per_recipient tracking (it is {mode}): set the campaign's"
                               " tracking, or decide on conversions"))  # fmt: skip
    for i, v in enumerate(ab["variants"]):
        where = f"ab.variants[{i}]"
        if "template_id" in v:
            t = await s.scalar(select(Template).where(Template.tenant_id == c.tenant_id,
                                                      Template.id == v["template_id"]))  # fmt: skip
            tv = await s.get(TemplateVersion, t.current_version_id) if t is not None else None
            if t is None or tv is None:
                out.append(Problem(code="template_missing", field=f"{where}.template_id",
                                   message=f"no template {v['template_id']}"))  # fmt: skip
                continue
            v["template_version"] = tv.version
            errors = counts(await lint_findings(s, c.tenant_id, t, tv))["error"]
            if errors:
                out.append(Problem(code="template_lint", field=f"{where}.template_id",
                                   message=f"the template's lint has {errors} error(s):"
                                   f" POST /v1/templates/{t.id}/lint"))  # fmt: skip
        if "from_email" in v:
            other = Campaign(tenant_id=row.tenant_id, from_email=v["from_email"])
            for p in await _from_problems(s, c, other):
                out.append(Problem(code=p.code, field=f"{where}.from.email", message=p.message))
    return out, ab


async def _from_problems(s: Any, c: Call, row: Campaign) -> list[Problem]:
    domain = row.from_email.rpartition("@")[2]
    d = await s.scalar(
        select(Domain).where(Domain.tenant_id == c.tenant_id, func.lower(Domain.name) == domain)
    )
    if d is None or d.verified_at is None:
        return [Problem(code="from_domain_unverified", field="from.email",
                        message=f"{domain} is not a verified sending domain of the tenant"
                        " (DKIM keys published): POST /v1/domains/{id}/verify")]  # fmt: skip
    records = (d.last_check or {}).get("records", [])
    if not any(r.get("purpose") == "dmarc" and r.get("status") == "ok" for r in records):
        return [Problem(code="dmarc_missing", field="from.email",
                        message=f"no DMARC record found for {domain} at its last check"
                        " (bulk senders must publish one)")]  # fmt: skip
    # List-Unsubscribe and List-Unsubscribe-Post present and inside the DKIM signature.
    found = await list_unsubscribe_problem(c.ctx, c.tenant_id, row.from_email)
    if found is not None:
        return [Problem(code=found["code"], field=found["path"], message=found["message"])]
    return []


class ValidationOut(BaseModel):
    campaign: CampaignOut
    problems: list[Problem]


#: What an action does to the campaign's messages already in the spool.
SPOOL_ACTIONS = {"pause": "hold", "resume": "release", "cancel": "delete"}


async def _act(c: Call, action: str, why: str, **extra: Any) -> Campaign:
    async with c.ctx.sessions() as s:
        row = await campaign_of(s, c, lock=True)
        moved = _allowed(action, row)
        if action == "approve":
            tenant = await s.get(Tenant, c.tenant_id)
            single = bool(((tenant.settings if tenant else None) or {}).get("single_key_approval"))
            refused = approval_refused(_key(c) or "", row.last_editor, single_key_allowed=single)
            if refused:
                raise ApiError(403, "forbidden", refused)
        for name, value in extra.items():
            setattr(row, name, value)
        _record(s, c, row, action, moved.after, why)
        await s.commit()
    runner = getattr(c.ctx, "campaigns", None)
    if runner is not None:  # the runner acts on it now, not at its next look
        runner.wake()
        if action in SPOOL_ACTIONS and row.launched_at is not None:
            # What was already handed on: held, released or taken out of the spool.
            await runner.spool_action(row.id, SPOOL_ACTIONS[action])
    return row


@api.op(
    "POST",
    "/v1/campaigns/{campaign_id:int}/validate",
    summary="Check that a campaign could send; fix the template version",
    scope="manage",
    body=ActionIn,
    response=ValidationOut,
    errors=(404, 409),
    sync=False,
)
async def validate_campaign(c: Call) -> Any:
    """A draft with no problems becomes ``validated``, its template's current version
    fixed; with problems it stays a draft and the answer lists them (code, field,
    message), still 200."""
    b: ActionIn = c.body
    async with c.ctx.sessions() as s:
        row = await campaign_of(s, c, lock=True)
        moved = _allowed("validate", row)
        found, version = await problems(s, c, row)
        if not found:
            row.template_version = version
            if row.ab:
                row.ab = (await ab_problems(s, c, row))[1]
            _record(s, c, row, "validate", moved.after, b.reason)
            await s.commit()
        return ValidationOut(campaign=_out(row), problems=found)


@api.op(
    "POST",
    "/v1/campaigns/{campaign_id:int}/schedule",
    summary="Schedule an approved campaign at a time, or now",
    scope="manage",
    body=ScheduleIn,
    response=CampaignOut,
    errors=(404, 409, 422),
    sync=False,
)
async def schedule_campaign(c: Call) -> Any:
    """``{"at": "2026-12-24T09:00:00Z"}`` (a time with its zone) or ``{}`` for now."""
    b: ScheduleIn = c.body
    at = b.at
    if at is not None and at.tzinfo is None:
        raise invalid("at", "give a time with its zone")
    when = at.astimezone(dt.UTC) if at is not None else utcnow()
    return _out(await _act(c, "schedule", b.reason, scheduled_at=when))


def _simple(
    action: str, summary: str, scope: str = "manage", errors: tuple[int, ...] = (404, 409)
) -> None:
    """An action whose body is only a reason: ``POST /v1/campaigns/{id}/<action>``."""

    async def handler(c: Call) -> Any:
        b: ActionIn = c.body
        return _out(await _act(c, action, b.reason))

    handler.__name__ = f"{action}_campaign"
    api.op(
        "POST",
        f"/v1/campaigns/{{campaign_id:int}}/{action}",
        summary=summary,
        scope=scope,
        body=ActionIn,
        response=CampaignOut,
        errors=errors,
        sync=False,
    )(handler)


_simple(
    "approve",
    "Approve a validated campaign (another key than its last editor's)",
    scope="approve",
    errors=(403, 404, 409),
)
_simple("pause", "Pause a scheduled or sending campaign")
_simple("resume", "Resume a paused campaign")
_simple("cancel", "Cancel a campaign that has not finished")


@api.op(
    "POST",
    "/v1/campaigns/{campaign_id:int}/clone",
    summary="A new draft with this campaign's settings",
    scope="manage",
    body=ActionIn,
    response=CampaignOut,
    status=201,
    errors=(404,),
    sync=False,
)
async def clone_campaign(c: Call) -> Any:
    async with c.ctx.sessions() as s:
        src = await campaign_of(s, c)
        row = Campaign(
            tenant_id=c.tenant_id, name=f"{src.name} (copy)"[:200], state=DRAFT,
            audience_id=src.audience_id, template_id=src.template_id,
            from_email=src.from_email, from_name=src.from_name, reply_to=src.reply_to,
            pool=src.pool, send_window=src.send_window, tags=list(src.tags or []),
            meta=dict(src.meta or {}), last_editor=_key(c), tracking=src.tracking,
            ab={k: v for k, v in src.ab.items() if k not in AB_RUNTIME} if src.ab else None,
        )  # fmt: skip
        return await _add_draft(s, c, row, f"clone of campaign {src.id}")
