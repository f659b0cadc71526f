"""``POST /v1/campaigns/{id}/dry-run``: what a campaign would do if it were launched,
without doing any of it (issue 21; docs/campaigns.md "Dry run").

The answer has validation's problems (reported, never blocking), the contacts the
audience selects now with those a launch would suppress counted by reason (in SQL,
under ``control.count_timeout``), a sample of the messages rendered for the first
sendable contacts with their List-Unsubscribe fields, and when the last message could
go (:func:`postwarden.campaigns.windows.predict_finish`): the pool's sources, each
with its warming plan as the shaping broker has it and the shaping rules' rate, in the
campaign's send window. Nothing is written: the state, the history and the records
stay as they were.
"""

import asyncio
import datetime as dt
import logging
import zoneinfo
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, Field
from sqlalchemy import select

from postwarden.audiences import Plan, RuleError
from postwarden.campaigns.lifecycle import FINAL
from postwarden.campaigns.windows import (
    SendWindow,
    SourceLimit,
    WindowError,
    parse_window,
    predict_finish,
)
from postwarden.content.render import RenderError, render_message
from postwarden.content.variables import PLACEHOLDER_URLS, send_context
from postwarden.control.api import api
from postwarden.control.campaigns import Problem, campaign_of, problems
from postwarden.control.errors import ApiError, invalid
from postwarden.control.pool_cache import PoolNotAllowed
from postwarden.control.preferences import preferences_url
from postwarden.control.routing import Call
from postwarden.control.schemas import Strict
from postwarden.control.templates import parts_of, postal_address_of
from postwarden.control.tenant_keys import LinkKey
from postwarden.control.unsubscribe import recipient_links
from postwarden.shaping.rules import Rules, RulesError, load_rules, shipped_rules
from postwarden.store.audience_models import Audience
from postwarden.store.audiences import CountTooSlow, plan_for
from postwarden.store.campaign_dry_run import SENDABLE, recipient_counts, sendable_sample
from postwarden.store.campaign_models import Campaign
from postwarden.store.contact_models import Contact
from postwarden.store.models import Tenant, utcnow
from postwarden.store.template_models import Template, TemplateVersion
from postwarden.warming.plans import BUILTIN, PlanError, make_plan
from postwarden.warming.plans import Plan as WarmingPlan

log = logging.getLogger("postwarden.control")

#: Contacts the sample renders the campaign's message for.
SAMPLE_SIZE = 3


class DryRunIn(Strict):
    at: dt.datetime | None = Field(
        None,
        description="when it would start (a time with its zone); default: its scheduled"
        " time, else now. A time already past counts as now",
    )


class HeaderOut(BaseModel):
    name: str
    value: str


class SampleMessage(BaseModel):
    contact_id: int
    email: str
    subject: str | None = None
    preheader: str | None = None
    html: str | None = None
    text: str | None = None
    text_generated: bool = False
    headers: list[HeaderOut] = Field(
        description="the List-Unsubscribe fields this recipient's message would carry"
    )
    error: str | None = Field(
        default=None,
        description="why the message could not be made (then the parts are null); a send"
        " would mark the record failed",
    )


class Sample(BaseModel):
    template_id: int
    version: int | None = Field(
        description="the version it would send: its fixed template_version, else the"
        " template's current one; null when there is none"
    )
    messages: list[SampleMessage]


class DayOut(BaseModel):
    date: dt.date
    messages: int


class WarmingOut(BaseModel):
    plan: str
    day: int = Field(description="the plan's day at the start")
    sent_today: int = Field(description="already counted against the start day's cap")
    cap: int | None = Field(description="the start day's cap (null: warm)")


class SourceOut(BaseModel):
    source: str
    messages: int = Field(description="its share of the sendable messages (by pool weight)")
    last: dt.datetime | None = Field(description="its last message (null: none, or too late)")
    paused: str = Field(description="why it sends nothing (empty: it sends)")
    warming: WarmingOut | None
    per_minute: float | None = Field(description="its shaping rate (null: none)")


