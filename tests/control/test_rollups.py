"""Events into the hourly rollups (issue 23; store.rollups, docs/analytics.md): each
event counted once, by tenant, campaign (with its variant, links, clients), sending
domain and the appliance, whole and by provider site, source and bounce category; on
SQLite and on PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
from collections import defaultdict
from pathlib import Path

import pytest
from sqlalchemy import insert, select

from postwarden.store.analytics_models import StatHour
from postwarden.store.availability import is_unavailable
from postwarden.store.campaign_models import Campaign, SendRecord
from postwarden.store.db import create_engine, sessionmaker
from postwarden.store.models import Event, EventCursor, Message, Tenant
from postwarden.store.rollups import ALL, Rollups, ttd_metric
from tests.control.test_database_outage import own_postgres  # noqa: F401  (the fixture)
from tests.pg import PgServer
from tests.waiting import eventually

T0 = dt.datetime(2026, 12, 7, 2, 10, tzinfo=dt.UTC)
H2 = dt.datetime(2026, 12, 7, 2, tzinfo=dt.UTC)
H3 = dt.datetime(2026, 12, 7, 3, tzinfo=dt.UTC)


def test_time_to_deliver_buckets() -> None:
    assert ttd_metric(0.2) == "ttd:1"
    assert ttd_metric(1.0) == "ttd:1"
    assert ttd_metric(45) == "ttd:60"
    assert ttd_metric(86400) == "ttd:86400"
    assert ttd_metric(86401) == "ttd:inf"


def _ev(tenant: int, ts: dt.datetime, kind: str, mid: str, **detail: object) -> dict[str, object]:
    return {"tenant_id": tenant, "ts": ts, "type": kind, "message_id": mid, "tags": "",
            "detail": detail}  # fmt: skip


async def _counts(sessions: object) -> dict[tuple[object, ...], int]:
    out: dict[tuple[object, ...], int] = defaultdict(int)
    async with sessions() as s:  # type: ignore[operator]
        for r in (await s.execute(select(StatHour))).scalars():
            out[(r.tenant_id, r.scope, r.key, r.dim, r.value, r.hour, r.metric)] += r.n
    return out


async def test_events_roll_up_once_each(migrated_url: str) -> None:
    engine = create_engine(migrated_url)
    sessions = sessionmaker(engine)
    try:
        async with sessions() as s:
            acme, other = Tenant(name="acme"), Tenant(name="other")
            s.add_all([acme, other])
            await s.flush()
            camp = Campaign(tenant_id=acme.id, name="c", audience_id=1, template_id=1,
                            from_email="news@acme.test")  # fmt: skip
            s.add(camp)
            await s.flush()
            for i, variant in enumerate(["a", "b"]):
                s.add(SendRecord(tenant_id=acme.id, campaign_id=camp.id, contact_id=i + 1,
                                 email=f"r{i}@gmail.test", variant=variant,
                                 message_id=f"c{i}"))  # fmt: skip
            for mid, tenant, sender in [("c0", acme.id, "news@acme.test"),
                                        ("c1", acme.id, "news@acme.test"),
                                        ("api", acme.id, "App@Mail.Acme.test"),
                                        ("o", other.id, "x@other.test")]:  # fmt: skip
                s.add(Message(id=mid, tenant_id=tenant, created_at=T0, mail_from=sender))
            await s.commit()
            a, o = acme.id, other.id
        later = T0 + dt.timedelta(seconds=42)
        gmail = {"site": "gmail", "source": "ip1", "mx": "mx.gmail.test"}
        rows = [
            _ev(a, T0, "accepted", "c0"),
            _ev(a, T0, "accepted", "c1"),
            _ev(a, T0, "accepted", "api"),
            _ev(a, later, "delivered", "c0", **gmail),
            _ev(a, later, "deferred", "c1", **gmail),
            _ev(a, T0 + dt.timedelta(hours=1), "bounced", "c1", category="user_unknown",
                hard=True, **gmail),
            _ev(a, later, "delivered", "api", site="mx:mx.small.test", source="ip2",
                mx="mx.small.test"),
            _ev(a, later, "bounced", "api", category="policy_blocked", hard=False,
                site="mx:mx.small.test", source="ip2", mx="mx.small.test"),
            _ev(a, later, "opened", "c0", machine=False, first=True, campaign_id=camp.id,
                user_agent="Mozilla/5.0"),
            _ev(a, later, "opened", "c0", machine=False, campaign_id=camp.id),
            _ev(a, later, "opened", "c0", machine=True, campaign_id=camp.id),
            _ev(a, later, "clicked", "c0", machine=False, first=True, campaign_id=camp.id,
                link_index=2, url="https://acme.test/x"),
            _ev(o, later, "delivered", "o", site="gmail", source="ip1", mx="mx.gmail.test"),
        ]  # fmt: skip
        async with sessions() as s:
            await s.execute(insert(Event), rows[:7])
            await s.commit()
        rollups = Rollups(sessions, batch=3, client_of=lambda ua: ("other", "desktop"))
        assert [await rollups.step() for _ in range(4)] == [3, 3, 1, 0]
        async with sessions() as s:  # events that come later are read after the cursor
            await s.execute(insert(Event), rows[7:])
            await s.commit()
        # A second reader (a restart: nothing cached) takes up where the first stopped.
        again = Rollups(sessions, batch=100)
        again.client_of = rollups.client_of
        assert await again.step() == len(rows) - 7
        assert await again.step() == 0
        assert await again.behind() == 0
        got = await _counts(sessions)
        cid = str(camp.id)

        def n(tenant: int, scope: str, key: str, metric: str, dim: str = "", value: str = "",
              hour: dt.datetime = H2) -> int:  # fmt: skip
            return got.get((tenant, scope, key, dim, value, hour, metric), 0)

        assert n(a, "tenant", "", "accepted") == 3
        assert n(a, "tenant", "", "delivered") == 2
        assert n(a, "tenant", "", "ttd:60") == 2  # accepted at T0, delivered 42 s later
        assert n(a, "tenant", "", "bounced", hour=H3) == 1
        assert n(a, "tenant", "", "bounced_hard", hour=H3) == 1
        assert n(a, "tenant", "", "bounced_soft") == 1
        assert n(a, "tenant", "", "blocked") == 1
        assert n(a, "tenant", "", "blocked", hour=H3) == 0
        assert n(a, "tenant", "", "bounced", "category", "policy_blocked") == 1
        assert n(a, "tenant", "", "delivered", "site", "gmail") == 1
        assert n(a, "tenant", "", "delivered", "site", "other") == 1  # mx:… sites as one
        assert n(a, "tenant", "", "deferred", "source", "ip1") == 1
        assert n(a, "tenant", "", "opened") == 2
        assert n(a, "tenant", "", "opened_unique") == 1
        assert n(a, "tenant", "", "opened_machine") == 1
        # The campaign's counts, and by variant, link, client and device.
        assert n(a, "campaign", cid, "accepted") == 2
        assert n(a, "campaign", cid, "delivered", "variant", "a") == 1
        assert n(a, "campaign", cid, "bounced", "variant", "b", hour=H3) == 1
        assert n(a, "campaign", cid, "delivered", "domain", "acme.test") == 1
        assert n(a, "campaign", cid, "clicked", "link", "2") == 1
        assert n(a, "campaign", cid, "clicked_unique", "link", "2") == 1
        assert n(a, "campaign", cid, "opened", "client", "other") == 2
        assert n(a, "campaign", cid, "opened_unique", "device", "desktop") == 1
        assert n(a, "campaign", cid, "opened_machine", "client", "other") == 0
        # The sending domain's (the envelope sender's, lower case).
        assert n(a, "domain", "mail.acme.test", "delivered") == 1
        assert n(a, "domain", "acme.test", "deferred", "site", "gmail") == 1
        # The appliance's: every tenant's; each tenant's own are its only.
        assert n(ALL, "tenant", "", "delivered") == 3
        assert n(o, "tenant", "", "delivered") == 1
        assert n(o, "campaign", cid, "delivered") == 0
    finally:
        await engine.dispose()


async def test_shaping_changes_are_counted_once(migrated_url: str, tmp_path: Path) -> None:
    """The broker's changes (a real shaping service's, read through its "changes" op)
    into the appliance's counts by site and source: each once, across a restart of the
    reader (its cursor is in the database) and a page size of a few; a restarted
    broker's are counted from its first."""
    from postwarden.control.analytics_pass import AnalyticsPass
    from postwarden.shaping import service as shaping_service
    from postwarden.shaping.service import ShapingService
    from tests.shaping.test_change_log import one_source

    cfg = one_source(tmp_path)
    svc = ShapingService(cfg)

    async def command(**args: object) -> dict[str, object]:
        return svc.command(dict(args))

    engine = create_engine(migrated_url)
    sessions = sessionmaker(engine)
    page = shaping_service.CHANGES_PAGE
    shaping_service.CHANGES_PAGE = 3  # several pages
    try:
        # A first push-back at each of five sites: a "down" each.
        for site in ("gmail", "outlook", "icloud", "mx:mx3.test", "mx:mx4.test"):
            svc.broker.report("a", site, 451, "4.3.0", "busy")
        reader = AnalyticsPass(sessions, shaping=command)
        assert await reader.read_changes() == 5
        assert await reader.read_changes() == 0
        svc.broker.report("a", "yahoo", 451, "4.3.0", "busy")
        again = AnalyticsPass(sessions, shaping=command)  # a restarted control plane
        assert await again.read_changes() == 1
        got = await _counts(sessions)
        by: dict[tuple[str, str], int] = defaultdict(int)
        for k, n in got.items():
            if k[:3] == (ALL, "tenant", "") and k[6] == "rate_down":
                by[(k[3], k[4])] += n
        assert by == {("", ""): 6, ("site", "gmail"): 1, ("site", "outlook"): 1,
                      ("site", "icloud"): 1, ("site", "other"): 2, ("site", "yahoo"): 1,
                      ("source", "a"): 6}  # fmt: skip
        svc2 = ShapingService(cfg)  # the broker restarted: a new epoch, seq from 1
        svc2.broker.report("a", "gmail", 451, "4.3.0", "busy")
        svc = svc2
        assert await again.read_changes() == 1
        async with sessions() as s:
            shards = list((await s.execute(select(EventCursor.shard))).scalars())
        assert [x for x in shards if x.startswith("shaping:")] == [f"shaping:{svc2.broker.epoch}"]
    finally:
        shaping_service.CHANGES_PAGE = page
        await engine.dispose()


