"""/v1/…/analytics: a campaign's, a tenant's, a sending domain's and the providers'
figures (issue 23; docs/api.md "Analytics"), as JSON or as CSV (one table).

Every figure comes from the hourly rollups (``store.analytics`` reads ``stat_hours``
by its key prefix, always the caller's tenant); the rates, times to deliver and the
A/B figure are computed from those counts (``analytics.figures``). The appliance's
own view of the providers (every tenant's counts, tenant 0 of the rollups) needs an
operator key: ``/v1/analytics/appliance/providers``.
"""

from __future__ import annotations

import datetime as dt
import io
from collections.abc import Iterable, Mapping, Sequence
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, StringConstraints
from sqlalchemy import select
from starlette.responses import Response

from postwarden.analytics.figures import (
    against_best,
    deliverability,
    rates,
    significance,
    ttd_quantile,
)
from postwarden.control.api import api
from postwarden.control.campaigns import campaign_of
from postwarden.control.csvfile import SafeWriter
from postwarden.control.errors import invalid, not_found
from postwarden.control.routing import Call
from postwarden.control.schemas import Strict, Timestamp
from postwarden.store.analytics import (
    Breakdowns,
    Bucket,
    Rows,
    breakdowns,
    link_urls,
    timeline,
)
from postwarden.store.analytics import totals as read_totals
from postwarden.store.analytics_models import StatHour
from postwarden.store.models import Domain, utcnow
from postwarden.store.rollups import ALL, TTD_BOUNDS

#: The range a tenant's, domain's or the providers' figures cover when not given.
DEFAULT_DAYS = 30
#: The longest range asked for at once.
MAX_DAYS = 400
#: The whole's metrics every answer's ``totals`` lists (0 when none); others counted
#: (``queued``, ``held`` …) are listed too.
TOTALS = ("recipients", "skipped", "accepted", "delivered", "deferred", "bounced",
          "bounced_hard", "bounced_soft", "blocked", "expired", "dropped", "complained",
          "unsubscribed", "opened", "opened_unique", "opened_machine", "clicked",
          "clicked_unique", "clicked_machine")  # fmt: skip
#: Throttling changes the shaper counts per provider site (tenant 0, dim ``site``).
THROTTLING = ("throttle_actions", "rate_down", "rate_up")
#: The breakdowns of a campaign (the rollups' dims).
CAMPAIGN_DIMS = ("category", "site", "source", "domain", "variant", "link", "client", "device")
CSV_MEDIA = "text/csv"


def _bucket(default: str) -> Any:
    return Field(default, description="timeline buckets: UTC hours or UTC days")


def _format() -> Any:
    return Field("json", description="json, or csv: one table of the answer (see table)")


def _table(names: str) -> Any:
    return Field(None, description=f"with format=csv, the table: {names}")


# ------------------------------------------------------------------ answers


class Rates(BaseModel):
    delivery_rate: float | None = Field(description="delivered / accepted")
    bounce_rate: float | None = Field(description="bounced / accepted")
    hard_bounce_rate: float | None = Field(description="hard bounces (and expiries) / accepted")
    complaint_rate: float | None = Field(description="complained / delivered")
    unsubscribe_rate: float | None = Field(description="unsubscribed / delivered")
    unique_open_rate: float | None = Field(description="unique human opens / delivered")
    click_rate: float | None = Field(description="unique human clicks / delivered")
    click_to_open_rate: float | None = Field(description="unique clicks / unique opens")


class Point(BaseModel):
    """One hour's or day's counts."""

    at: dt.datetime = Field(description="the start of the UTC hour or day")
    accepted: int
    delivered: int
    deferred: int
    bounced: int
    complained: int
    unsubscribed: int
    opened: int
    opened_unique: int
    clicked: int
    clicked_unique: int


TIMELINE = tuple(name for name in Point.model_fields if name != "at")


class Deliverability(BaseModel):
    attempts: int = Field(description="delivered + deferred + bounced + expired")
    delivered: int
    deferred: int
    bounced: int
    expired: int
    blocked: int = Field(description="bounces of the sender refused: policy, content, auth")
    acceptance_rate: float | None = Field(description="delivered / attempts")
    deferral_rate: float | None = Field(description="deferred / attempts")
    block_rate: float | None = Field(description="blocked / attempts")
    median_ttd_seconds: float | None = Field(description="median time from acceptance to delivery")
    p90_ttd_seconds: float | None


