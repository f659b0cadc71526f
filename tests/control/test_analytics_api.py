"""The analytics API (issue 23; control.analytics, docs/api.md "Analytics"): a
campaign's, a tenant's, a sending domain's and the providers' figures, from events
rolled up by the real pass (store.rollups), as JSON and as CSV; one tenant never sees
another's; bad ranges, buckets and tables answer 422 naming the parameter."""

from __future__ import annotations

import csv
import datetime as dt
import io
from collections import Counter
from typing import Any

import pytest
from scipy.stats import chi2_contingency
from sqlalchemy import insert, select

from postwarden.control.csvfile import unescape_cell
from postwarden.store.campaign_models import Campaign, SendRecord
from postwarden.store.models import Event, Message, Tenant
from postwarden.store.rollups import ALL, Key, Rollups, add_counts
from tests.control.conftest import ControlApi, ControlFactory

T0 = dt.datetime(2026, 11, 20, 10, 10, tzinfo=dt.UTC)
H10 = dt.datetime(2026, 11, 20, 10, tzinfo=dt.UTC)
DAY = "since=2026-11-20T00:00:00Z&until=2026-11-21T00:00:00Z"
THUNDERBIRD, APPLE = "Thunderbird/115.0", "iPhone Mail (20A362)"


def _client_of(ua: str | None) -> tuple[str, str]:
    return ("Thunderbird", "desktop") if "Thunderbird" in (ua or "") else ("Apple Mail", "mobile")


def _ev(tenant: int, at: dt.datetime, kind: str, mid: str, **detail: object) -> dict[str, Any]:
    return {"tenant_id": tenant, "ts": at, "type": kind, "message_id": mid, "tags": "",
            "detail": detail}  # fmt: skip


def _s(seconds: float) -> dt.datetime:
    return T0 + dt.timedelta(seconds=seconds)


async def _tenant_id(api: ControlApi, name: str) -> int:
    async with api.app.control.sessions() as s:
        return int(await s.scalar(select(Tenant.id).where(Tenant.name == name)))


