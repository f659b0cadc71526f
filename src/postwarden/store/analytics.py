"""Reading the hourly rollups (issue 23; docs/api.md "Analytics"): a campaign's, a
tenant's, a sending domain's and the providers' counts, summed in SQL.

Every query names the rows' key prefix (``tenant_id``, ``scope``, ``key``, then
``dim`` and ``value``: the primary key of ``stat_hours``), so it reads those rows
only, through the primary key's index; none reads ``events`` or ``send_records``.
Times are UTC hours: a range is ``[since, until)`` in whole hours.
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from postwarden.store.analytics_models import CampaignLink, StatHour

Bucket = Literal["hour", "day"]
#: dim → value → metric → count.
Breakdowns = dict[str, dict[str, dict[str, int]]]


@dataclass(frozen=True)
class Rows:
    """Which counts: a tenant's (0: the appliance's) ``scope`` and ``key``, in the
    hours ``[since, until)`` (None: unbounded)."""

    tenant: int
    scope: str  # tenant | campaign | domain
    key: str = ""
    since: dt.datetime | None = None
    until: dt.datetime | None = None

    def where(self) -> list[Any]:
        conds: list[Any] = [
            StatHour.tenant_id == self.tenant,
            StatHour.scope == self.scope,
            StatHour.key == self.key,
        ]
        if self.since is not None:
            conds.append(StatHour.hour >= self.since)
        if self.until is not None:
            conds.append(StatHour.hour < self.until)
        return conds


async def totals(s: AsyncSession, rows: Rows) -> dict[str, int]:
    """Every metric of the whole (no breakdown), summed over the hours."""
    result = await s.execute(
        select(StatHour.metric, func.sum(StatHour.n))
        .where(*rows.where(), StatHour.dim == "", StatHour.value == "")
        .group_by(StatHour.metric)
    )
    return {metric: int(n) for metric, n in result.all() if n}


async def breakdowns(
    s: AsyncSession, rows: Rows, dims: Sequence[str], metrics: Sequence[str] | None = None
) -> Breakdowns:
    """The counts broken down by each of ``dims`` (only ``metrics``, when given),
    summed over the hours, in one query: ``{dim: {value: {metric: n}}}`` (every dim
    asked for is there, maybe empty)."""
    out: Breakdowns = {d: {} for d in dims}
    if not dims:
        return out
    conds = [*rows.where(), StatHour.dim.in_(list(dims))]
    if metrics is not None:
        conds.append(StatHour.metric.in_(list(metrics)))
    result = await s.execute(
        select(StatHour.dim, StatHour.value, StatHour.metric, func.sum(StatHour.n))
        .where(*conds)
        .group_by(StatHour.dim, StatHour.value, StatHour.metric)
    )
    for dim, value, metric, n in result.all():
        if n:
            out[dim].setdefault(value, {})[metric] = int(n)
    return out


def bucket_of(hour: dt.datetime, bucket: Bucket) -> dt.datetime:
    """The start of the UTC hour or day ``hour`` falls in."""
    hour = hour.astimezone(dt.UTC)
    return hour.replace(hour=0) if bucket == "day" else hour


async def timeline(
    s: AsyncSession, rows: Rows, metrics: Iterable[str], bucket: Bucket
) -> list[dict[str, Any]]:
    """``metrics`` of the whole per hour or per UTC day, oldest first: ``{"at": the
    bucket's start, metric: n, …}`` (every metric named, 0 when absent). Buckets with
    none of them are left out. Summed by hour in SQL; hours into days here (at most
    24 rows a day)."""
    names = list(metrics)
    result = await s.execute(
        select(StatHour.hour, StatHour.metric, func.sum(StatHour.n))
        .where(*rows.where(), StatHour.dim == "", StatHour.value == "",
               StatHour.metric.in_(names))
        .group_by(StatHour.hour, StatHour.metric)
    )  # fmt: skip
    by: dict[dt.datetime, dict[str, int]] = defaultdict(dict)
    for hour, metric, n in result.all():
        if n:
            point = by[bucket_of(hour, bucket)]
            point[metric] = point.get(metric, 0) + int(n)
    return [{"at": at, **{m: by[at].get(m, 0) for m in names}} for at in sorted(by)]


async def link_urls(
    s: AsyncSession, tenant: int, campaign_id: int, links: Iterable[int]
) -> dict[int, str | None]:
    """Each link's URL, as the rollups recorded it from its first click
    (``campaign_links``: one indexed read; None for a link never seen)."""
    wanted = list(links)
    out: dict[int, str | None] = dict.fromkeys(wanted)
    if wanted:
        rows = await s.execute(
            select(CampaignLink.link_index, CampaignLink.url).where(
                CampaignLink.campaign_id == campaign_id, CampaignLink.tenant_id == tenant
            )
        )
        for index, url in rows.all():
            if index in out:
                out[index] = url
    return out
