"""Events into hourly rollups (issue 23; docs/decisions/0012, docs/analytics.md).

One reader follows ``events`` in id order after its cursor (``event_cursors`` row
:data:`CURSOR`; event ids become visible in the order drawn, ``store.feed.lock_events``,
so none is passed over) and adds each event to the counts of ``stat_hours``: its
tenant's, its campaign's and its sending domain's, and the appliance's (tenant 0), by
UTC hour, whole and broken down. The counts and the cursor move in one transaction: a
crash repeats a batch's read, never its write, and each event is counted once.

What an event does not say is looked up once per message and kept for the next
events: its campaign and A/B variant (its send record, by message id), its sending
domain and when it was accepted (``messages``).
"""

from __future__ import annotations

import datetime as dt
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession

from postwarden.store.analytics_models import CampaignLink, StatHour
from postwarden.store.campaign_models import SendRecord
from postwarden.store.campaign_outcomes import hold_cursor
from postwarden.store.models import Event, EventCursor, Message

CURSOR = "analytics"
#: Events read per step.
BATCH = 5000
#: Tenant id of the appliance's own totals (every tenant's events).
ALL = 0
#: Bounce categories that say the sender was refused, not the address.
BLOCKS = frozenset({"policy_blocked", "spam_content", "authentication_failed", "relay_denied"})
#: Upper bounds (seconds) of the time-to-deliver buckets: ``ttd:<bound>``, then ``ttd:inf``.
TTD_BOUNDS = (1, 5, 10, 30, 60, 300, 900, 3600, 14400, 86400)
#: Metrics counted by provider site, source and sending domain: delivery's.
DELIVERY = frozenset({"delivered", "deferred", "bounced", "expired", "bounced_hard",
                      "bounced_soft", "blocked", "complained"})  # fmt: skip

Key = tuple[int, str, str, str, str, dt.datetime, str]
COLUMNS = ("tenant_id", "scope", "key", "dim", "value", "hour", "metric")


def ttd_metric(seconds: float) -> str:
    """The time-to-deliver bucket a delivery after ``seconds`` falls in."""
    for bound in TTD_BOUNDS:
        if seconds <= bound:
            return f"ttd:{bound}"
    return "ttd:inf"


def hour_of(ts: dt.datetime) -> dt.datetime:
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=dt.UTC)
    return ts.astimezone(dt.UTC).replace(minute=0, second=0, microsecond=0)


@dataclass(frozen=True)
class Facts:
    """What the rollups need to know of a message beyond its events."""

    domain: str = ""  # the sending domain (its envelope sender's)
    accepted: dt.datetime | None = None
    campaign: int | None = None
    variant: str | None = None


NO_FACTS = Facts()


def metrics_of(kind: str, detail: dict[str, Any], facts: Facts, ts: dt.datetime) -> list[str]:
    """The metrics one event adds one to (an event type, or what it says)."""
    if kind in ("opened", "clicked"):
        if detail.get("machine"):
            return [f"{kind}_machine"]
        return [kind, f"{kind}_unique"] if detail.get("first") else [kind]
    out = [kind]
    if kind in ("bounced", "expired"):
        out.append("bounced_hard" if detail.get("hard") else "bounced_soft")
        if detail.get("category") in BLOCKS:
            out.append("blocked")
    elif kind == "delivered" and facts.accepted is not None:
        out.append(ttd_metric(max(0.0, (ts - facts.accepted).total_seconds())))
    return out


def _clip(value: Any) -> str:
    return str(value)[:255] if value is not None else ""


def site_label(site: Any) -> str:
    """A provider site as the rollups count it: a destination of no named site
    (``mx:<its hosts>``, shaping.rules) is ``other``, one row for all of them."""
    label = _clip(site)
    return "other" if label.startswith("mx:") else label


def keys_of(
    tenant: int,
    kind: str,
    detail: dict[str, Any],
    facts: Facts,
    ts: dt.datetime,
    client_of: Callable[[str | None], tuple[str, str]] | None = None,
) -> Iterable[Key]:
    """Every count one event adds one to."""
    hour = hour_of(ts)
    metrics = metrics_of(kind, detail, facts, ts)
    delivery = [m for m in metrics if m in DELIVERY or m.startswith("ttd:")]
    site, source = site_label(detail.get("site")), _clip(detail.get("source"))
    category = _clip(detail.get("category")) if kind in ("bounced", "expired") else ""
    scopes: list[tuple[int, str, str]] = [(tenant, "tenant", ""), (ALL, "tenant", "")]
    if facts.domain:
        scopes.append((tenant, "domain", facts.domain))
    campaign = facts.campaign or detail.get("campaign_id")
    if campaign:
        scopes.append((tenant, "campaign", str(campaign)))
    for t, scope, key in scopes:
        for m in metrics:
            yield (t, scope, key, "", "", hour, m)
        for dim, value in (("site", site), ("source", source)):
            if value and (dim == "site" or scope != "domain"):
                for m in delivery:
                    yield (t, scope, key, dim, value, hour, m)
        if category:
            yield (t, scope, key, "category", category, hour, kind)
        if scope != "campaign":
            continue
        if facts.domain:
            for m in delivery:
                yield (t, scope, key, "domain", facts.domain, hour, m)
        if facts.variant:
            for m in metrics:
                if not m.startswith("ttd:"):
                    yield (t, scope, key, "variant", facts.variant, hour, m)
        if kind == "clicked" and detail.get("link_index") is not None:
            for m in metrics:
                yield (t, scope, key, "link", _clip(detail["link_index"]), hour, m)
        if kind in ("opened", "clicked") and not detail.get("machine") and client_of:
            client, device = client_of(detail.get("user_agent"))
            for m in metrics:
                yield (t, scope, key, "client", client, hour, m)
                yield (t, scope, key, "device", device, hour, m)