async def _world(api: ControlApi) -> dict[str, Any]:
    """Two tenants' mail on 2026-11-20, rolled up by the real pass: acme's campaign
    (variants a and b, four recipients), an API message from another sending domain
    of acme, and one delivery of the other tenant's campaign."""
    acme_key, other_key = await api.tenant("acme"), await api.tenant("other")
    a, o = await _tenant_id(api, "acme"), await _tenant_id(api, "other")
    plane = api.app.control
    if plane.analytics is not None:  # this test rolls up itself, with a client parser
        await plane.analytics.stop()
    sessions = plane.sessions
    async with sessions() as s:
        ab = {"variants": [{"name": "a"}, {"name": "b"}], "metric": "clicks"}
        camp = Campaign(tenant_id=a, name="news", audience_id=1, template_id=1,
                        from_email="news@acme.test", ab=ab)  # fmt: skip
        theirs = Campaign(tenant_id=o, name="theirs", audience_id=1, template_id=1,
                          from_email="x@other.test")  # fmt: skip
        s.add_all([camp, theirs])
        await s.flush()
        for i, variant in enumerate("aabb"):
            s.add(SendRecord(tenant_id=a, campaign_id=camp.id, contact_id=i + 1,
                             email=f"r{i}@inbox.test", variant=variant,
                             message_id=f"c{i}"))  # fmt: skip
        s.add(SendRecord(tenant_id=o, campaign_id=theirs.id, contact_id=9,
                         email="z@inbox.test", message_id="o"))  # fmt: skip
        for mid, tenant, sender in [*((f"c{i}", a, "news@acme.test") for i in range(4)),
                                    ("api", a, "App@Mail.Acme.test"),
                                    ("o", o, "x@other.test")]:  # fmt: skip
            s.add(Message(id=mid, tenant_id=tenant, created_at=T0, mail_from=sender))
        await s.commit()
        cid, other_cid = camp.id, theirs.id
    gmail = {"site": "gmail", "source": "ip1"}
    yahoo = {"site": "yahoo", "source": "ip2"}
    small = {"site": "mx:mx.small.test", "source": "ip2"}
    tb = {"campaign_id": cid, "user_agent": THUNDERBIRD}
    apple = {"campaign_id": cid, "user_agent": APPLE}
    events = [
        *(_ev(a, T0, "accepted", m) for m in ("c0", "c1", "c2", "c3", "api")),
        _ev(a, _s(42), "delivered", "c0", **gmail),  # 42 s: (30, 60]
        _ev(a, _s(3), "delivered", "c1", **gmail),  # (1, 5]
        _ev(a, _s(400), "delivered", "c2", **yahoo),  # (300, 900]
        _ev(a, _s(10), "deferred", "c3", **gmail),
        _ev(a, _s(3600), "bounced", "c3", category="user_unknown", hard=True, **gmail),
        _ev(a, _s(20), "deferred", "api", **small),
        _ev(a, _s(1800), "bounced", "api", category="policy_blocked", hard=False, **small),
        _ev(a, _s(300), "opened", "c0", machine=False, first=True, **tb),
        _ev(a, _s(310), "opened", "c0", machine=False, **tb),
        _ev(a, _s(311), "opened", "c0", machine=True, **tb),
        _ev(a, _s(320), "opened", "c2", machine=False, first=True, **apple),
        # A click's URL as the verdict pass writes it: the first seen names the link.
        _ev(
            a,
            _s(330),
            "clicked",
            "c0",
            machine=False,
            first=True,
            link_index=0,
            url="https://acme.test/a",
            **tb,
        ),
        _ev(
            a,
            _s(340),
            "clicked",
            "c0",
            machine=False,
            link_index=0,
            url="https://acme.test/a?again",
            **tb,
        ),
        _ev(
            a,
            _s(350),
            "clicked",
            "c2",
            machine=False,
            first=True,
            link_index=1,
            url='=HYPERLINK("x")',
            **apple,
        ),
        _ev(a, _s(351), "clicked", "c2", machine=True, link_index=1, url="https://b", **apple),
        _ev(a, _s(360), "unsubscribed", "c2", campaign_id=cid),
        _ev(a, _s(3700), "complained", "c1"),
        _ev(o, _s(5), "delivered", "o", **gmail),
    ]
    async with sessions() as s:
        await s.execute(insert(Event), events)
        # What other writers put in the rollups: the campaign's recipients (the
        # feeder's) and the shaper's throttling changes (the appliance's, per site).
        extra: Counter[Key] = Counter()
        for metric, n in (("recipients", 5), ("skipped", 1)):
            extra[(a, "campaign", str(cid), "", "", H10, metric)] = n
        for metric, n in (("throttle_actions", 3), ("rate_down", 2), ("rate_up", 1)):
            extra[(ALL, "tenant", "", "site", "gmail", H10, metric)] = n
        await add_counts(s, extra)
        await s.commit()
    rollups = Rollups(sessions, client_of=_client_of)
    while await rollups.step():
        pass
    assert await rollups.behind() == 0
    return {"acme": acme_key, "other": other_key, "cid": cid, "other_cid": other_cid}


def _delivery(attempts: int, delivered: int, deferred: int, bounced: int, blocked: int,
              rates: tuple[Any, Any, Any], ttd: tuple[Any, Any]) -> dict[str, Any]:  # fmt: skip
    return {"attempts": attempts, "delivered": delivered, "deferred": deferred,
            "bounced": bounced, "expired": 0, "blocked": blocked,
            "acceptance_rate": rates[0], "deferral_rate": rates[1], "block_rate": rates[2],
            "median_ttd_seconds": ttd[0], "p90_ttd_seconds": ttd[1]}  # fmt: skip


GMAIL = _delivery(4, 2, 1, 1, 0, (0.5, 0.25, 0.0), (5.0, 54.0))
YAHOO = _delivery(1, 1, 0, 0, 0, (1.0, 0.0, 0.0), (600.0, 840.0))
OTHER = _delivery(2, 0, 1, 1, 1, (0.0, 0.5, 0.5), (None, None))


def _csv(r: Any) -> list[dict[str, str]]:
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/csv")
    return list(csv.DictReader(io.StringIO(r.text)))


