"""/v1/topics (names unique per tenant, default_opt_in) and a contact's choices at
/v1/contacts/{id}/topics/{topic_id}: a choice outweighs the default, forgetting it
brings the default back, and the contact shows its standing on every topic."""

from __future__ import annotations

from tests.control.conftest import ControlFactory


async def test_topics_and_choices(control: ControlFactory) -> None:
    api = await control()
    key = await api.tenant("acme")
    async with api.client(key) as c:
        r = await c.post("/v1/topics", json={"name": "News", "default_opt_in": True})
        assert r.status_code == 201, r.text
        news = r.json()
        assert news["default_opt_in"] is True and news["description"] == ""
        offers = (await c.post("/v1/topics", json={"name": "Offers"})).json()
        assert offers["default_opt_in"] is False
        assert (await c.post("/v1/topics", json={"name": "News"})).status_code == 409
        r = await c.patch(f"/v1/topics/{offers['id']}", json={"name": "News"})
        assert r.status_code == 409
        r = await c.get("/v1/topics")
        assert [t["name"] for t in r.json()["data"]] == ["News", "Offers"]
        assert (await c.get(f"/v1/topics/{news['id']}")).json()["name"] == "News"

        cid = (await c.post("/v1/contacts", json={"email": "ann@x.test"})).json()["id"]
        url = f"/v1/contacts/{cid}"

        async def standing() -> dict[int, tuple[bool, bool]]:
            r = await c.get(url)
            return {
                t["topic_id"]: (t["opted_in"], t["chosen_at"] is not None)
                for t in r.json()["topics"]
            }

        # No choice: the defaults.
        assert await standing() == {news["id"]: (True, False), offers["id"]: (False, False)}
        r = await c.put(f"{url}/topics/{news['id']}", json={"opted_in": False})
        assert r.status_code == 200 and r.json()["opted_in"] is False and r.json()["chosen_at"]
        r = await c.put(f"{url}/topics/{offers['id']}", json={"opted_in": True})
        r = await c.put(f"{url}/topics/{offers['id']}", json={"opted_in": True})
        assert r.status_code == 200
        assert await standing() == {news["id"]: (False, True), offers["id"]: (True, True)}
        # A default changed moves only those who made no choice.
        r = await c.patch(f"/v1/topics/{news['id']}", json={"default_opt_in": False})
        assert r.status_code == 200 and r.json()["default_opt_in"] is False
        r = await c.delete(f"{url}/topics/{news['id']}")
        assert r.status_code == 200 and r.json() == {
            "topic_id": news["id"], "opted_in": False, "chosen_at": None
        }  # fmt: skip
        assert (await c.delete(f"{url}/topics/{news['id']}")).status_code == 404
        assert await standing() == {news["id"]: (False, False), offers["id"]: (True, True)}

        for body, path in (
            ({}, "opted_in"),
            ({"opted_in": "maybe"}, "opted_in"),
            ({"opted_in": True, "x": 1}, "x"),
        ):
            r = await c.put(f"{url}/topics/{news['id']}", json=body)
            assert r.status_code == 422 and r.json()["error"]["fields"][0]["path"] == path
        assert (await c.put(f"{url}/topics/999999", json={"opted_in": True})).status_code == 404
        r = await c.put(f"/v1/contacts/999999/topics/{news['id']}", json={"opted_in": True})
        assert r.status_code == 404 and "contact" in r.json()["error"]["message"]

        # Deleting a topic forgets every choice made for it.
        assert (await c.delete(f"/v1/topics/{offers['id']}")).status_code == 200
        assert (await c.get(f"/v1/topics/{offers['id']}")).status_code == 404
        assert await standing() == {news["id"]: (False, False)}