# A row's name comes first (in JSON and as the CSV's first column): pydantic lists
# the fields of the last base first, so the name is a base after the figures.


class _Site(BaseModel):
    site: str = Field(description="the provider site (shaping's), 'other' for the rest")


class _Source(BaseModel):
    source: str = Field(description="the source IP's name")


class _Domain(BaseModel):
    domain: str = Field(description="the envelope sender's domain")


class Site(Deliverability, _Site):
    pass


class Source(Deliverability, _Source):
    pass


class SendingDomain(Deliverability, _Domain):
    pass


class Provider(Site):
    # The shaper's changes act on the appliance's sources, whoever's mail met them:
    # only the appliance's view shows them (a tenant's would tell of other tenants').
    throttle_actions: int | None = Field(
        description="the shaper's response-rule actions on this site (appliance view only)"
    )
    rate_down: int | None = Field(description="rate steps down (appliance view only)")
    rate_up: int | None = Field(description="rate steps back up (appliance view only)")


class Category(BaseModel):
    category: str = Field(description="the bounce category (docs/bounces.md)")
    bounced: int
    expired: int


class Link(BaseModel):
    link: int = Field(description="the link's index in the message, from 0")
    url: str | None = Field(description="null when its hits are gone (retention)")
    clicks: int = Field(description="human clicks")
    unique_clicks: int = Field(description="recipients' first human clicks")
    machine_clicks: int = Field(description="clicks judged a machine's (scanners, prefetch)")


class Engagement(BaseModel):
    opens: int
    unique_opens: int
    clicks: int
    unique_clicks: int


class _Client(BaseModel):
    client: str = Field(description="the mail client of human opens and clicks")


class _Device(BaseModel):
    device: str


class Client(Engagement, _Client):
    pass


class Device(Engagement, _Device):
    pass


class Variant(BaseModel):
    variant: str
    delivered: int
    unique_opens: int
    unique_clicks: int
    unique_open_rate: float | None
    click_rate: float | None
    click_p_value: float | None = Field(
        description="chi-squared p-value of its unique clicks against the best variant's"
        " (null for the best)"
    )
    open_p_value: float | None = Field(description="the same for unique opens")


class Significance(BaseModel):
    metric: Literal["unique_clicks", "unique_opens"]
    p_value: float = Field(description="chi-squared test of independence over every variant")
    significant: bool = Field(description="p < 0.05 (with 3+ variants: best beats runner-up too)")
    best: str


class Figures(BaseModel):
    totals: dict[str, int] = Field(description="every metric counted, summed")
    rates: Rates
    median_ttd_seconds: float | None
    p90_ttd_seconds: float | None
    timeline: list[Point]


class CampaignAnalytics(Figures):
    campaign_id: int
    bounces_by_category: list[Category]
    links: list[Link]
    clients: list[Client]
    devices: list[Device]
    sites: list[Site]
    sources: list[Source]
    domains: list[SendingDomain]
    variants: list[Variant]
    significance: Significance | None


class Ranged(BaseModel):
    since: dt.datetime
    until: dt.datetime


class Overview(Figures, Ranged):
    sites: list[Site]
    sources: list[Source]
    categories: list[Category]


class DomainAnalytics(Figures, Ranged):
    domain: str
    sites: list[Site]
    categories: list[Category]


class Providers(Ranged):
    providers: list[Provider]


# ------------------------------------------------------------------ queries

CAMPAIGN_TABLES = Literal["totals", "timeline", "bounces_by_category", "links", "clients",
                          "devices", "sites", "sources", "domains", "variants"]  # fmt: skip
OVERVIEW_TABLES = Literal["totals", "timeline", "sites", "sources", "categories"]
DOMAIN_TABLES = Literal["totals", "timeline", "sites", "categories"]
PROVIDER_TABLES = Literal["providers"]


class CampaignQuery(Strict):
    bucket: Bucket = _bucket("hour")
    format: Literal["json", "csv"] = _format()
    table: CAMPAIGN_TABLES | None = _table(
        "totals (with the rates) or a list: timeline, bounces_by_category, links, clients,"
        " devices, sites, sources, domains, variants"
    )


class RangeQuery(Strict):
    since: Timestamp | None = Field(
        None, description=f"from this hour (rounded down); default: {DEFAULT_DAYS} days"
        " before until"
    )  # fmt: skip
    until: Timestamp | None = Field(
        None, description="to this hour, not included (rounded up); default: now"
    )


