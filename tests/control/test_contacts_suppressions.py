"""A contact's status and the tenant's suppressions kept in step, both ways, through
the API: suppressions added (one by one, by CSV import, by a hard bounce from a real
delivery in the lab) set the contact's status, and removing one makes it active; a
status set on a contact adds or lifts the suppression, which the one suppression check
(the process's cache) then answers."""

from __future__ import annotations

from typing import Any

import httpx

from tests.control.conftest import ControlFactory
from tests.control.test_messages import ready_tenant
from tests.waiting import eventually


async def status(c: httpx.AsyncClient, email: str) -> str:
    r = await c.get("/v1/contacts", params={"email": email})
    data = r.json()["data"]
    assert len(data) == 1, r.text
    value: str = data[0]["status"]
    return value


async def suppression(c: httpx.AsyncClient, email: str) -> Any:
    r = await c.get(f"/v1/suppressions/{email}")
    return r.json()["reason"] if r.status_code == 200 else None


async def test_status_and_suppressions_in_step(control: ControlFactory) -> None:
    api = await control()
    key = await api.tenant("acme")
    check = api.app.control.suppressions.check
    async with api.client(key) as c:
        tid = (await c.get("/v1/keys")).json()["data"][0]["tenant_id"]
        for who in ("ann", "bob", "cat", "dan", "eve"):
            r = await c.post("/v1/contacts", json={"email": f"{who}@x.test"})
            assert r.status_code == 201
        ids = {x["email"]: x["id"] for x in (await c.get("/v1/contacts")).json()["data"]}

        # Suppressions → status: the API, and back to active when it is removed.
        r = await c.post("/v1/suppressions", json={"address": "ANN@x.test", "reason": "complaint"})
        assert r.status_code == 201
        assert await status(c, "ann@x.test") == "complained"
        assert (await c.delete("/v1/suppressions/ann@x.test")).status_code == 200
        assert await status(c, "ann@x.test") == "active"
        # ...the CSV import;
        csv = "address,reason\nbob@x.test,unsubscribe\ncat@x.test,hard_bounce\n"
        r = await c.post(
            "/v1/suppressions/import", content=csv, headers={"content-type": "text/csv"}
        )
        assert r.status_code == 200 and r.json()["created"] == 2, r.text
        assert await status(c, "bob@x.test") == "unsubscribed"
        assert await status(c, "cat@x.test") == "bounced"
        # ...a manual suppression says nothing about the contact: its status stays.
        r = await c.post("/v1/suppressions", json={"address": "dan@x.test", "reason": "manual"})
        assert await status(c, "dan@x.test") == "active"

        # Status → suppressions: PATCH adds one, and active lifts it.
        r = await c.patch(f"/v1/contacts/{ids['eve@x.test']}", json={"status": "bounced"})
        assert r.status_code == 200 and r.json()["status"] == "bounced"
        assert await suppression(c, "eve@x.test") == "hard_bounce"
        # In force in this process as the answer comes (the one check every send makes).
        assert check(tid, "eve@x.test") == "hard_bounce"
        r = await c.patch(f"/v1/contacts/{ids['eve@x.test']}", json={"status": "active"})
        assert r.status_code == 200 and r.json()["status"] == "active"
        assert await suppression(c, "eve@x.test") is None
        assert check(tid, "eve@x.test") is None
        # Active lifts only the reasons a status stands for: a manual entry stays.
        r = await c.patch(f"/v1/contacts/{ids['dan@x.test']}", json={"status": "active"})
        assert await suppression(c, "dan@x.test") == "manual"
        # An upsert's status unsubscribed adds the suppression; its "active" lifts none.
        r = await c.post("/v1/contacts", json={"email": "eve@x.test", "status": "unsubscribed"})
        assert r.status_code == 200 and r.json()["status"] == "unsubscribed"
        assert await suppression(c, "eve@x.test") == "unsubscribe"
        r = await c.post("/v1/contacts", json={"email": "eve@x.test", "status": "active"})
        assert r.status_code == 200 and r.json()["status"] == "unsubscribed"
        r = await c.post(
            "/v1/contacts/batch",
            json={
                "contacts": [
                    {"email": "cat@x.test", "status": "active"},
                    {"email": "fay@x.test", "status": "complained"},
                ]
            },
        )
        assert [x["error"] for x in r.json()["results"]] == [None, None]
        assert await status(c, "cat@x.test") == "bounced"
        assert await suppression(c, "fay@x.test") == "complaint"
        assert check(tid, "fay@x.test") == "complaint"
        # A new contact of an address already suppressed takes its status.
        await c.post("/v1/suppressions", json={"address": "gus@x.test", "reason": "hard_bounce"})
        r = await c.post("/v1/contacts", json={"email": "Gus@X.test"})
        assert r.status_code == 201 and r.json()["status"] == "bounced"
        # Deleting a contact keeps its address suppressed.
        gus = r.json()["id"]
        assert (await c.delete(f"/v1/contacts/{gus}")).status_code == 200
        assert await suppression(c, "gus@x.test") == "hard_bounce"
        # The change feed carried each change: a fresh read of the list agrees.
    await api.app.control.suppressions.load()
    assert check(tid, "eve@x.test") == "unsubscribe" and check(tid, "ann@x.test") is None


async def test_a_hard_bounce_in_the_lab_marks_the_contact_bounced(
    control: ControlFactory,
) -> None:
    api = await control()
    api.lab.add_domain("inbox.test")
    api.lab.add_domain("nouser.test", behaviour="reject")
    key = await ready_tenant(api)
    async with api.client(key) as c:
        for email in ("gone@nouser.test", "fine@inbox.test"):
            assert (await c.post("/v1/contacts", json={"email": email})).status_code == 201
        r = await c.post(
            "/v1/messages",
            json={
                "from": "news@acme.test",
                "to": ["gone@nouser.test", "fine@inbox.test"],
                "subject": "Hello",
                "text": "Hello",
            },
        )
        assert r.status_code == 202, r.text

        async def bounced() -> bool:
            return await status(c, "gone@nouser.test") == "bounced"

        await eventually(bounced, 30, "gone@nouser.test's contact bounced")
        assert await suppression(c, "gone@nouser.test") == "hard_bounce"
        await api.lab.wait_for_messages(1)
        assert await status(c, "fine@inbox.test") == "active"
