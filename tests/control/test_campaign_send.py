"""A campaign sent for real, through the API into the lab: launch at the schedule, one
DKIM-signed, personalised message per active contact, the suppressed and unsubscribed
kept as ``suppressed`` records with their reason, bounces and deferrals back on the
records, the campaign ``sent`` with counters equal to what the lab holds; and the feed
window, pause, resume and cancel acting on records not yet handed on."""

from __future__ import annotations

import asyncio
import collections
import datetime as dt
import email
import email.policy
import inspect
import urllib.parse
import zoneinfo
from typing import Any

import httpx
import pytest
from sqlalchemy import update

from postwarden.lab import Lab
from postwarden.queue.admin import QueueAdmin
from postwarden.store.campaign_models import Campaign, SendRecord
from tests.control.conftest import ControlApi, ControlFactory, make_admin_key
from tests.control.test_campaigns import act, operator_made_key, tenant_id
from tests.control.test_database_outage import own_postgres  # noqa: F401  (the fixture)
from tests.control.test_domains import verify_signatures
from tests.control.test_messages import ready_tenant
from tests.control.test_templates import ADDRESS, FOOTER, set_postal_address
from tests.pg import PgServer
from tests.waiting import eventually

#: The campaign runner's poll in these tests (1 s by default; every appliance of the
#: suite runs a runner, so the suite keeps the default).
FAST = {"campaigns": {"poll": "0.2s"}}

HTML = (
    "<html><body><h1>Hi {{ contact.name }}</h1>"
    "<p>Plan {{ contact.attributes.plan | default('none') }}</p>" + FOOTER + "</body></html>"
)


async def approved_campaign(
    api: ControlApi,
    c: httpx.AsyncClient,
    people: list[dict[str, Any]],
    html: str = HTML,
    **extra: Any,
) -> int:
    """Contacts, an audience of all of them, a lint-clean template (``html``) and a
    campaign, validated and approved by a second key: its id."""
    tid = await tenant_id(c)
    await set_postal_address(api, tid, ADDRESS)
    for p in people:
        r = await c.post("/v1/contacts", json=p)
        assert r.status_code == 201, r.text
    r = await c.post("/v1/audiences", json={"name": "everyone", "rule": 'email.endswith(".test")'})
    assert r.status_code == 201, r.text
    audience = r.json()["id"]
    body = {"name": "news", "category": "marketing", "subject": "News for {{ contact.name }}",
            "html": html}  # fmt: skip
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
        if r.status_code != 200:
            return False
        verdict = done(r.json())
        return bool(await verdict if inspect.isawaitable(verdict) else verdict)

    try:
        await eventually(check, timeout, f"campaign {cid}'s stats", interval=0.1)
    except AssertionError:
        raise AssertionError(f"timed out; last stats {last}") from None
    return dict(last[0])


