"""/v1/campaigns through the API: a draft, validation that finds the template's lint
errors and then passes, approval by a second key with the approve scope (not the last
editor's), schedule, pause, resume, cancel, an edit after approval that returns the
campaign to draft, clone, history with who and why, and another tenant's 404s."""

from __future__ import annotations

from typing import Any

import httpx

from tests.control.conftest import ControlApi, ControlFactory
from tests.control.test_messages import ready_tenant
from tests.control.test_templates import ADDRESS, FOOTER, set_postal_address

HTML = "<html><body><h1>Hi {{ contact.name }}</h1></body></html>"


async def tenant_id(c: httpx.AsyncClient) -> int:
    return int((await c.get("/v1/keys")).json()["data"][0]["tenant_id"])


async def setup(api: ControlApi, c: httpx.AsyncClient) -> dict[str, int]:
    """A contact, an audience of the active contacts and a marketing template without
    an unsubscribe link (a lint error)."""
    r = await c.post("/v1/contacts", json={"email": "ann@inbox.test", "name": "Ann"})
    assert r.status_code == 201, r.text
    r = await c.post("/v1/audiences", json={"name": "all", "rule": 'status == "active"'})
    assert r.status_code == 201, r.text
    audience = r.json()["id"]
    body = {"name": "news", "category": "marketing", "subject": "News", "html": HTML}
    r = await c.post("/v1/templates", json=body)
    assert r.status_code == 201, r.text
    return {"audience_id": audience, "template_id": r.json()["id"]}


async def operator_made_key(api: ControlApi, tid: int, scopes: list[str]) -> str:
    """A key of the tenant made by the operator (a tenant's key without ``approve``
    cannot make one with it)."""
    async with api.client(api.admin_key) as admin:
        r = await admin.post(f"/v1/tenants/{tid}/keys", json={"name": "k", "scopes": scopes})
        assert r.status_code == 201, r.text
        return str(r.json()["key"])


async def act(c: httpx.AsyncClient, cid: int, action: str, **body: Any) -> httpx.Response:
    return await c.post(f"/v1/campaigns/{cid}/{action}", json=body)


