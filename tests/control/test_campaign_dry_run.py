"""POST /v1/campaigns/{id}/dry-run through the API: the recipients and the suppressed
by reason (the same as the launch then writes), a sample rendered with the links and
List-Unsubscribe fields the real messages carry, validation's problems reported but
not blocking, the state and history untouched, and a finish time that follows a
warming plan started through /v1/warming, the shaping rules' rate and the send window
exactly as ``predict_finish`` computes it by hand."""

from __future__ import annotations

import collections
import datetime as dt
import email
import email.policy
from pathlib import Path
from typing import Any

import httpx
import pytest

from postwarden.campaigns.windows import SourceLimit, parse_window, predict_finish
from postwarden.control.standalone import ControlService
from postwarden.warming.plans import make_plan
from tests.control.conftest import ControlFactory
from tests.control.test_audiences import SLOW_RULE, many_contacts
from tests.control.test_campaign_ab import ab
from tests.control.test_campaign_send import FAST, approved_campaign, stats_when
from tests.control.test_campaigns import act, setup
from tests.control.test_messages import ready_tenant


async def dry_run(c: httpx.AsyncClient, cid: int, **body: Any) -> dict[str, Any]:
    r = await c.post(f"/v1/campaigns/{cid}/dry-run", json=body)
    assert r.status_code == 200, r.text
    out: dict[str, Any] = r.json()
    return out


async def unchanged(c: httpx.AsyncClient, cid: int) -> tuple[Any, ...]:
    """What a dry run must leave as it was: the campaign, its history, its records."""
    campaign = (await c.get(f"/v1/campaigns/{cid}")).json()
    history = (await c.get(f"/v1/campaigns/{cid}/history")).json()["data"]
    records = (await c.get(f"/v1/campaigns/{cid}/records")).json()["data"]
    return campaign, history, records


def one_line(value: str) -> str:
    return " ".join(value.split())