def _link(tenant: int, kind: str, detail: dict[str, Any], facts: Facts) -> dict[str, Any] | None:
    """A click's link, as ``campaign_links`` keeps it (the first URL seen wins)."""
    campaign = facts.campaign or detail.get("campaign_id")
    index, url = detail.get("link_index"), detail.get("url")
    if kind != "clicked" or not campaign or not isinstance(index, int) or not url:
        return None
    return {"campaign_id": int(campaign), "link_index": index, "tenant_id": tenant,
            "url": str(url)[:2000]}  # fmt: skip


def _insert_ignore(s: AsyncSession, model: Any) -> Any:
    pg = s.get_bind().dialect.name == "postgresql"
    return (postgresql if pg else sqlite).insert(model).on_conflict_do_nothing()


def _upsert(s: AsyncSession) -> Any:
    pg = s.get_bind().dialect.name == "postgresql"
    stmt = (postgresql if pg else sqlite).insert(StatHour)
    return stmt.on_conflict_do_update(
        index_elements=list(COLUMNS),
        set_={"n": StatHour.n + stmt.excluded.n},
    )


async def add_counts(s: AsyncSession, counts: Counter[Key]) -> None:
    """Add to the rollups' counts (in the caller's transaction), in key order (two
    writers of the same rows take their locks in the same order)."""
    if not counts:
        return
    rows = [dict(zip(COLUMNS, k, strict=True), n=n) for k, n in sorted(counts.items()) if n]
    await s.execute(_upsert(s), rows)


class Rollups:
    """The reader: :meth:`step` rolls up the next batch of events."""

    def __init__(
        self,
        sessions: Callable[[], Any],
        *,
        batch: int = BATCH,
        client_of: Callable[[str | None], tuple[str, str]] | None = None,
    ) -> None:
        self.sessions = sessions
        self.batch = batch
        self.client_of = client_of
        self._facts: OrderedDict[str, Facts] = OrderedDict()
        self.counted = 0

    def _keep(self, mid: str, facts: Facts) -> None:
        self._facts[mid] = facts
        self._facts.move_to_end(mid)
        while len(self._facts) > 50_000:
            self._facts.popitem(last=False)

    async def _lookup(self, s: AsyncSession, ids: set[str]) -> None:
        missing = [m for m in ids if m and m not in self._facts]
        for i in range(0, len(missing), 500):
            part = missing[i : i + 500]
            msgs = {
                mid: (mail_from, created)
                for mid, mail_from, created in (
                    await s.execute(
                        select(Message.id, Message.mail_from, Message.created_at).where(
                            Message.id.in_(part)
                        )
                    )
                ).all()
            }
            records = {
                mid: (cid, variant)
                for mid, cid, variant in (
                    await s.execute(
                        select(SendRecord.message_id, SendRecord.campaign_id, SendRecord.variant)
                        .where(SendRecord.message_id.in_(part))
                    )
                ).all()
            }  # fmt: skip
            for mid in part:
                mail_from, created = msgs.get(mid, ("", None))
                cid, variant = records.get(mid, (None, None))
                domain = (mail_from or "").rpartition("@")[2].lower()[:255]
                self._keep(mid, Facts(domain, created, cid, variant))

    async def step(self) -> int:
        """Roll up the next batch; the number of events read (0: none new, or another
        reader is at it)."""
        async with self.sessions() as s:
            # Nothing new (an idle appliance, every second): a read, no write.
            seen = await s.scalar(select(EventCursor.last_id).where(EventCursor.shard == CURSOR))
            newer = await s.scalar(select(Event.id).where(Event.id > (seen or 0)).limit(1))
            await s.rollback()
            if newer is None:
                return 0
            last = await hold_cursor(s, CURSOR)
            if last is None:
                await s.rollback()
                return 0
            rows = (
                await s.execute(
                    select(Event.id, Event.tenant_id, Event.ts, Event.type, Event.message_id,
                           Event.detail)
                    .where(Event.id > last)
                    .order_by(Event.id)
                    .limit(self.batch)
                )
            ).all()  # fmt: skip
            if not rows:
                await s.rollback()
                return 0
            try:
                await self._lookup(s, {r[4] for r in rows if r[4]})
                counts: Counter[Key] = Counter()
                links: dict[tuple[int, int], dict[str, Any]] = {}
                for _id, tenant, ts, kind, mid, detail in rows:
                    if tenant is None:
                        continue
                    detail = detail or {}
                    facts = self._facts.get(mid, NO_FACTS) if mid else NO_FACTS
                    counts.update(keys_of(tenant, kind, detail, facts, ts, self.client_of))
                    link = _link(tenant, kind, detail, facts)
                    if link is not None:
                        links.setdefault((link["campaign_id"], link["link_index"]), link)
                await add_counts(s, counts)
                if links:
                    await s.execute(_insert_ignore(s, CampaignLink), list(links.values()))
                await s.execute(
                    update(EventCursor)
                    .where(EventCursor.shard == CURSOR)
                    .values(last_id=rows[-1][0])
                )
                await s.commit()
            except BaseException:
                self._facts.clear()  # what was learnt may be of a rolled-back read
                raise
        self.counted += len(rows)
        return len(rows)

    async def behind(self) -> int:
        """Events not yet rolled up (for the metric and the tests)."""
        async with self.sessions() as s:
            last = await s.scalar(select(EventCursor.last_id).where(EventCursor.shard == CURSOR))
            return int(
                await s.scalar(select(func.count(Event.id)).where(Event.id > (last or 0))) or 0
            )