class PredictionOut(BaseModel):
    pool: str
    start: dt.datetime
    finish: dt.datetime | None = Field(
        description="when the last message could be sent; null: not within two years"
    )
    per_day: list[DayOut] = Field(
        description="messages per local date (the window's zone, else shaping.timezone)"
    )
    per_source: list[SourceOut]
    unsent: int = Field(description="messages the horizon (732 days) left over")
    assumptions: list[str]


class DryRunOut(BaseModel):
    campaign_id: int
    state: str
    problems: list[Problem] = Field(description="as validation finds them; never blocking here")
    recipients: int | None = Field(
        description="contacts the audience selects now, whatever their status (null: not"
        " counted, see problems)"
    )
    suppressed: dict[str, int] | None = Field(
        description="of those, how many a launch would suppress, by reason (the"
        " suppression's reason, else the contact's status)"
    )
    sendable: int | None = Field(description="recipients less the suppressed")
    sample: Sample
    prediction: PredictionOut | None = Field(
        description="null when the recipients were not counted or the pool is not usable"
    )


async def _plan(s: Any, c: Call, row: Campaign) -> Plan | None:
    """The audience's rule bound as it is now; None when it cannot be (validation's
    problems say why)."""
    audience = await s.scalar(
        select(Audience).where(Audience.tenant_id == c.tenant_id, Audience.id == row.audience_id)
    )
    if audience is None:
        return None
    try:
        return await plan_for(s, c.tenant_id, audience.rule)
    except RuleError:
        return None


async def _version(s: Any, c: Call, row: Campaign) -> TemplateVersion | None:
    """The version a send would use: the one validation fixed, else the current one."""
    t = await s.scalar(
        select(Template).where(Template.tenant_id == c.tenant_id, Template.id == row.template_id)
    )
    if t is None:
        return None
    if row.template_version is None:
        current: TemplateVersion | None = await s.get(TemplateVersion, t.current_version_id)
        return current
    fixed: TemplateVersion | None = await s.scalar(
        select(TemplateVersion).where(
            TemplateVersion.template_id == t.id, TemplateVersion.version == row.template_version
        )
    )
    return fixed


def _render_sample(
    c: Call,
    row: Campaign,
    v: TemplateVersion,
    postal: str,
    contacts: list[Contact],
    signer: LinkKey,
) -> list[SampleMessage]:
    """Each contact's message as the runner would render it (its real links)."""
    parts = parts_of(v)
    samples = {x["name"]: x.get("sample") for x in v.variables or []}
    domain = row.from_email.rpartition("@")[2]
    out = []
    for person in contacts:
        urls = dict(PLACEHOLDER_URLS)  # view online: not yet
        urls["preferences_url"] = preferences_url(c.ctx, signer, row.id, person.id)
        urls["unsubscribe_url"], headers = recipient_links(
            c.ctx, row.tenant_id, row.id, person.id, domain, signer
        )
        context = send_context(
            contact={"email": person.email, "name": person.name,
                     "attributes": dict(person.attributes or {})},
            postal_address=postal, samples=samples, urls=urls,
        )  # fmt: skip
        msg = SampleMessage(
            contact_id=person.id,
            email=person.email,
            headers=[HeaderOut(name=n, value=val) for n, val in headers],
        )
        try:
            r = render_message(parts, context)
        except RenderError as exc:
            msg.error = f"{exc.code}: {exc.part or 'template'}: {exc.where()}"
        else:
            msg.subject, msg.preheader, msg.html, msg.text = r.subject, r.preheader, r.html, r.text
            msg.text_generated = r.text_generated
        out.append(msg)
    return out