class OverviewQuery(RangeQuery):
    bucket: Bucket = _bucket("day")
    format: Literal["json", "csv"] = _format()
    table: OVERVIEW_TABLES | None = _table(
        "totals (with the rates), timeline, sites, sources, categories"
    )


class DomainQuery(RangeQuery):
    bucket: Bucket = _bucket("day")
    format: Literal["json", "csv"] = _format()
    table: DOMAIN_TABLES | None = _table("totals (with the rates), timeline, sites, categories")


class ProvidersQuery(RangeQuery):
    format: Literal["json", "csv"] = _format()
    table: PROVIDER_TABLES | None = _table("providers")


DomainName = Annotated[str, StringConstraints(min_length=1, max_length=255)]


# ------------------------------------------------------------------ building


def _hours(q: RangeQuery) -> tuple[dt.datetime, dt.datetime]:
    """``[since, until)`` in whole UTC hours (since rounded down, until up), or 422
    naming the field."""
    try:
        until = q.until or utcnow()
        floor = until.replace(minute=0, second=0, microsecond=0)
        until = floor if floor == until else floor + dt.timedelta(hours=1)
    except OverflowError:
        raise invalid("until", "out of range (years 1 to 9999)") from None
    try:
        since = q.since or until - dt.timedelta(days=DEFAULT_DAYS)
    except OverflowError:
        raise invalid("until", "too early for the default range: give since") from None
    since = since.replace(minute=0, second=0, microsecond=0)
    if since >= until:
        raise invalid("until", "must be after since")
    if until - since > dt.timedelta(days=MAX_DAYS):
        raise invalid("until", f"the range is longer than {MAX_DAYS} days")
    return since, until


def _check_table(q: Any) -> None:
    if q.format == "csv" and q.table is None:
        raise invalid("table", "required with format=csv: which table of the answer")
    if q.format == "json" and q.table is not None:
        raise invalid("table", "only with format=csv")


def _totals(counts: Mapping[str, int]) -> dict[str, int]:
    out = {m: counts.get(m, 0) for m in TOTALS}
    out.update(sorted((m, n) for m, n in counts.items() if not m.startswith("ttd:")))
    return out


def _figures(counts: Mapping[str, int], points: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "totals": _totals(counts),
        "rates": Rates(**rates(counts)),
        "median_ttd_seconds": ttd_quantile(counts, 0.5, TTD_BOUNDS),
        "p90_ttd_seconds": ttd_quantile(counts, 0.9, TTD_BOUNDS),
        "timeline": [Point(**p) for p in points],
    }


def _delivery(rows: Mapping[str, Mapping[str, int]]) -> list[tuple[str, dict[str, Any]]]:
    """(value, its deliverability figures), the most attempts first."""
    out = [(v, vars(deliverability(c, TTD_BOUNDS))) for v, c in rows.items()]
    return sorted(out, key=lambda kv: (-kv[1]["attempts"], kv[0]))


def _categories(rows: Mapping[str, Mapping[str, int]]) -> list[Category]:
    out = [Category(category=v, bounced=c.get("bounced", 0), expired=c.get("expired", 0))
           for v, c in rows.items()]  # fmt: skip
    return sorted(out, key=lambda r: (-(r.bounced + r.expired), r.category))


def _engagement(rows: Mapping[str, Mapping[str, int]]) -> list[tuple[str, dict[str, int]]]:
    out = [
        (v, {"opens": c.get("opened", 0), "unique_opens": c.get("opened_unique", 0),
             "clicks": c.get("clicked", 0), "unique_clicks": c.get("clicked_unique", 0)})
        for v, c in rows.items()
    ]  # fmt: skip
    return sorted(out, key=lambda kv: (-kv[1]["opens"] - kv[1]["clicks"], kv[0]))


def _variants(
    named: Iterable[str], rows: Mapping[str, Mapping[str, int]]
) -> tuple[list[Variant], dict[str, Mapping[str, int]]]:
    counts: dict[str, Mapping[str, int]] = {v: rows.get(v, {}) for v in named}
    counts.update({v: c for v, c in rows.items() if v not in counts})
    clicks, opens = against_best(counts, "unique_clicks"), against_best(counts, "unique_opens")
    out = []
    for v, c in counts.items():
        r = rates(c)
        out.append(Variant(
            variant=v, delivered=c.get("delivered", 0), unique_opens=c.get("opened_unique", 0),
            unique_clicks=c.get("clicked_unique", 0), unique_open_rate=r["unique_open_rate"],
            click_rate=r["click_rate"], click_p_value=clicks[v], open_p_value=opens[v],
        ))  # fmt: skip
    return out, counts


