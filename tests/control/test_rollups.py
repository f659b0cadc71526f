"""Events into the hourly rollups (issue 23; store.rollups, docs/analytics.md): each
event counted once, by tenant, campaign (with its variant, links, clients), sending
domain and the appliance, whole and by provider site, source and bounce category; on
SQLite and on PostgreSQL."""

from __future__ import annotations

import datetime as dt
from collections import defaultdict

from sqlalchemy import insert, select

from postwarden.store.analytics_models import StatHour
from postwarden.store.campaign_models import Campaign, SendRecord
from postwarden.store.db import create_engine, sessionmaker
from postwarden.store.models import Event, Message, Tenant
from postwarden.store.rollups import ALL, Rollups, ttd_metric

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