@api.op(
    "POST",
    "/v1/campaigns/{campaign_id:int}/dry-run",
    summary="What a campaign would send, to whom and until when, without sending",
    scope="read",
    body=DryRunIn,
    response=DryRunOut,
    errors=(404, 409, 422),
    sync=False,
)
async def dry_run_campaign(c: Call) -> Any:
    """Validation's problems (not blocking), the recipients counted with those a launch
    would suppress by reason, the message rendered for the first three sendable
    contacts, and the finish time predicted from the pool's warming caps and shaping
    rate in the send window. Allowed until the campaign is launched; changes nothing."""
    body: DryRunIn = c.body
    if body.at is not None and body.at.tzinfo is None:
        raise invalid("at", "give a time with its zone")
    async with c.ctx.sessions() as s:
        row = await campaign_of(s, c)
        if row.launched_at is not None or row.state in FINAL:
            raise ApiError(
                409,
                "conflict",
                f"a dry run is for a campaign not yet launched; this one is {row.state}"
                f" (what it sent: GET /v1/campaigns/{row.id}/stats)",
            )
        found, _ = await problems(s, c, row)
        tenant = await s.get(Tenant, c.tenant_id)
        plan = await _plan(s, c, row)
        counts = None
        if plan is not None:
            try:
                async with s.begin_nested():  # a count stopped rolls back only itself
                    counts = await recipient_counts(
                        s, c.tenant_id, plan, c.ctx.cfg.control.count_timeout
                    )
            except CountTooSlow as exc:
                if not any(p.code == "audience_too_slow" for p in found):
                    found.append(Problem(code="audience_too_slow", field="audience_id",
                                         message=f"{exc} (control.count_timeout)"))  # fmt: skip
        version = await _version(s, c, row)
        contacts = []
        if plan is not None and counts and counts.get(SENDABLE) and version is not None:
            contacts = await sendable_sample(s, c.tenant_id, plan, SAMPLE_SIZE)
    settings = (tenant.settings if tenant else None) or {}
    messages = []
    if version is not None:
        messages = await asyncio.to_thread(
            _render_sample,
            c,
            row,
            version,
            postal_address_of(tenant),
            contacts,
            await c.ctx.tenant_keys.signer(row.tenant_id),
        )
    sample = Sample(
        template_id=row.template_id,
        version=version.version if version is not None else None,
        messages=messages,
    )
    recipients = sendable = suppressed = prediction = None
    if counts is not None:
        recipients = sum(counts.values())
        sendable = counts.get(SENDABLE, 0)
        suppressed = {why: n for why, n in sorted(counts.items()) if why != SENDABLE}
        now = utcnow()
        start, why = _start(body.at, row.scheduled_at, now)
        prediction = await _predict(c, row, sendable, start, now, [why], settings)
    log.info(
        "event=campaign_dry_run tenant=%s campaign=%s recipients=%s sendable=%s problems=%d",
        c.tenant_id, row.id, recipients, sendable, len(found),
    )  # fmt: skip
    return DryRunOut(
        campaign_id=row.id, state=row.state, problems=found, recipients=recipients,
        suppressed=suppressed, sendable=sendable, sample=sample, prediction=prediction,
    )  # fmt: skip


# ------------------------------------------------------------------ the prediction


@dataclass
class _Source:
    name: str
    weight: int
    paused: str = ""
    warming: WarmingOut | None = None
    plan: WarmingPlan | None = None
    per_minute: float | None = None
    notes: list[str] = field(default_factory=list)