def _csv(answer: BaseModel, table: str) -> Response:
    """One table of ``answer`` as CSV with a header row: ``totals`` is one row (the
    totals, then the rates and times to deliver), a list one row per item."""
    data = answer.model_dump(mode="json")
    if table == "totals":
        row = {**data["totals"], **data["rates"],
               "median_ttd_seconds": data["median_ttd_seconds"],
               "p90_ttd_seconds": data["p90_ttd_seconds"]}  # fmt: skip
        header: Sequence[str] = list(row)
        rows = [row]
    else:
        item = type(answer).model_fields[table].annotation
        header = list(item.__args__[0].model_fields)  # type: ignore[union-attr]
        rows = data[table]
    out = io.StringIO()
    w = SafeWriter(out)
    w.writerow(header)
    for r in rows:
        w.writerow(r.get(h) for h in header)
    return Response(out.getvalue(), media_type="text/csv; charset=utf-8")


async def _read(
    s: Any, rows: Rows, bucket: Bucket, dims: Sequence[str]
) -> tuple[dict[str, Any], Breakdowns]:
    """The figures of :class:`Figures` and the breakdowns by ``dims``."""
    counts = await read_totals(s, rows)
    points = await timeline(s, rows, TIMELINE, bucket)
    return _figures(counts, points), await breakdowns(s, rows, dims)


async def _ranged(
    c: Call, q: Any, scope: str, key: str, dims: Sequence[str]
) -> tuple[dict[str, Any], Breakdowns]:
    """A tenant's or a sending domain's: its range, figures and breakdowns."""
    since, until = _hours(q)
    async with c.ctx.sessions() as s:
        figures, by = await _read(s, Rows(c.tenant_id, scope, key, since, until), q.bucket, dims)
    return {"since": since, "until": until, **figures}, by


def _sites(rows: Mapping[str, Mapping[str, int]]) -> list[Site]:
    return [Site(site=v, **d) for v, d in _delivery(rows)]


def _answer(answer: BaseModel, q: Any) -> Any:
    return _csv(answer, q.table) if q.format == "csv" else answer


# ------------------------------------------------------------------ routes


@api.op(
    "GET",
    "/v1/campaigns/{campaign_id:int}/analytics",
    summary="A campaign's analytics",
    scope="read",
    query=CampaignQuery,
    response=CampaignAnalytics,
    errors=(404,),
    also_media=(CSV_MEDIA,),
)
async def campaign_analytics(c: Call) -> Any:
    """Totals, rates, the timeline and every breakdown of the campaign, from the
    hourly rollups (a second or so behind the events)."""
    q: CampaignQuery = c.query
    _check_table(q)
    async with c.ctx.sessions() as s:
        row = await campaign_of(s, c)
        rows = Rows(c.tenant_id, "campaign", str(row.id))
        figures, dims = await _read(s, rows, q.bucket, CAMPAIGN_DIMS)
        link_counts = {int(v): n for v, n in dims["link"].items() if v.isdigit()}
        # The links' URLs (campaign_links, recorded by the rollups): only when the
        # answer shows them.
        urls = {}
        if q.format == "json" or q.table == "links":
            urls = await link_urls(s, c.tenant_id, row.id, sorted(link_counts))
        ab = row.ab or {}
    links = [
        Link(link=i, url=urls.get(i), clicks=n.get("clicked", 0),
             unique_clicks=n.get("clicked_unique", 0), machine_clicks=n.get("clicked_machine", 0))
        for i, n in sorted(link_counts.items())
    ]  # fmt: skip
    variants, by_variant = _variants((v["name"] for v in ab.get("variants", [])), dims["variant"])
    sig = significance(
        by_variant, "unique_opens" if ab.get("metric") == "opens" else "unique_clicks"
    )
    answer = CampaignAnalytics(
        campaign_id=row.id,
        **figures,
        bounces_by_category=_categories(dims["category"]),
        links=links,
        clients=[Client(client=v, **e) for v, e in _engagement(dims["client"])],
        devices=[Device(device=v, **e) for v, e in _engagement(dims["device"])],
        sites=_sites(dims["site"]),
        sources=[Source(source=v, **d) for v, d in _delivery(dims["source"])],
        domains=[SendingDomain(domain=v, **d) for v, d in _delivery(dims["domain"])],
        variants=variants,
        significance=Significance(**vars(sig)) if sig is not None else None,
    )
    return _answer(answer, q)


