"""Contacts, lists, topics, members and consents of one tenant are nothing to another:
B's key gets 404 on A's, cannot add A's contact to B's list by id or email, and never
sees A's rows in a listing; the same address is two contacts in two tenants."""

from __future__ import annotations

from tests.control.conftest import ControlFactory


async def test_tenant_b_cannot_reach_a_contacts(control: ControlFactory) -> None:
    api = await control()
    key_a = await api.tenant("alpha")
    key_b = await api.tenant("bravo")
    async with api.client(key_a) as a:
        await a.post("/v1/contact-attributes", json={"name": "seats", "type": "number"})
        ann = (await a.post("/v1/contacts", json={"email": "ann@x.test", "name": "A's Ann"})).json()
        cid = ann["id"]
        lst = (await a.post("/v1/lists", json={"name": "alpha-list"})).json()
        topic = (await a.post("/v1/topics", json={"name": "alpha-topic"})).json()
        await a.post(f"/v1/lists/{lst['id']}/members", json={"contact_ids": [cid]})
        await a.put(f"/v1/contacts/{cid}/topics/{topic['id']}", json={"opted_in": True})
        r = await a.post(f"/v1/contacts/{cid}/consents", json={"source": "alpha-form"})
        assert r.status_code == 201

    async with api.client(key_b) as b:
        own = (await b.post("/v1/contacts", json={"email": "bob@x.test"})).json()
        own_list = (await b.post("/v1/lists", json={"name": "bravo-list"})).json()
        own_topic = (await b.post("/v1/topics", json={"name": "bravo-topic"})).json()
        refused = [
            ("GET", f"/v1/contacts/{cid}", None),
            ("PATCH", f"/v1/contacts/{cid}", {"name": "stolen"}),
            ("DELETE", f"/v1/contacts/{cid}", None),
            ("GET", f"/v1/contacts/{cid}/consents", None),
            ("POST", f"/v1/contacts/{cid}/consents", {"source": "forged"}),
            ("PUT", f"/v1/contacts/{cid}/topics/{own_topic['id']}", {"opted_in": False}),
            ("PUT", f"/v1/contacts/{own['id']}/topics/{topic['id']}", {"opted_in": False}),
            ("DELETE", f"/v1/contacts/{cid}/topics/{topic['id']}", None),
            ("GET", f"/v1/lists/{lst['id']}", None),
            ("PATCH", f"/v1/lists/{lst['id']}", {"name": "stolen"}),
            ("DELETE", f"/v1/lists/{lst['id']}", None),
            ("GET", f"/v1/lists/{lst['id']}/members", None),
            ("POST", f"/v1/lists/{lst['id']}/members", {"contact_ids": [own["id"]]}),
            ("DELETE", f"/v1/lists/{lst['id']}/members", {"contact_ids": [cid]}),
            ("DELETE", f"/v1/lists/{lst['id']}/members/{cid}", None),
            ("GET", f"/v1/topics/{topic['id']}", None),
            ("PATCH", f"/v1/topics/{topic['id']}", {"default_opt_in": True}),
            ("DELETE", f"/v1/topics/{topic['id']}", None),
            ("DELETE", "/v1/contact-attributes/seats", None),
        ]
        for method, url, body in refused:
            r = await b.request(method, url, json=body)
            assert r.status_code == 404, (method, url, r.text)
            assert "alpha" not in r.text and "Ann" not in r.text
        # A's contact cannot join B's list, by id or by email.
        r = await b.post(f"/v1/lists/{own_list['id']}/members", json={"contact_ids": [cid]})
        assert r.json()["results"][0]["error"] == "no contact with this id"
        r = await b.post(f"/v1/lists/{own_list['id']}/members", json={"emails": ["ann@x.test"]})
        assert r.json()["results"][0]["error"] == "no contact with this email"
        assert (await b.get(f"/v1/lists/{own_list['id']}")).json()["members"] == 0
        # Listings show B's rows only.
        for path in ("/v1/contacts", "/v1/lists", "/v1/topics", "/v1/contact-attributes"):
            r = await b.get(path)
            assert r.status_code == 200 and "alpha" not in r.text and "ann@" not in r.text
        assert (await b.get("/v1/contacts", params={"email": "ann@x.test"})).json()["data"] == []
        # A's declared types do not bind B: "seats" is free text here.
        r = await b.post("/v1/contacts", json={"email": "ann@x.test", "attributes": {"seats": "x"}})
        assert r.status_code == 201 and r.json()["id"] != cid
        assert (await b.get(f"/v1/contacts/{own['id']}")).json()["topics"] == [
            {"topic_id": own_topic["id"], "opted_in": False, "chosen_at": None}
        ]

    # A's data is as it was.
    async with api.client(key_a) as a:
        got = (await a.get(f"/v1/contacts/{cid}")).json()
        assert got["name"] == "A's Ann" and got["attributes"] == {}
        assert got["lists"] == [lst["id"]] and got["topics"][0]["opted_in"] is True
        assert [
            x["source"] for x in (await a.get(f"/v1/contacts/{cid}/consents")).json()["data"]
        ] == ["alpha-form"]
        assert (await a.get(f"/v1/lists/{lst['id']}")).json()["members"] == 1
        assert (await a.get(f"/v1/topics/{topic['id']}")).json()["default_opt_in"] is False