async def test_lifecycle_validation_approval_and_history(control: ControlFactory) -> None:
    api = await control()
    key = await ready_tenant(api)
    async with api.client(key) as c:
        # Whoever edits may not mint himself an approver.
        r = await c.post("/v1/keys", json={"name": "approver", "scopes": ["approve", "read"]})
        assert r.status_code == 403 and "approve scope" in r.text, r.text
        approver = await operator_made_key(api, await tenant_id(c), ["approve", "read"])
        refs = await setup(api, c)
        new = {"name": "December news", **refs, "from": {"email": "News@Acme.test",
               "name": "Acme"}, "tags": ["news"], "metadata": {"quarter": "q4"}}  # fmt: skip
        # Bad references and pools are 422s naming the field.
        for field, value in (("audience_id", 999999), ("template_id", 999999)):
            r = await c.post("/v1/campaigns", json={**new, field: value})
            assert r.status_code == 422 and field in r.text, r.text
        r = await c.post("/v1/campaigns", json={**new, "pool": "nowhere"})
        assert r.status_code == 422 and "pool" in r.text, r.text
        bad = {"days": ["mon"], "start": "25:00", "end": "17:00", "timezone": "Europe/Berlin"}
        r = await c.post("/v1/campaigns", json={**new, "send_window": bad})
        assert r.status_code == 422, r.text
        assert r.json()["error"]["fields"][0]["path"] == "send_window.start", r.text
        window = {"days": ["Mon", 2], "start": "09:00", "end": "17:00", "timezone": "Europe/Berlin"}
        new["send_window"] = window
        r = await c.post("/v1/campaigns", json=new)
        assert r.status_code == 201, r.text
        camp = r.json()
        cid = camp["id"]
        assert camp["state"] == "draft" and camp["from"] == {"email": "news@acme.test",
                                                            "name": "Acme"}  # fmt: skip
        assert camp["send_window"]["days"] == ["mon", "tue"], camp  # stored normalized
        # Not validated yet: neither approved nor scheduled (409 saying where it can).
        r = await act(c, cid, "schedule")
        assert r.status_code == 409 and "only in approved" in r.text, r.text
        # The template's lint has errors (no unsubscribe link, no postal address).
        r = await act(c, cid, "validate")
        assert r.status_code == 200, r.text
        assert r.json()["campaign"]["state"] == "draft"
        assert "template_lint" in [p["code"] for p in r.json()["problems"]]
        # Fixed: a new template version with the footer, the tenant's postal address.
        await set_postal_address(api, await tenant_id(c), ADDRESS)
        r = await c.patch(f"/v1/templates/{refs['template_id']}",
                          json={"html": HTML.replace("</body>", FOOTER + "</body>")})  # fmt: skip
        assert r.status_code == 200, r.text
        r = await act(c, cid, "validate", reason="footer added")
        assert r.status_code == 200 and r.json()["problems"] == [], r.text
        assert r.json()["campaign"]["state"] == "validated"
        assert r.json()["campaign"]["template_version"] == 2
        # The key that last changed it may not approve; nor may a key without the scope.
        assert (await act(c, cid, "approve")).status_code == 403
        async with api.client(approver) as a:
            r = await act(a, cid, "approve", reason="looks right")
            assert r.status_code == 200 and r.json()["state"] == "approved", r.text
        # An edit after approval returns it to draft.
        r = await c.patch(f"/v1/campaigns/{cid}", json={"name": "December news!"})
        assert r.status_code == 200 and r.json()["state"] == "draft", r.text
        assert r.json()["template_version"] is None
        assert (await act(c, cid, "validate")).json()["campaign"]["state"] == "validated"
        async with api.client(approver) as a:
            assert (await act(a, cid, "approve")).status_code == 200
        r = await act(c, cid, "schedule", at="2026-12-24T09:00:00")
        assert r.status_code == 422 and "zone" in r.text, r.text
        r = await act(c, cid, "schedule", at="2026-12-24T10:00:00+01:00")
        assert r.status_code == 200 and r.json()["state"] == "scheduled", r.text
        assert r.json()["scheduled_at"].startswith("2026-12-24T09:00:00")
        assert (await act(c, cid, "pause")).json()["state"] == "paused"
        assert (await act(c, cid, "resume")).json()["state"] == "scheduled"  # not launched
        assert (await act(c, cid, "cancel", reason="wrong day")).json()["state"] == "cancelled"
        r = await c.patch(f"/v1/campaigns/{cid}", json={"name": "too late"})
        assert r.status_code == 409, r.text
        for action in ("validate", "approve", "schedule", "pause", "resume", "cancel"):
            assert (await act(c, cid, action)).status_code in (403, 409), action
        # History: every change with who and why, in order.
        r = await c.get(f"/v1/campaigns/{cid}/history")
        steps = [(h["action"], h["before"], h["after"]) for h in r.json()["data"]]
        assert steps == [
            ("create", "", "draft"), ("validate", "draft", "validated"),
            ("approve", "validated", "approved"), ("edit", "approved", "draft"),
            ("validate", "draft", "validated"), ("approve", "validated", "approved"),
            ("schedule", "approved", "scheduled"), ("pause", "scheduled", "paused"),
            ("resume", "paused", "scheduled"), ("cancel", "scheduled", "cancelled"),
        ]  # fmt: skip
        hist = r.json()["data"]
        assert hist[2]["reason"] == "looks right" and hist[9]["reason"] == "wrong day"
        assert hist[2]["key_prefix"] != hist[1]["key_prefix"]
        # Clone: a new draft with the same settings.
        r = await act(c, cid, "clone")
        assert r.status_code == 201 and r.json()["state"] == "draft", r.text
        assert r.json()["tags"] == ["news"] and r.json()["metadata"] == {"quarter": "q4"}
        listed = (await c.get("/v1/campaigns")).json()["data"]
        assert [x["id"] for x in listed] == [cid, r.json()["id"]]
    # Another tenant sees none of it.
    other = await api.tenant("other")
    async with api.client(other) as o:
        assert (await o.get(f"/v1/campaigns/{cid}")).status_code == 404
        assert (await o.get(f"/v1/campaigns/{cid}/history")).status_code == 404
        assert (await act(o, cid, "cancel")).status_code == 404
        assert (await o.get("/v1/campaigns")).json()["data"] == []


async def test_single_key_approval_and_the_from_domain(control: ControlFactory) -> None:
    api = await control()
    key = await ready_tenant(api)
    async with api.client(key) as c:
        refs = await setup(api, c)
        tid = await tenant_id(c)
        solo = await operator_made_key(api, tid, ["manage", "approve"])
    async with api.client(solo) as c:
        # A key with approve may make another.
        r = await c.post("/v1/keys", json={"name": "also", "scopes": ["approve"]})
        assert r.status_code == 201, r.text
    async with api.client(solo) as c:
        body = {"name": "x", **refs, "from": {"email": "news@unverified.test"}}
        cid = (await c.post("/v1/campaigns", json=body)).json()["id"]
        codes = [p["code"] for p in (await act(c, cid, "validate")).json()["problems"]]
        assert "from_domain_unverified" in codes and "template_lint" in codes, codes
        await set_postal_address(api, tid, ADDRESS)
        r = await c.patch(f"/v1/templates/{refs['template_id']}",
                          json={"html": HTML.replace("</body>", FOOTER + "</body>")})  # fmt: skip
        r = await c.patch(f"/v1/campaigns/{cid}", json={"from": {"email": "news@acme.test"}})
        assert r.status_code == 200, r.text
        assert (await act(c, cid, "validate")).json()["problems"] == []
        r = await act(c, cid, "approve")
        assert r.status_code == 403 and "another key" in r.text, r.text
        async with api.client(api.admin_key) as admin:
            r = await admin.patch(f"/v1/tenants/{tid}",
                                  json={"settings": {"postal_address": ADDRESS,
                                                     "single_key_approval": True}})  # fmt: skip
            assert r.status_code == 200, r.text
        r = await act(c, cid, "approve")
        assert r.status_code == 200 and r.json()["state"] == "approved", r.text