async def test_a_campaign_reaches_each_contact_once(control: ControlFactory) -> None:
    api = await control(FAST)
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
        # The campaign's tags and metadata ride with its messages, into their events.
        r = await c.get(f"/v1/campaigns/{cid}/records", params={"state": "delivered"})
        rec = r.json()["data"][0]
        msg = (await c.get(f"/v1/messages/{rec['message_id']}")).json()
        assert msg["tags"] == ["december"] and msg["source"] == "campaign", msg
        assert msg["metadata"]["quarter"] == "q4", msg
        assert msg["metadata"]["campaign_id"] == str(cid), msg
        assert [e["type"] for e in msg["events"]][-1] == "delivered", msg
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
        assert parsed["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
        link = parsed["List-Unsubscribe"].split(",")[0].strip("<> ")
        assert f'href="{link}"' in html.get_content()  # {{ unsubscribe_url }} is the link
    # Ann unsubscribes with one click (RFC 8058); the campaign's stats count it.
    ann = email.message_from_bytes(got["ann@inbox.test"].data, policy=email.policy.default)
    link = urllib.parse.urlsplit(ann["List-Unsubscribe"].split(",")[0].strip("<> "))
    async with api.client() as anon:  # the test's listener (control.listen is port 0)
        r = await anon.post(link.path, data={"List-Unsubscribe": "One-Click"})
        assert r.status_code == 200, r.text
    async with api.client(key) as c:
        stats = (await c.get(f"/v1/campaigns/{cid}/stats")).json()
        assert stats["unsubscribed"] == 1, stats
        # The appliance's analytics pass counted the same, from the events (issue 23):
        # the launch's recipients, the spool's, delivery's (with the site it went to)
        # and the unsubscribe.
        seen: list[Any] = []

        async def counted() -> bool:
            r = await c.get(f"/v1/campaigns/{cid}/analytics")
            seen[:] = [r.json()]
            return r.status_code == 200 and r.json()["totals"]["unsubscribed"] == 1

        await eventually(counted, 30, "the campaign's analytics", interval=0.1)
        totals = seen[0]["totals"]
        figures = ("recipients", "skipped", "accepted", "delivered", "bounced", "bounced_hard")
        assert [totals[f] for f in figures] == [5, 2, 3, 2, 1, 1], seen[0]
        sites = {x["site"]: x["delivered"] for x in seen[0]["sites"]}
        assert sum(sites.values()) == 2 and "" not in sites, seen[0]
        assert [x["category"] for x in seen[0]["bounces_by_category"]] == ["user_unknown"]


async def tenant_id_of(api: ControlApi, key: str) -> int:
    async with api.client(key) as c:
        return await tenant_id(c)


async def open_window(api: ControlApi, c: httpx.AsyncClient, cid: int) -> dict[str, Any]:
    """The campaign's window opens for everyone, as time passing would do: moved in the
    store (an edit is refused once a campaign is sending) and the runner told; then its
    stats once it is ``sent``. A feed step that read the old window before the move may
    put a record back to wait for it, so the move is made again while any waits (time
    passing moves them all; a test moving it once would race that step)."""
    async with api.app.control.sessions() as s:
        row = await s.get(Campaign, cid)
        row.send_window = None
        await s.commit()

    async def passes(stats: dict[str, Any]) -> bool:
        if stats["waiting"]:
            async with api.app.control.sessions() as s:
                await s.execute(
                    update(SendRecord)
                    .where(SendRecord.campaign_id == cid, SendRecord.state == "waiting")
                    .values(not_before=dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1))
                )
                await s.commit()
            runner(api).wake()
        return bool(stats["state"] == "sent")

    return await stats_when(c, cid, passes)


def runner(api: ControlApi) -> Any:
    r = api.app.control.campaigns
    assert r is not None
    return r


@pytest.mark.long
@pytest.mark.sqlite_only
async def test_the_window_paces_and_pause_resume_cancel_act(control: ControlFactory) -> None:
    """Four messages at most in the spool: while the lab defers them nothing more is
    handed on. Paused, the four in the spool are held (even made due, they are not
    tried) and nothing more is handed on; resumed, they are released and the rest
    goes. Cancelled, what was in the spool is taken out and the rest is
    ``cancelled``: nothing of it is delivered."""
    api = await control({
        "campaigns": {"feed_window": 4, "feed_batch": 2, "poll": "0.2s"},
        # One attempt each while the lab defers, then they sit until made due.
        "queue": {"retry_initial": "1h", "retry_max": "1h"},
    })  # fmt: skip
    api.lab.add_domain("inbox.test", behaviour="tempfail")
    key = await ready_tenant(api)
    people = [{"email": f"p{i}@inbox.test", "name": f"P{i}"} for i in range(10)]
    spool = api.app.control.spool_root

    def queue(action: str) -> int:
        admin = QueueAdmin(spool)
        try:
            return int(getattr(admin, action)(None))
        finally:
            admin.close()

    def held() -> int:
        admin = QueueAdmin(spool)
        try:
            return len(admin.list("held"))
        finally:
            admin.close()

    async def canary(c: httpx.AsyncClient, n: int) -> None:
        """A message sent now and delivered: whatever was due before it was tried."""
        r = await c.post("/v1/messages", json={"from": "news@acme.test", "subject": "c",
                         "to": [f"canary{n}@inbox.test"], "text": "c"})  # fmt: skip
        assert r.status_code == 202, r.text
        await eventually(lambda: any(m.rcpt_tos == [f"canary{n}@inbox.test"]
                                     for m in api.lab.messages), 15, "the canary")  # fmt: skip

    async with api.client(key) as c:
        cid = await approved_campaign(api, c, people)
        assert (await act(c, cid, "schedule")).status_code == 200
        await stats_when(c, cid, lambda s: s["deferred"] == 4)
        for _ in range(3):  # the window is full: a step hands nothing on
            assert await runner(api).feed_pass() is False
        stats = (await c.get(f"/v1/campaigns/{cid}/stats")).json()
        assert (stats["pending"], stats["queued"] + stats["deferred"]) == (6, 4), stats

        assert (await act(c, cid, "pause", reason="check the copy")).json()["state"] == "paused"
        assert held() == 4
        api.lab.set_behaviour("inbox.test", "accept")
        queue("flush")  # due now, but held
        await canary(c, 1)
        assert await runner(api).feed_pass() is False  # paused
        stats = (await c.get(f"/v1/campaigns/{cid}/stats")).json()
        assert (stats["delivered"], stats["pending"]) == (0, 6), stats
        assert (await act(c, cid, "resume")).json()["state"] == "sending"
        assert held() == 0
        queue("flush")
        stats = await stats_when(c, cid, lambda s: s["state"] == "sent")
        assert (stats["delivered"], stats["pending"]) == (10, 0), stats

        # A clone, cancelled while the lab defers its first four.
        api.lab.set_behaviour("inbox.test", "tempfail")
        r = await act(c, cid, "clone")
        clone = r.json()["id"]
        assert (await act(c, clone, "validate")).json()["problems"] == []
        approver = await operator_made_key(api, await tenant_id(c), ["approve"])
        async with api.client(approver) as a:
            assert (await act(a, clone, "approve")).status_code == 200
        assert (await act(c, clone, "schedule")).status_code == 200
        await stats_when(c, clone, lambda s: s["deferred"] == 4)
        assert (await act(c, clone, "cancel")).json()["state"] == "cancelled"
        stats = await stats_when(c, clone, lambda s: s["cancelled"] == 10)
        assert stats["state"] == "cancelled" and stats["delivered"] == 0, stats
        api.lab.set_behaviour("inbox.test", "accept")
        queue("flush")
        await canary(c, 2)
    got = collections.Counter(m.rcpt_tos[0] for m in api.lab.messages)
    assert got == {**{f"p{i}@inbox.test": 1 for i in range(10)},
                   "canary1@inbox.test": 1, "canary2@inbox.test": 1}, got  # fmt: skip


