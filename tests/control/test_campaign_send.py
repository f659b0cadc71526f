"""A campaign sent for real, through the API into the lab: launch at the schedule, one
DKIM-signed, personalised message per active contact, the suppressed and unsubscribed
kept as ``suppressed`` records with their reason, bounces and deferrals back on the
records, the campaign ``sent`` with counters equal to what the lab holds; and the feed
window, pause, resume and cancel acting on records not yet handed on."""

from __future__ import annotations

import email
import email.policy
from typing import Any

import httpx

from tests.control.conftest import ControlApi, ControlFactory
from tests.control.test_campaigns import act, operator_made_key, tenant_id
from tests.control.test_domains import verify_signatures
from tests.control.test_messages import ready_tenant
from tests.control.test_templates import ADDRESS, FOOTER, set_postal_address
from tests.waiting import eventually

HTML = (
    "<html><body><h1>Hi {{ contact.name }}</h1>"
    "<p>Plan {{ contact.attributes.plan | default('none') }}</p>" + FOOTER + "</body></html>"
)


async def approved_campaign(
    api: ControlApi, c: httpx.AsyncClient, people: list[dict[str, Any]], **extra: Any
) -> int:
    """Contacts, an audience of all of them, a lint-clean template and a campaign,
    validated and approved by a second key: its id."""
    tid = await tenant_id(c)
    await set_postal_address(api, tid, ADDRESS)
    for p in people:
        r = await c.post("/v1/contacts", json=p)
        assert r.status_code == 201, r.text
    r = await c.post("/v1/audiences", json={"name": "everyone", "rule": 'email.endswith(".test")'})
    assert r.status_code == 201, r.text
    audience = r.json()["id"]
    body = {"name": "news", "category": "marketing", "subject": "News for {{ contact.name }}",
            "html": HTML}  # fmt: skip
    r = await c.post("/v1/templates", json=body)
    assert r.status_code == 201, r.text
    new = {"name": "December", "audience_id": audience, "template_id": r.json()["id"],
           "from": {"email": "news@acme.test", "name": "Acme"}, "tags": ["december"],
           "metadata": {"quarter": "q4"}, **extra}  # fmt: skip
    r = await c.post("/v1/campaigns", json=new)
    assert r.status_code == 201, r.text
    cid = int(r.json()["id"])
    r = await act(c, cid, "validate")
    assert r.status_code == 200 and r.json()["problems"] == [], r.text
    approver = await operator_made_key(api, tid, ["approve", "read"])
    async with api.client(approver) as a:
        r = await act(a, cid, "approve")
        assert r.status_code == 200, r.text
    return cid


async def stats_when(c: httpx.AsyncClient, cid: int, done: Any, timeout: float = 30) -> dict:  # type: ignore[type-arg]
    last: list[Any] = []

    async def check() -> bool:
        r = await c.get(f"/v1/campaigns/{cid}/stats")
        last[:] = [r.json()]
        return r.status_code == 200 and bool(done(r.json()))

    try:
        await eventually(check, timeout, f"campaign {cid}'s stats", interval=0.1)
    except AssertionError:
        raise AssertionError(f"timed out; last stats {last}") from None
    return dict(last[0])


async def test_a_campaign_reaches_each_contact_once(control: ControlFactory) -> None:
    api = await control()
    api.lab.add_domain("inbox.test")
    api.lab.add_domain("nouser.test", behaviour="reject")
    key = await ready_tenant(api)
    people = [
        {"email": "ann@inbox.test", "name": "Ann", "attributes": {}},
        {"email": "bob@inbox.test", "name": "Bob"},
        {"email": "cy@inbox.test", "name": "Cy"},  # suppressed below
        {"email": "dan@inbox.test", "name": "Dan", "status": "unsubscribed"},
        {"email": "gone@nouser.test", "name": "Gone"},  # the lab refuses it
    ]
    async with api.client(key) as c:
        r = await c.post("/v1/suppressions", json={"address": "cy@inbox.test",
                                                   "reason": "manual"})  # fmt: skip
        assert r.status_code in (200, 201), r.text
        cid = await approved_campaign(api, c, people)
        r = await act(c, cid, "schedule")
        assert r.status_code == 200 and r.json()["state"] == "scheduled", r.text
        stats = await stats_when(c, cid, lambda s: s["state"] == "sent")
        figures = ("recipients", "suppressed", "delivered", "bounced", "pending", "queued")
        assert [stats[f] for f in figures] == [5, 2, 2, 1, 0, 0], stats
        r = await c.get(f"/v1/campaigns/{cid}/records", params={"state": "suppressed"})
        assert r.status_code == 200, r.text
        why = {x["email"]: x["reason"] for x in r.json()["data"]}
        assert why == {"cy@inbox.test": "manual", "dan@inbox.test": "unsubscribe"}, why
        r = await c.get(f"/v1/campaigns/{cid}/records", params={"state": "bounced"})
        assert [x["email"] for x in r.json()["data"]] == ["gone@nouser.test"], r.text
        history = (await c.get(f"/v1/campaigns/{cid}/history")).json()["data"]
        steps = [(h["action"], h["after"], h["key_prefix"]) for h in history][-2:]
        assert steps == [("launch", "sending", None), ("finish", "sent", None)], history

    got = {m.rcpt_tos[0]: m for m in api.lab.messages if m.rcpt_tos[0].endswith("@inbox.test")}
    assert sorted(got) == ["ann@inbox.test", "bob@inbox.test"]
    for address, name in (("ann@inbox.test", "Ann"), ("bob@inbox.test", "Bob")):
        raw = got[address].data
        assert len(await verify_signatures(api, raw)) >= 1
        parsed = email.message_from_bytes(raw, policy=email.policy.default)
        assert parsed["Subject"] == f"News for {name}"
        assert (
            parsed["Feedback-ID"] == f"c{cid}:t{await tenant_id_of(api, key)}:campaign:postwarden"
        )
        html = parsed.get_body(("html",))
        assert html is not None and f"Hi {name}" in html.get_content()


async def tenant_id_of(api: ControlApi, key: str) -> int:
    async with api.client(key) as c:
        return await tenant_id(c)