@api.op(
    "GET",
    "/v1/analytics/overview",
    summary="The tenant's analytics over a time range",
    scope="read",
    query=OverviewQuery,
    response=Overview,
    also_media=(CSV_MEDIA,),
)
async def overview(c: Call) -> Any:
    """Totals, rates, the timeline, provider sites, sources and bounce categories of
    every message of the tenant in ``[since, until)``."""
    q: OverviewQuery = c.query
    _check_table(q)
    figures, dims = await _ranged(c, q, "tenant", "", ("site", "source", "category"))
    answer = Overview(
        **figures,
        sites=_sites(dims["site"]),
        sources=[Source(source=v, **d) for v, d in _delivery(dims["source"])],
        categories=_categories(dims["category"]),
    )
    return _answer(answer, q)


@api.op(
    "GET",
    "/v1/analytics/domains/{domain}",
    summary="A sending domain's analytics over a time range",
    scope="read",
    query=DomainQuery,
    response=DomainAnalytics,
    errors=(404,),
    also_media=(CSV_MEDIA,),
)
async def domain_analytics(c: Call) -> Any:
    """The figures of the tenant's mail from one sending domain (its envelope
    sender's, as sent: ``mail.acme.test`` is not ``acme.test``); 404 for a domain
    that is neither one of the tenant's domains nor one it has sent from (another
    tenant's, say), zeros for one of its domains in a range it sent nothing."""
    q: DomainQuery = c.query
    _check_table(q)
    domain = str(c.path["domain"]).lower()
    if len(domain) > 255:
        raise invalid("domain", "longer than 255 characters")
    async with c.ctx.sessions() as s:
        sent = await s.scalar(
            select(StatHour.metric).where(
                StatHour.tenant_id == c.tenant_id, StatHour.scope == "domain",
                StatHour.key == domain,
            ).limit(1)
        )  # fmt: skip
        if (
            sent is None
            and await s.scalar(
                select(Domain.id).where(Domain.tenant_id == c.tenant_id, Domain.name == domain)
            )
            is None
        ):
            raise not_found("sending domain")
    figures, dims = await _ranged(c, q, "domain", domain, ("site", "category"))
    answer = DomainAnalytics(
        **figures, domain=domain, sites=_sites(dims["site"]),
        categories=_categories(dims["category"]),
    )  # fmt: skip
    return _answer(answer, q)


async def _providers(c: Call, tenant: int) -> Any:
    q: ProvidersQuery = c.query
    _check_table(q)
    since, until = _hours(q)
    async with c.ctx.sessions() as s:
        sites = (await breakdowns(s, Rows(tenant, "tenant", "", since, until), ("site",)))["site"]
    out = []
    for site, figures in _delivery(sites):
        # The shaper's changes: the appliance's, shown in its view only.
        t, d, u = (int(sites.get(site, {}).get(m, 0)) if tenant == ALL else None
                   for m in THROTTLING)  # fmt: skip
        out.append(Provider(site=site, **figures, throttle_actions=t, rate_down=d, rate_up=u))
    return _answer(Providers(since=since, until=until, providers=out), q)


@api.op(
    "GET",
    "/v1/analytics/providers",
    summary="Deliverability by provider site over a time range",
    scope="read",
    query=ProvidersQuery,
    response=Providers,
    also_media=(CSV_MEDIA,),
)
async def providers(c: Call) -> Any:
    """Per provider site, the tenant's delivery attempts and their ends, acceptance,
    deferral and block rates and times to deliver. The shaper's throttling changes
    are the appliance's (they act on every tenant's mail): null here, counted in
    ``GET /v1/analytics/appliance/providers``."""
    return await _providers(c, c.tenant_id)


@api.op(
    "GET",
    "/v1/analytics/appliance/providers",
    summary="The appliance's deliverability by provider site (every tenant's)",
    scope="admin",
    query=ProvidersQuery,
    response=Providers,
    also_media=(CSV_MEDIA,),
)
async def appliance_providers(c: Call) -> Any:
    """As ``GET /v1/analytics/providers``, over every tenant's mail (an operator
    key: tenant routes take tenant keys only)."""
    return await _providers(c, ALL)