async def test_counts_and_sample_match_what_the_launch_sends(control: ControlFactory) -> None:
    api = await control(FAST)
    api.lab.add_domain("inbox.test")
    key = await ready_tenant(api)
    people = [
        {"email": "ann@inbox.test", "name": "Ann"},
        {"email": "bob@inbox.test", "name": "Bob"},
        {"email": "cy@inbox.test", "name": "Cy"},  # suppressed: manual
        {"email": "dan@inbox.test", "name": "Dan", "status": "unsubscribed"},
        {"email": "eve@inbox.test", "name": "Eve", "status": "bounced"},
        {"email": "fay@inbox.test", "name": "Fay"},  # a suppression that has expired
        {"email": "gus@inbox.test", "name": "Gus"},
    ]
    async with api.client(key) as c:
        expired = {"expires_at": "2020-01-01T00:00:00Z"}
        for address, extra in (("cy@inbox.test", {}), ("fay@inbox.test", expired)):
            r = await c.post("/v1/suppressions", json={"address": address, **extra})
            assert r.status_code in (200, 201), r.text
        cid = await approved_campaign(api, c, people)
        # A template changed after approval: the campaign still sends the version
        # validation fixed, and so does its dry run.
        template = (await c.get(f"/v1/campaigns/{cid}")).json()["template_id"]
        r = await c.patch(f"/v1/templates/{template}", json={"subject": "Changed"})
        assert r.status_code == 200, r.text
        before = await unchanged(c, cid)
        dry = await dry_run(c, cid)
        assert await unchanged(c, cid) == before  # state, history, no records
        assert before[0]["state"] == "approved" and before[2] == []

        assert dry["problems"] == [] and dry["state"] == "approved"
        assert (dry["recipients"], dry["sendable"]) == (7, 4), dry
        assert dry["suppressed"] == {"hard_bounce": 1, "manual": 1, "unsubscribe": 1}, dry
        sample = dry["sample"]
        assert sample["version"] == before[0]["template_version"] == 1
        assert [m["email"] for m in sample["messages"]] == [
            "ann@inbox.test", "bob@inbox.test", "fay@inbox.test",
        ]  # fmt: skip
        for m, name in zip(sample["messages"], ("Ann", "Bob", "Fay"), strict=True):
            assert m["error"] is None and m["subject"] == f"News for {name}"
            fields = {h["name"]: h["value"] for h in m["headers"]}
            assert fields["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
            link = fields["List-Unsubscribe"].split(",")[0].strip("<> ")
            assert f'href="{link}"' in m["html"] and f"Hi {name}" in m["html"], m["html"]
        # No warming, and the shipped rules set no default rate: all at once, now.
        p = dry["prediction"]
        assert p["pool"] == "default" and p["unsent"] == 0
        assert p["finish"] == p["start"], p
        assert [d["messages"] for d in p["per_day"]] == [4]
        assert [(s["source"], s["messages"], s["warming"], s["paused"])
                for s in p["per_source"]] == [("default", 4, None, "")]  # fmt: skip
        assert "it starts now" in p["assumptions"], p["assumptions"]

        # The launch writes what the dry run counted, and sends what it rendered.
        assert (await act(c, cid, "schedule")).status_code == 200
        stats = await stats_when(c, cid, lambda s: s["state"] == "sent")
        assert (stats["recipients"], stats["delivered"]) == (7, 4), stats
        r = await c.get(f"/v1/campaigns/{cid}/records", params={"state": "suppressed"})
        reasons = collections.Counter(x["reason"] for x in r.json()["data"])
        assert dict(reasons) == dry["suppressed"]
        r = await c.post(f"/v1/campaigns/{cid}/dry-run", json={})
        assert r.status_code == 409 and "stats" in r.text, r.text  # launched: its records say
    sent = {m.rcpt_tos[0]: m.data for m in api.lab.messages}
    for m in sample["messages"]:
        parsed = email.message_from_bytes(sent[m["email"]], policy=email.policy.default)
        fields = {h["name"]: h["value"] for h in m["headers"]}
        assert one_line(str(parsed["List-Unsubscribe"])) == one_line(fields["List-Unsubscribe"])
        assert parsed["Subject"] == m["subject"]


async def test_a_draft_with_problems_gets_them_and_a_sample(control: ControlFactory) -> None:
    api = await control()
    key = await ready_tenant(api)
    async with api.client(key) as c:
        refs = await setup(api, c)  # a template without unsubscribe link: lint errors
        new = {"name": "d", **refs, "from": {"email": "news@unknown.test"}, "pool": "default",
               "ab": ab("approval")}  # fmt: skip
        r = await c.post("/v1/campaigns", json=new)
        assert r.status_code == 201, r.text
        cid = r.json()["id"]
        before = await unchanged(c, cid)
        at = "2031-03-03T10:00:00+01:00"
        dry = await dry_run(c, cid, at=at)
        assert await unchanged(c, cid) == before
        assert before[0]["state"] == "draft" and len(before[1]) == 1  # create, nothing since
        codes = [p["code"] for p in dry["problems"]]
        assert codes == ["template_lint", "from_domain_unverified"], dry["problems"]
        assert (dry["recipients"], dry["sendable"], dry["suppressed"]) == (1, 1, {})
        [m] = dry["sample"]["messages"]
        assert (m["email"], m["subject"], m["error"]) == ("ann@inbox.test", "News", None)
        assert "Hi Ann" in m["html"] and dry["sample"]["version"] == 1
        p = dry["prediction"]
        assert p["start"].startswith("2031-03-03T09:00:00"), p
        assert p["finish"] == p["start"] and "it starts at the time asked" in p["assumptions"]
        said = " / ".join(p["assumptions"])
        assert "not each contact's variant" in said and "the 50% outside" in said, said
        # A template that does not render: the sample says why, still 200.
        r = await c.patch(f"/v1/templates/{refs['template_id']}",
                          json={"subject": "{{ contact.name.nope() }}"})  # fmt: skip
        assert r.status_code == 200, r.text
        [m] = (await dry_run(c, cid))["sample"]["messages"]
        assert m["subject"] is None and m["error"] and "subject" in m["error"], m
        # Bad input, another tenant's campaign, a campaign that can no longer send.
        r = await c.post(f"/v1/campaigns/{cid}/dry-run", json={"at": "2031-03-03T10:00:00"})
        assert r.status_code == 422 and r.json()["error"]["fields"][0]["path"] == "at", r.text
        other = await api.tenant("other")
        async with api.client(other) as o:
            assert (await o.post(f"/v1/campaigns/{cid}/dry-run", json={})).status_code == 404
        assert (await act(c, cid, "cancel")).status_code == 200
        r = await c.post(f"/v1/campaigns/{cid}/dry-run", json={})
        assert r.status_code == 409 and "cancelled" in r.text, r.text


async def test_the_finish_follows_warming_rate_and_window(
    control: ControlFactory, tmp_path: Path
) -> None:
    rules = tmp_path / "shaping.toml"
    rules.write_text('[default]\nmax_message_rate = "2/min"\n')
    api = await control({"shaping": {"rules_file": str(rules)}})
    key = await ready_tenant(api)
    window = {"start": "09:00", "end": "17:00", "timezone": "Europe/Berlin"}
    people = [{"email": f"p{i}@inbox.test", "name": f"P{i}"} for i in range(9)]
    async with api.client(api.admin_key) as admin:
        r = await admin.post("/v1/warming/source/default/start",
                             json={"plan": {"days": [2, 3, 5]}})  # fmt: skip
        assert r.status_code == 200, r.text
    async with api.client(key) as c:
        cid = await approved_campaign(api, c, people, send_window=window)
        dry = await dry_run(c, cid)
    p = dry["prediction"]
    [src] = p["per_source"]
    assert src["warming"] == {"plan": "custom", "day": 1, "sent_today": 0, "cap": 2}, src
    assert (src["messages"], src["per_minute"]) == (9, 2.0), src
    # By hand: the same inputs to predict_finish.
    start = dt.datetime.fromisoformat(p["start"])
    plan = make_plan("custom", [2, 3, 5])
    want = predict_finish(start, 9, [SourceLimit("default", plan=plan, per_minute=2.0)],
                          parse_window(window), warming_tz="UTC")  # fmt: skip
    assert want.finish is not None and p["finish"] is not None
    assert dt.datetime.fromisoformat(p["finish"]) == want.finish
    assert [(d["date"], d["messages"]) for d in p["per_day"]] == [
        (d.isoformat(), n) for d, n in want.per_day
    ]
    assert len(p["per_day"]) >= 3 and sum(d["messages"] for d in p["per_day"]) == 9, p
    assert dt.datetime.fromisoformat(src["last"]) == want.per_source["default"]
    said = " / ".join(p["assumptions"])
    for words in ("2/min", "Europe/Berlin", "every warming day is healthy", "gmail 3000/min"):
        assert words in said, said

    # A control-only process (serve --role control) has no broker: no warming applied.
    alone = ControlService(api.app.cfg)
    await alone.start()
    try:
        assert alone.address is not None
        host, port = alone.address
        async with httpx.AsyncClient(base_url=f"http://{host}:{port}", timeout=30,
                                     headers={"Authorization": f"Bearer {key}"}) as c:  # fmt: skip
            q = (await dry_run(c, cid))["prediction"]
    finally:
        await alone.stop()
    assert q["per_source"][0]["warming"] is None
    assert any("no shaping broker" in a for a in q["assumptions"]), q["assumptions"]
    start = dt.datetime.fromisoformat(q["start"])
    want = predict_finish(start, 9, [SourceLimit("default", per_minute=2.0)],
                          parse_window(window))  # fmt: skip
    assert q["finish"] is not None and dt.datetime.fromisoformat(q["finish"]) == want.finish


# PostgreSQL's statement timeout is what is tested: SQLite has none.
@pytest.mark.parametrize("control", ["postgresql"], indirect=True)
async def test_a_count_past_its_time_limit_is_a_problem(control: ControlFactory) -> None:
    api = await control({"control": {"count_timeout": "1ms"}})
    key = await api.tenant("acme")
    await many_contacts(api, key)
    async with api.client(key) as c:
        r = await c.post("/v1/audiences", json={"name": "big", "rule": SLOW_RULE})
        assert r.status_code == 201, r.text
        audience = r.json()["id"]
        r = await c.post("/v1/templates", json={"name": "t", "subject": "s", "html": "<p>x</p>",
                                                "category": "transactional"})  # fmt: skip
        body = {"name": "c", "audience_id": audience, "template_id": r.json()["id"],
                "from": {"email": "a@nowhere.test"}}  # fmt: skip
        r = await c.post("/v1/campaigns", json=body)
        assert r.status_code == 201, r.text
        dry = await dry_run(c, r.json()["id"])
    codes = [p["code"] for p in dry["problems"]]
    assert codes.count("audience_too_slow") == 1, dry["problems"]
    assert (dry["recipients"], dry["suppressed"], dry["prediction"]) == (None, None, None)
    assert dry["sample"]["messages"] == []