def shares(total: int, weights: dict[str, int]) -> dict[str, int]:
    """``total`` split in proportion to ``weights`` (largest remainders get the rest,
    the first named first when they tie)."""
    if not sum(weights.values()):
        weights = dict.fromkeys(weights, 1)
    whole = sum(weights.values())
    out = {n: total * w // whole for n, w in weights.items()}
    left = total - sum(out.values())
    by_rest = sorted(weights, key=lambda n: -(total * weights[n] % whole))
    for n in by_rest[:left]:
        out[n] += 1
    return out


async def _rules(c: Call, notes: list[str]) -> Rules:
    path = c.ctx.cfg.shaping.rules_file
    try:
        return await asyncio.to_thread(load_rules, path)
    except RulesError as exc:
        notes.append(f"the shaping rules file could not be read ({exc}): the shipped rules used")
        return shipped_rules()


def _rate(rules: Rules, sources: int, notes: list[str]) -> float | None:
    """Messages per minute for each source: the rules' ``[default]``
    ``max_message_rate``, and an even share of its ``provider_max_message_rate``."""
    rates = []
    own, whole = rules.default.max_message_rate, rules.default.provider_max_message_rate
    if own is not None:
        rates.append(own.count * 60 / own.period)
    if whole is not None and sources:
        rates.append(whole.count * 60 / whole.period / sources)
    sites = ", ".join(
        f"{s.name} {s.limits.max_message_rate.text}"
        for s in rules.sites.values()
        if s.limits.max_message_rate is not None
    )
    if rates:
        said = ", ".join(
            f"{key} {r.text}" for key, r in (("max_message_rate", own),
                                             ("provider_max_message_rate", whole)) if r
        )  # fmt: skip
        notes.append(f"each source is paced by the shaping rules' [default] ({said})")
    else:
        notes.append("the shaping rules' [default] sets no message rate: each source sends"
                     " a day's cap at once")  # fmt: skip
    if sites:
        notes.append(f"provider sites' own rates ({sites}) are not applied: the"
                     " recipients' sites are not known before their MX hosts are")  # fmt: skip
    return min(rates, default=None)


async def _broker(c: Call, notes: list[str]) -> dict[str, dict[str, Any]] | None:
    """Every warming plan and pause the shaping broker keeps, by key; None without one."""
    command = c.ctx.shaping_command
    if command is None:
        notes.append("no shaping broker in this process (serve --role control): warming"
                     " caps and pauses are not applied")  # fmt: skip
        return None
    try:
        answer = await command(op="warming_list")
        return {str(p["key"]): p for p in answer.get("warming", [])}
    except (ConnectionError, TimeoutError, ValueError, KeyError, TypeError) as exc:
        notes.append(f"the shaping broker did not answer ({exc!r}): warming caps and pauses"
                     " are not applied")  # fmt: skip
        return None


def _warming_plan(p: dict[str, Any]) -> WarmingPlan | None:
    anchors = p.get("anchors")
    if anchors:
        try:
            return make_plan(str(p.get("plan", "custom")), {int(d): int(v) for d, v in anchors})
        except (PlanError, TypeError, ValueError):
            return None
    return BUILTIN.get(str(p.get("plan")))


def _source_state(
    src: _Source, progress: dict[str, Any] | None, start: dt.datetime, now: dt.datetime,
    wzone: zoneinfo.ZoneInfo,
) -> SourceLimit:  # fmt: skip
    """The source as the prediction paces it: its warming day moved on to the start
    (a healthy day each), ``sent_today`` only when it starts today."""
    day, sent = 1, 0
    if progress is not None and progress.get("warming"):
        src.plan = _warming_plan(progress)
        if src.plan is None:
            src.notes.append(f"source {src.name}'s warming plan could not be read: not applied")
        else:
            day, sent = int(progress.get("day", 1)), int(progress.get("sent_today", 0))
            ahead = (start.astimezone(wzone).date() - now.astimezone(wzone).date()).days
            if ahead > 0:
                day, sent = day + ahead, 0
            src.warming = WarmingOut(
                plan=src.plan.name, day=day, sent_today=sent, cap=src.plan.cap(day)
            )
    return SourceLimit(
        src.name, plan=src.plan, plan_day=day, sent_today=sent, per_minute=src.per_minute
    )


def _start(
    at: dt.datetime | None, scheduled: dt.datetime | None, now: dt.datetime
) -> tuple[dt.datetime, str]:
    """When the prediction starts, and the words saying so."""
    if at is not None and at > now:
        return at.astimezone(dt.UTC), "it starts at the time asked"
    if at is None and scheduled is not None and scheduled > now:
        return scheduled, "it starts at its scheduled time"
    return now, "it starts now"


async def _predict(
    c: Call, row: Campaign, sendable: int, start: dt.datetime, now: dt.datetime,
    notes: list[str], settings: dict[str, Any],
) -> PredictionOut | None:  # fmt: skip
    """The finish of ``sendable`` messages from the campaign's pool; None when the
    pool is not one it may use (validation's problem ``pool_not_allowed`` says why)."""
    cache = c.ctx.pool_cache
    try:
        name = cache.pool_for(c.tenant_id, row.pool) or cache.default_pool
    except PoolNotAllowed:
        return None
    pool = cache.members(name) or c.ctx.cfg.pool_map().get(name)
    if pool is None:
        return None
    weights: dict[str, int] = {}
    for m in pool.members:
        weights[m.source] = weights.get(m.source, 0) + max(m.weight, 0)
    rules = await _rules(c, notes)
    per_minute = _rate(rules, len(weights), notes)
    book = await _broker(c, notes)
    wzone = zoneinfo.ZoneInfo(c.ctx.cfg.shaping.timezone)
    sources = [_Source(n, w, per_minute=per_minute) for n, w in weights.items()]
    limits: dict[str, SourceLimit] = {}
    for src in sources:
        configured = cache.sources.get(src.name)
        progress = book.get(f"source:{src.name}") if book is not None else None
        if configured is not None and configured.state == "paused":
            src.paused = "paused in the configuration"
        elif progress is not None and progress.get("paused"):
            src.paused = str(progress["paused"])
        if configured is not None and configured.state == "warming" and book is None:
            notes.append(f"source {src.name} is configured to warm ({configured.warming_plan}):"
                         " its caps are not applied")  # fmt: skip
        limits[src.name] = _source_state(src, progress, start, now, wzone)
        notes += src.notes
    going = {s.name: s.weight for s in sources if not s.paused}
    counts = shares(sendable, going)
    window = _window(row, notes)
    if going:
        p = predict_finish(start, counts, [limits[n] for n in going], window, warming_tz=wzone.key)
        finish, per_day, last, unsent = p.finish, p.per_day, dict(p.per_source), p.unsent
    else:
        notes.append(f"every source of pool {name} is paused: nothing goes until one resumes")
        finish, per_day, last, unsent = (None if sendable else start), (), {}, sendable
    notes += _more_notes(row, rules, book, sources, settings)
    return PredictionOut(
        pool=name, start=start, finish=finish,
        per_day=[DayOut(date=d, messages=n) for d, n in per_day],
        per_source=[
            SourceOut(source=s.name, messages=counts.get(s.name, 0), last=last.get(s.name),
                      paused=s.paused, warming=s.warming, per_minute=s.per_minute)
            for s in sources
        ],
        unsent=unsent, assumptions=notes,
    )  # fmt: skip


def _window(row: Campaign, notes: list[str]) -> SendWindow | None:
    if row.send_window is None:
        return None
    try:
        window = parse_window(row.send_window)
    except WindowError as exc:
        notes.append(f"the send window could not be read ({exc}): not applied")
        return None
    notes.append(f"the send window is read in the campaign's zone ({window.timezone}), not"
                 " in each recipient's")  # fmt: skip
    return window


def _more_notes(
    row: Campaign, rules: Rules, book: dict[str, Any] | None, sources: list[_Source],
    settings: dict[str, Any],
) -> list[str]:  # fmt: skip
    """What else the prediction takes for granted."""
    notes = []
    if any(s.warming for s in sources):
        notes.append("every warming day is healthy: a day held for bad health moves the"
                     " finish a day later")  # fmt: skip
    if len(sources) > 1:
        notes.append("the messages are split over the pool's sources by their weights")
    domain = row.from_email.rpartition("@")[2]
    progress = (book or {}).get(f"domain:{domain}")
    if progress is not None and progress.get("warming"):
        notes.append(f"the sending domain {domain} is warming too (plan {progress.get('plan')},"
                     f" day {progress.get('day')}): its cap, shared by every source, is not"
                     " applied")  # fmt: skip
    if progress is not None and progress.get("paused"):
        notes.append(f"the sending domain {domain} is paused ({progress['paused']}): nothing"
                     " goes until it resumes")  # fmt: skip
    if row.pool is None and rules.routes:
        notes.append("routes of the shaping rules that choose a pool by recipient or sender"
                     " domain are not applied")  # fmt: skip
    if row.ab:
        notes.append("the campaign has an A/B test: the sample shows its own template and"
                     " From, not each contact's variant")  # fmt: skip
        portion = float(row.ab.get("portion") or 1)
        if portion < 1:
            notes.append(f"the {1 - portion:.0%} outside the A/B test's portion are sent as if"
                         " they did not wait for the winner")  # fmt: skip
    if int(settings.get("frequency_cap") or 0):
        notes.append("the tenant's frequency cap is applied when a message is sent, not here")
    return notes