async def test_a_closed_send_window_and_the_frequency_cap(control: ControlFactory) -> None:
    """Outside its send window a launched campaign hands nothing on; a tenant's cap of
    one bulk message a day suppresses a second campaign's records (``frequency_cap``)."""
    api = await control(FAST)
    api.lab.add_domain("inbox.test")
    key = await ready_tenant(api)
    today = dt.datetime.now(dt.UTC).isoweekday()
    closed = {"days": [d for d in range(1, 8) if d != today], "start": "00:00", "end": "24:00",
              "timezone": "UTC"}  # fmt: skip
    people = [{"email": f"w{i}@inbox.test", "name": f"W{i}"} for i in range(3)]
    async with api.client(key) as c:
        cid = await approved_campaign(api, c, people, send_window=closed)
        assert (await act(c, cid, "schedule")).status_code == 200
        await stats_when(c, cid, lambda s: s["state"] == "sending" and s["waiting"] == 3)
        assert await runner(api).feed_pass() is False
        assert not api.lab.messages
        stats = await open_window(api, c, cid)
        assert stats["delivered"] == 3, stats

        tid = await tenant_id(c)
        async with api.client(api.admin_key) as admin:
            r = await admin.patch(f"/v1/tenants/{tid}", json={"settings": {
                "postal_address": ADDRESS, "frequency_cap": 1}})  # fmt: skip
            assert r.status_code == 200 and r.json()["settings"]["frequency_cap"] == 1, r.text
        r = await act(c, cid, "clone")
        second = r.json()["id"]
        r = await c.patch(f"/v1/campaigns/{second}", json={"send_window": None})
        assert r.status_code == 200, r.text
        assert (await act(c, second, "validate")).json()["problems"] == []
        approver = await operator_made_key(api, tid, ["approve"])
        async with api.client(approver) as a:
            assert (await act(a, second, "approve")).status_code == 200
        assert (await act(c, second, "schedule")).status_code == 200
        stats = await stats_when(c, second, lambda s: s["state"] == "sent")
        assert (stats["suppressed"], stats["delivered"]) == (3, 0), stats
        r = await c.get(f"/v1/campaigns/{second}/records")
        assert {x["reason"] for x in r.json()["data"]} == {"frequency_cap"}, r.text
    assert len(api.lab.messages) == 3