async def test_the_database_stopped_mid_rollup_counts_each_event_once(
    request: pytest.FixtureRequest,
) -> None:
    """PostgreSQL stopped between two batches and started again: the step in between
    fails as the database's absence (the pass waits and tries again), and the events
    are then counted once each: the cursor moved only with what was committed."""
    server: PgServer = request.getfixturevalue("own_postgres")  # stopped, restarted
    engine = create_engine(server.new_database())
    sessions = sessionmaker(engine)
    try:
        async with sessions() as s:
            acme = Tenant(name="acme")
            s.add(acme)
            await s.flush()
            rows = [_ev(acme.id, T0, "delivered", f"m{i}", site="gmail") for i in range(30)]
            await s.execute(insert(Event), rows)
            await s.commit()
            tid = acme.id
        rollups = Rollups(sessions, batch=10)
        assert await rollups.step() == 10
        await asyncio.to_thread(server.stop)
        with pytest.raises(Exception) as failed:
            await rollups.step()
        assert is_unavailable(failed.value), failed.value
        await asyncio.to_thread(server.restart)
        read = []

        async def drained() -> bool:
            with contextlib.suppress(Exception):  # a pooled connection of before the stop
                read.append(await rollups.step())
            return bool(read) and read[-1] == 0

        await eventually(drained, 30, "the rest rolled up")
        got = await _counts(sessions)
        assert got[(tid, "tenant", "", "", "", H2, "delivered")] == 30
        assert got[(tid, "tenant", "", "site", "gmail", H2, "delivered")] == 30
        assert got[(ALL, "tenant", "", "", "", H2, "delivered")] == 30
    finally:
        await engine.dispose()