async def test_a_campaigns_analytics(control: ControlFactory) -> None:
    api = await control()
    w = await _world(api)
    async with api.client(w["acme"]) as c:
        r = await c.get(f"/v1/campaigns/{w['cid']}/analytics")
        assert r.status_code == 200, r.text
        got = r.json()
        day = (await c.get(f"/v1/campaigns/{w['cid']}/analytics?bucket=day")).json()
        links_csv = _csv(await c.get(f"/v1/campaigns/{w['cid']}/analytics?format=csv&table=links"))
        totals_csv = _csv(
            await c.get(f"/v1/campaigns/{w['cid']}/analytics?format=csv&table=totals")
        )
        sites_csv = _csv(await c.get(f"/v1/campaigns/{w['cid']}/analytics?format=csv&table=sites"))
        # The other tenant's campaign is not there for acme, and the other tenant's
        # campaign shows its own delivery only.
        r = await c.get(f"/v1/campaigns/{w['other_cid']}/analytics")
        assert r.status_code == 404, r.text
    async with api.client(w["other"]) as c:
        theirs = (await c.get(f"/v1/campaigns/{w['other_cid']}/analytics")).json()
        r = await c.get(f"/v1/campaigns/{w['cid']}/analytics")
        assert r.status_code == 404, r.text
    assert theirs["totals"]["delivered"] == 1 and theirs["totals"]["accepted"] == 0
    assert [s["site"] for s in theirs["sites"]] == ["gmail"] and theirs["links"] == []

    assert got["campaign_id"] == w["cid"]
    t = got["totals"]
    assert {k: t[k] for k in ("recipients", "skipped", "accepted", "delivered", "deferred",
                              "bounced", "bounced_hard", "bounced_soft", "blocked", "expired",
                              "complained", "unsubscribed", "opened", "opened_unique",
                              "opened_machine", "clicked", "clicked_unique",
                              "clicked_machine")} == {
        "recipients": 5, "skipped": 1, "accepted": 4, "delivered": 3, "deferred": 1,
        "bounced": 1, "bounced_hard": 1, "bounced_soft": 0, "blocked": 0, "expired": 0,
        "complained": 1, "unsubscribed": 1, "opened": 3, "opened_unique": 2,
        "opened_machine": 1, "clicked": 3, "clicked_unique": 2, "clicked_machine": 1,
    }  # fmt: skip
    assert not any(k.startswith("ttd:") for k in t)
    assert got["rates"] == {
        "delivery_rate": 0.75, "bounce_rate": 0.25, "hard_bounce_rate": 0.25,
        "complaint_rate": 0.3333, "unsubscribe_rate": 0.3333, "unique_open_rate": 0.6667,
        "click_rate": 0.6667, "click_to_open_rate": 1.0,
    }  # fmt: skip
    # 3 s, 42 s, 400 s: the median half way into (30, 60], the p90 70 % into (300, 900].
    assert (got["median_ttd_seconds"], got["p90_ttd_seconds"]) == (45.0, 720.0)
    zero = dict.fromkeys(("accepted", "delivered", "deferred", "bounced", "complained",
                          "unsubscribed", "opened", "opened_unique", "clicked",
                          "clicked_unique"), 0)  # fmt: skip
    h10 = {**zero, "accepted": 4, "delivered": 3, "deferred": 1, "unsubscribed": 1,
           "opened": 3, "opened_unique": 2, "clicked": 3, "clicked_unique": 2}  # fmt: skip
    h11 = {**zero, "bounced": 1, "complained": 1}
    assert got["timeline"] == [{"at": "2026-11-20T10:00:00Z", **h10},
                               {"at": "2026-11-20T11:00:00Z", **h11}]  # fmt: skip
    assert day["timeline"] == [{"at": "2026-11-20T00:00:00Z", **{k: h10[k] + h11[k] for k in zero}}]
    assert got["bounces_by_category"] == [{"category": "user_unknown", "bounced": 1, "expired": 0}]
    assert got["links"] == [
        {"link": 0, "url": "https://acme.test/a", "clicks": 2, "unique_clicks": 1,
         "machine_clicks": 0},
        {"link": 1, "url": '=HYPERLINK("x")', "clicks": 1, "unique_clicks": 1,
         "machine_clicks": 1},
    ]  # fmt: skip
    assert got["clients"] == [
        {"client": "Thunderbird", "opens": 2, "unique_opens": 1, "clicks": 2, "unique_clicks": 1},
        {"client": "Apple Mail", "opens": 1, "unique_opens": 1, "clicks": 1, "unique_clicks": 1},
    ]
    assert [(d["device"], d["opens"]) for d in got["devices"]] == [("desktop", 2), ("mobile", 1)]
    assert got["sites"] == [{"site": "gmail", **GMAIL}, {"site": "yahoo", **YAHOO}]
    assert got["sources"] == [{"source": "ip1", **GMAIL}, {"source": "ip2", **YAHOO}]
    assert got["domains"] == [
        {"domain": "acme.test", **_delivery(5, 3, 1, 1, 0, (0.6, 0.2, 0.0), (45.0, 720.0))}
    ]
    # Variant a: c0 and c1 delivered, c0 opened and clicked; b: c2 delivered, opened
    # and clicked (c3 bounced). The test is the chi-squared test of the A/B decision.
    p = chi2_contingency([[1, 1], [1, 0]]).pvalue
    assert got["variants"] == [
        {"variant": "a", "delivered": 2, "unique_opens": 1, "unique_clicks": 1,
         "unique_open_rate": 0.5, "click_rate": 0.5, "click_p_value": pytest.approx(p),
         "open_p_value": pytest.approx(p)},
        {"variant": "b", "delivered": 1, "unique_opens": 1, "unique_clicks": 1,
         "unique_open_rate": 1.0, "click_rate": 1.0, "click_p_value": None,
         "open_p_value": None},
    ]  # fmt: skip
    assert got["significance"] == {"metric": "unique_clicks", "p_value": pytest.approx(p),
                                   "significant": False, "best": "b"}  # fmt: skip

    # CSV: the same numbers, read back with the csv module.
    assert [(int(r["link"]), unescape_cell(r["url"]), int(r["clicks"]), int(r["machine_clicks"]))
            for r in links_csv] == [(x["link"], x["url"], x["clicks"], x["machine_clicks"])
                                    for x in got["links"]]  # fmt: skip
    assert links_csv[1]["url"] == '\'=HYPERLINK("x")'  # no formula in a spreadsheet
    (row,) = totals_csv
    assert {k: int(row[k]) for k in t} == t
    assert float(row["delivery_rate"]) == 0.75 and row["median_ttd_seconds"] == "45.0"
    assert list(sites_csv[0]) == [
        "site", "attempts", "delivered", "deferred", "bounced", "expired", "blocked",
        "acceptance_rate", "deferral_rate", "block_rate", "median_ttd_seconds",
        "p90_ttd_seconds",
    ]  # fmt: skip
    assert [(r["site"], int(r["attempts"]), float(r["acceptance_rate"])) for r in sites_csv] == [
        ("gmail", 4, 0.5), ("yahoo", 1, 1.0)]  # fmt: skip