@pytest.mark.sqlite_only  # the feeder's rule; the query is the frequency cap's
async def test_a_contacts_frequency_preference(control: ControlFactory) -> None:
    """A contact who chose weekly or monthly (the preference center) gets one bulk
    message in that time; the next campaign's record is ``frequency_preference``."""
    api = await control(FAST)
    api.lab.add_domain("inbox.test")
    key = await ready_tenant(api)
    people = [{"email": f"f{i}@inbox.test", "name": f"F{i}"} for i in range(3)]
    async with api.client(key) as c:
        cid = await approved_campaign(api, c, people)
        contacts = (await c.get("/v1/contacts")).json()["data"]
        by_email = {x["email"]: x["id"] for x in contacts}
        for email_, freq in (("f1@inbox.test", "weekly"), ("f2@inbox.test", "monthly")):
            r = await c.patch(f"/v1/contacts/{by_email[email_]}", json={"frequency": freq})
            assert r.status_code == 200 and r.json()["frequency"] == freq, r.text
        assert (await act(c, cid, "schedule")).status_code == 200
        assert (await stats_when(c, cid, lambda s: s["state"] == "sent"))["delivered"] == 3
        second = (await act(c, cid, "clone")).json()["id"]
        assert (await act(c, second, "validate")).json()["problems"] == []
        approver = await operator_made_key(api, await tenant_id(c), ["approve"])
        async with api.client(approver) as a:
            assert (await act(a, second, "approve")).status_code == 200
        assert (await act(c, second, "schedule")).status_code == 200
        stats = await stats_when(c, second, lambda s: s["state"] == "sent")
        assert (stats["suppressed"], stats["delivered"]) == (2, 1), stats
        r = await c.get(f"/v1/campaigns/{second}/records", params={"state": "suppressed"})
        assert sorted((x["email"], x["reason"]) for x in r.json()["data"]) == [
            ("f1@inbox.test", "frequency_preference"),
            ("f2@inbox.test", "frequency_preference"),
        ]


async def test_the_send_window_in_each_recipients_zone(control: ControlFactory) -> None:
    """A window open now in Tokyo and closed in the campaign's zone (UTC): the Tokyo
    contact gets the message, the contact with no zone and the one in Los Angeles wait
    (``waiting``, until the window opens for them); once it opens they go."""
    api = await control(FAST)
    api.lab.add_domain("inbox.test")
    key = await ready_tenant(api)
    hour = dt.datetime.now(zoneinfo.ZoneInfo("Asia/Tokyo")).hour
    window = {"days": list(range(1, 8)), "start": f"{max(hour - 1, 0):02d}:00",
              "end": f"{min(hour + 2, 24):02d}:00", "timezone": "UTC"}  # fmt: skip
    people = [
        {"email": "tokyo@inbox.test", "name": "T", "timezone": "Asia/Tokyo"},
        {"email": "nozone@inbox.test", "name": "N"},
        {"email": "la@inbox.test", "name": "L", "timezone": "America/Los_Angeles"},
    ]
    async with api.client(key) as c:
        cid = await approved_campaign(api, c, people, send_window=window)
        assert (await act(c, cid, "schedule")).status_code == 200
        stats = await stats_when(c, cid, lambda s: s["delivered"] == 1 and s["waiting"] == 2)
        assert stats["state"] == "sending", stats
        r = await c.get(f"/v1/campaigns/{cid}/records", params={"state": "waiting"})
        waiting = {x["email"] for x in r.json()["data"]}
        assert waiting == {"nozone@inbox.test", "la@inbox.test"}, r.text
        assert [m.rcpt_tos[0] for m in api.lab.messages] == ["tokyo@inbox.test"]
        stats = await open_window(api, c, cid)
        assert (stats["delivered"], stats["waiting"]) == (3, 0), stats


async def test_the_database_stopped_mid_campaign(
    request: pytest.FixtureRequest, appliance: Any, lab: Lab
) -> None:
    """PostgreSQL stops while a campaign is being fed and comes back: the runner waits
    and goes on, and every contact still gets exactly one message."""
    server: PgServer = request.getfixturevalue("own_postgres")  # stopped, restarted
    app = await appliance({"database": {"url": server.new_database()},
                           "campaigns": {"poll": "0.2s", "feed_batch": 3}})  # fmt: skip
    assert app.control_address is not None
    api = ControlApi(app, "http://{}:{}".format(*app.control_address),
                     await make_admin_key(app), lab)  # fmt: skip
    api.lab.add_domain("inbox.test")
    key = await ready_tenant(api)
    people = [{"email": f"db{i}@inbox.test", "name": f"D{i}"} for i in range(30)]
    async with api.client(key) as c:
        cid = await approved_campaign(api, c, people)
        assert (await act(c, cid, "schedule")).status_code == 200
        await eventually(lambda: len(api.lab.messages) >= 3, 30, "the first messages")
        await asyncio.to_thread(server.stop)
        assert len(api.lab.messages) < len(people), "all sent before the database stopped"
        await eventually(lambda: not app.control.db.up, 30, "the database seen down")
        await asyncio.to_thread(server.restart)
        stats = await stats_when(c, cid, lambda s: s["state"] == "sent", timeout=60)
    got = collections.Counter(m.rcpt_tos[0] for m in api.lab.messages)
    assert got == {p["email"]: 1 for p in people}, got
    assert stats["delivered"] == 30, stats
