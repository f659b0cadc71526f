"""Tenant isolation: a key of tenant A gets 404, never data, for every resource of
tenant B, on every route (taken from the API's own route table, so a new route is
covered the day it is added), and A's lists never show B's rows."""

from __future__ import annotations

import re

from postwarden.control.api import api as registry
from tests.control.conftest import ControlFactory, domain_in_force


async def test_tenant_a_never_sees_tenant_b(control: ControlFactory) -> None:
    api = await control()
    api.lab.add_domain("inbox.test")
    # Every scope, so that each route's answer is its lookup's (404), not a 403.
    key_a = await api.tenant("alpha", scopes=("send", "read", "manage", "approve"))
    key_b = await api.tenant("bravo")
    d_b = await api.verified_domain(key_b, "bravo.test")
    await domain_in_force(api, "bravo.test")
    async with api.client(key_b) as c:
        r = await c.post("/v1/suppressions", json={"address": "secret-b@inbox.test"})
        assert r.status_code == 201
        r = await c.post(
            "/v1/messages",
            json={"from": "x@bravo.test", "to": ["u@inbox.test"], "subject": "b's", "text": "b"},
        )
        assert r.status_code == 202
        msg_b = r.json()["id"]
        key_b_id = (await c.get("/v1/keys")).json()["data"][0]["id"]
        r = await c.post("/v1/templates", json={"name": "b's", "subject": "s", "html": "b"})
        assert r.status_code == 201
        template_b = r.json()["id"]
        r = await c.post("/v1/audiences", json={"name": "bravo's", "rule": 'name == "b"'})
        aud_b = r.json()["id"]
        snap_b = (await c.post(f"/v1/audiences/{aud_b}/snapshots")).json()["id"]
        r = await c.post("/v1/imports", content=b"email\nsecret-b@inbox.test\n",
                         headers={"Content-Type": "text/csv"})  # fmt: skip
        assert r.status_code == 202
        import_b = r.json()["id"]
        r = await c.post("/v1/data-sources", json={"url": "http://127.0.0.1:9/bravo.csv"})
        assert r.status_code == 201
        source_b = r.json()["id"]
        contact_b = (await c.post("/v1/contacts", json={"email": "secret-b@inbox.test"})).json()
        list_b = (await c.post("/v1/lists", json={"name": "bravo-list"})).json()
        r = await c.post(
            f"/v1/lists/{list_b['id']}/members", json={"emails": ["secret-b@inbox.test"]}
        )
        assert r.json()["changed"] == 1
        topic_b = (await c.post("/v1/topics", json={"name": "bravo-topic"})).json()
        r = await c.post("/v1/contact-attributes", json={"name": "bravo_attr", "type": "string"})
        assert r.status_code == 201
        r = await c.post("/v1/campaigns", json={"name": "bravo's", "audience_id": aud_b,
                         "template_id": template_b, "from": {"email": "x@bravo.test"}})  # fmt: skip
        assert r.status_code == 201, r.text
        campaign_b = r.json()["id"]
        assert (await c.post("/v1/tracking/keys")).status_code == 201  # two: one retirable
        keys = (await c.post("/v1/tracking/keys")).json()["data"]
        kid_b = keys[1]["kid"]
        r = await c.post("/v1/webhooks", json={"url": "https://hooks.test/b", "events": ["*"]})
        webhook_b = r.json()["id"]
    values = {
        "audience_id": aud_b,
        "snapshot_id": snap_b,
        "domain_id": d_b["id"],
        "key_id": key_b_id,
        "selector": d_b["dkim"][0]["selector"],
        "address": "secret-b@inbox.test",
        "message_id": msg_b,
        "template_id": template_b,
        "version": 1,
        "import_id": import_b,
        "source_id": source_b,
        "contact_id": contact_b["id"],
        "list_id": list_b["id"],
        "topic_id": topic_b["id"],
        "name": "bravo_attr",
        "campaign_id": campaign_b,
        "kid": kid_b,
        "webhook_id": webhook_b,
        "delivery_id": 1,
        "domain": "bravo.test",  # a sending domain's analytics
    }
    # A route with a resource in its path that takes a body gets a valid one (by its
    # body model; {} when every field is optional), so that the answer is the
    # resource lookup's.
    bodies = {
        "TemplateUpdate": {"name": "mine"},
        "TestSendIn": {"to": ["u@inbox.test"], "from": "x@alpha.test"},
        "ContactUpdate": {"name": "x"},
        "ConsentCreate": {"source": "x"},
        "ChoiceIn": {"opted_in": True},
        "MembersIn": {"contact_ids": [contact_b["id"]]},
        "ListUpdate": {"name": "x"},
        "TopicUpdate": {"name": "x"},
        "ConversionIn": {"contact_id": contact_b["id"]},
    }
    await api.lab.wait_for_messages(1)
    checked = []
    async with api.client(key_a) as c:
        for op in registry.ops:
            params = re.findall(r"\{(\w+)(?::\w+)?\}", op.path)
            if not op.tenant or not params:
                continue
            url = re.sub(r"\{(\w+)(?::\w+)?\}", lambda m: str(values[m.group(1)]), op.path)
            body = bodies.get(op.body.__name__, {}) if op.body is not None else None
            r = await c.request(op.method, url, json=body)
            assert r.status_code == 404, (op.method, url, r.status_code, r.text)
            assert "bravo" not in r.text and "secret-b" not in r.text
            checked.append((op.method, op.path))
        for path in (
            "/v1/domains",
            "/v1/keys",
            "/v1/suppressions",
            "/v1/events",
            "/v1/suppressions/export",
        ):
            r = await c.get(path)
            assert r.status_code == 200
            assert "bravo" not in r.text and "secret-b" not in r.text and msg_b not in r.text
        r = await c.get("/v1/events", params={"message_id": msg_b})
        assert r.json()["data"] == []
        # A cannot claim B's domain, nor send as it.
        assert (await c.post("/v1/domains", json={"name": "bravo.test"})).status_code == 409
        r = await c.post(
            "/v1/messages",
            json={"from": "x@bravo.test", "to": ["u@inbox.test"], "subject": "s", "text": "t"},
        )
        assert r.status_code == 422 and r.json()["error"]["fields"][0]["path"] == "from"
    # Every tenant route with a resource in its path was tried.
    assert len(checked) >= 9, checked
    # B still has all of it.
    async with api.client(key_b) as c:
        assert (await c.get(f"/v1/domains/{d_b['id']}")).status_code == 200
        assert (await c.get(f"/v1/messages/{msg_b}")).status_code == 200