async def test_tenant_domain_and_provider_analytics(control: ControlFactory) -> None:
    api = await control()
    w = await _world(api)
    async with api.client(w["acme"]) as c:
        got = (await c.get(f"/v1/analytics/overview?{DAY}")).json()
        hourly = (await c.get(f"/v1/analytics/overview?{DAY}&bucket=hour")).json()
        later = (await c.get("/v1/analytics/overview?since=2026-11-21T00:00:00Z&"
                             "until=2026-11-22T00:00:00Z")).json()  # fmt: skip
        default = (await c.get("/v1/analytics/overview")).json()
        sub = (await c.get(f"/v1/analytics/domains/Mail.Acme.test?{DAY}")).json()
        main = (await c.get(f"/v1/analytics/domains/acme.test?{DAY}")).json()
        # Another tenant's sending domain is not this tenant's to read.
        r = await c.get(f"/v1/analytics/domains/other.test?{DAY}")
        assert r.status_code == 404 and "other.test" not in r.text.replace(
            "/v1/analytics/domains/other.test", ""
        ), r.text
        # One of its own domains that sent nothing in the range: zeros.
        r = await c.post("/v1/domains", json={"name": "quiet.acme.test"})
        assert r.status_code == 201, r.text
        none = (await c.get(f"/v1/analytics/domains/quiet.acme.test?{DAY}")).json()
        prov = (await c.get(f"/v1/analytics/providers?{DAY}")).json()
        prov_csv = _csv(await c.get(f"/v1/analytics/providers?{DAY}&format=csv&table=providers"))
        cats_csv = _csv(await c.get(f"/v1/analytics/overview?{DAY}&format=csv&table=categories"))
        r = await c.get(f"/v1/analytics/appliance/providers?{DAY}")
        assert r.status_code == 403, r.text  # a tenant key: its own tenant's only
    async with api.client(w["other"]) as c:
        theirs = (await c.get(f"/v1/analytics/overview?{DAY}")).json()
        their_prov = (await c.get(f"/v1/analytics/providers?{DAY}")).json()
    async with api.client(api.admin_key) as c:
        r = await c.get(f"/v1/analytics/appliance/providers?{DAY}")
        assert r.status_code == 200, r.text
        appliance = r.json()
        r = await c.get(f"/v1/analytics/overview?{DAY}")
        assert r.status_code == 403, r.text  # an operator key has no tenant

    assert (got["since"], got["until"]) == ("2026-11-20T00:00:00Z", "2026-11-21T00:00:00Z")
    t = got["totals"]
    assert {k: t[k] for k in ("accepted", "delivered", "deferred", "bounced", "bounced_hard",
                              "bounced_soft", "blocked", "complained", "unsubscribed",
                              "opened", "clicked", "recipients")} == {
        "accepted": 5, "delivered": 3, "deferred": 2, "bounced": 2, "bounced_hard": 1,
        "bounced_soft": 1, "blocked": 1, "complained": 1, "unsubscribed": 1, "opened": 3,
        "clicked": 3, "recipients": 0,
    }  # fmt: skip
    assert got["rates"]["delivery_rate"] == 0.6 and got["rates"]["bounce_rate"] == 0.4
    assert [p["at"] for p in got["timeline"]] == ["2026-11-20T00:00:00Z"]
    assert got["timeline"][0]["delivered"] == 3 and got["timeline"][0]["bounced"] == 2
    assert [(p["at"], p["bounced"]) for p in hourly["timeline"]] == [
        ("2026-11-20T10:00:00Z", 1), ("2026-11-20T11:00:00Z", 1)]  # fmt: skip
    assert got["sites"] == [{"site": "gmail", **GMAIL}, {"site": "other", **OTHER},
                            {"site": "yahoo", **YAHOO}]  # fmt: skip
    assert [(s["source"], s["attempts"], s["blocked"]) for s in got["sources"]] == [
        ("ip1", 4, 0), ("ip2", 3, 1)]  # fmt: skip
    assert got["categories"] == [
        {"category": "policy_blocked", "bounced": 1, "expired": 0},
        {"category": "user_unknown", "bounced": 1, "expired": 0},
    ]
    assert [(r["category"], int(r["bounced"])) for r in cats_csv] == [
        ("policy_blocked", 1), ("user_unknown", 1)]  # fmt: skip
    # Outside the range: nothing; the default range is the last 30 days, in hours.
    assert later["totals"]["delivered"] == 0 and later["timeline"] == [] and later["sites"] == []
    since = dt.datetime.fromisoformat(default["since"])
    until = dt.datetime.fromisoformat(default["until"])
    assert until - since == dt.timedelta(days=30) and until.minute == 0
    assert until >= dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)

    # The other tenant's overview: its one delivery, none of acme's.
    assert theirs["totals"]["delivered"] == 1 and theirs["totals"]["accepted"] == 0
    assert [s["site"] for s in theirs["sites"]] == ["gmail"]

    # Sending domains, as the envelope sender's (lower case).
    assert sub["domain"] == "mail.acme.test"
    assert (sub["totals"]["accepted"], sub["totals"]["blocked"]) == (1, 1)
    assert sub["sites"] == [{"site": "other", **OTHER}]
    assert [c["category"] for c in sub["categories"]] == ["policy_blocked"]
    assert main["totals"]["delivered"] == 3 and main["rates"]["delivery_rate"] == 0.75
    assert none["totals"]["delivered"] == 0 and none["sites"] == []

    # Providers: the tenant's attempts; the shaper's throttling changes are the
    # appliance's (null in a tenant's answer: they would tell of other tenants').
    hidden = dict.fromkeys(("throttle_actions", "rate_down", "rate_up"))
    assert prov["providers"] == [
        {"site": "gmail", **GMAIL, **hidden},
        {"site": "other", **OTHER, **hidden},
        {"site": "yahoo", **YAHOO, **hidden},
    ]
    assert [{k: r[k] for k in ("site", "attempts", "block_rate", "throttle_actions")}
            for r in prov_csv] == [{"site": "gmail", "attempts": "4", "block_rate": "0.0",
                                    "throttle_actions": ""},
                                   {"site": "other", "attempts": "2", "block_rate": "0.5",
                                    "throttle_actions": ""},
                                   {"site": "yahoo", "attempts": "1", "block_rate": "0.0",
                                    "throttle_actions": ""}]  # fmt: skip
    assert their_prov["providers"] == [
        {"site": "gmail", **_delivery(1, 1, 0, 0, 0, (1.0, 0.0, 0.0), (3.0, 4.6)), **hidden}
    ]
    # The appliance's: every tenant's attempts, and the throttling changes per site.
    by_site = {p["site"]: p for p in appliance["providers"]}
    assert set(by_site) == {"gmail", "other", "yahoo"}
    assert (by_site["gmail"]["attempts"], by_site["gmail"]["delivered"]) == (5, 3)
    assert {k: by_site["gmail"][k] for k in hidden} == {
        "throttle_actions": 3,
        "rate_down": 2,
        "rate_up": 1,
    }
    assert by_site["yahoo"]["throttle_actions"] == 0


@pytest.mark.sqlite_only
@pytest.mark.parametrize(
    ("query", "path"),
    [
        ("since=2026-11-21T00:00:00Z&until=2026-11-20T00:00:00Z", "until"),
        ("since=2026-11-20T00:00:00Z&until=2026-11-20T00:00:00Z", "until"),
        ("since=2025-01-01T00:00:00Z&until=2026-11-20T00:00:00Z", "until"),
        ("since=2026-11-20T00:00:00", "since"),
        ("until=9999-12-31T23:30:00Z", "until"),
        ("until=0001-01-02T00:00:00Z", "until"),
        ("bucket=week", "bucket"),
        ("format=csv&table=links", "table"),
        ("format=csv", "table"),
        ("table=sites", "table"),
        ("format=xml", "format"),
        ("scope=appliance", "scope"),
    ],
)
async def test_bad_ranges_buckets_and_tables_are_refused(
    control: ControlFactory, query: str, path: str
) -> None:
    api = await control()
    key = await api.tenant("acme")
    async with api.client(key) as c:
        r = await c.get(f"/v1/analytics/overview?{query}")
        assert r.status_code == 422, r.text
        assert r.json()["error"]["fields"][0]["path"] == path


@pytest.mark.sqlite_only
async def test_a_campaigns_unknown_table_is_refused(control: ControlFactory) -> None:
    api = await control()
    key = await api.tenant("acme")
    async with api.client(key) as c:
        async with api.app.control.sessions() as s:
            tid = int(await s.scalar(select(Tenant.id).where(Tenant.name == "acme")))
            camp = Campaign(tenant_id=tid, name="c", audience_id=1, template_id=1,
                            from_email="news@acme.test")  # fmt: skip
            s.add(camp)
            await s.commit()
            cid = camp.id
        r = await c.get(f"/v1/campaigns/{cid}/analytics?format=csv&table=categories")
        assert r.status_code == 422 and r.json()["error"]["fields"][0]["path"] == "table"
        r = await c.get(f"/v1/campaigns/{cid}/analytics?format=csv&table=variants")
        assert _csv(r) == []  # a header row, and no variant
        assert r.text.startswith("variant,delivered,")
        r = await c.get(f"/v1/campaigns/{cid}/analytics")
        got = r.json()
        assert got["significance"] is None and got["variants"] == []
        assert set(got["rates"].values()) == {None}  # nothing accepted, nothing delivered
        assert got["totals"]["delivered"] == 0 and got["timeline"] == []
        r = await c.get(f"/v1/campaigns/{cid + 1000}/analytics")
        assert r.status_code == 404
