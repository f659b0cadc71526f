"""/v1/lists: create, list, show, rename, delete (names unique per tenant: 409), and
members added and removed by contact id or email, up to 1000 at once, with unknown
contacts reported per item; a contact shows the lists it is in."""

from __future__ import annotations

from typing import Any

from tests.control.conftest import ControlFactory


async def test_lists_and_members(control: ControlFactory) -> None:
    api = await control()
    key = await api.tenant("acme")
    async with api.client(key) as c:
        r = await c.post("/v1/lists", json={"name": "Beta testers", "description": "early"})
        assert r.status_code == 201, r.text
        beta = r.json()
        assert beta["members"] == 0 and beta["description"] == "early"
        r = await c.post("/v1/lists", json={"name": "Beta testers"})
        assert r.status_code == 409 and r.json()["error"]["type"] == "conflict"
        other = (await c.post("/v1/lists", json={"name": "VIP"})).json()
        r = await c.patch(f"/v1/lists/{other['id']}", json={"name": "Beta testers"})
        assert r.status_code == 409
        r = await c.patch(f"/v1/lists/{other['id']}", json={"name": "VIPs", "description": "d"})
        assert r.status_code == 200 and (r.json()["name"], r.json()["description"]) == ("VIPs", "d")
        r = await c.get("/v1/lists", params={"limit": 1})
        assert [x["id"] for x in r.json()["data"]] == [beta["id"]] and r.json()["next_cursor"]

        contacts: list[dict[str, Any]] = [{"email": f"u{i}@x.test"} for i in range(1000)]
        r = await c.post("/v1/contacts/batch", json={"contacts": contacts})
        ids = [x["id"] for x in r.json()["results"]]
        url = f"/v1/lists/{beta['id']}/members"
        # 1000 at once by id, with an unknown id and one given twice.
        given = [*ids[:998], ids[0], 2**62]
        r = await c.post(url, json={"contact_ids": given})
        assert r.status_code == 200, r.text
        out = r.json()
        assert (out["changed"], out["failed"]) == (998, 1)
        assert out["results"][998] == {
            "index": 998, "contact_id": ids[0], "changed": False, "error": None
        }  # fmt: skip
        assert out["results"][999]["error"] == "no contact with this id"
        assert out["results"][999]["contact_id"] is None
        # By email, any spelling; unknown emails reported.
        r = await c.post(url, json={"emails": ["U998@X.test", "u0@x.test", "nobody@x.test"]})
        assert [(x["changed"], x["error"]) for x in r.json()["results"]] == [
            (True, None),
            (False, None),
            (False, "no contact with this email"),
        ]
        assert (await c.get(f"/v1/lists/{beta['id']}")).json()["members"] == 999
        # Pages of members in contact id order.
        seen: list[int] = []
        cursor = None
        while True:
            params: dict[str, Any] = {"limit": 400, **({"cursor": cursor} if cursor else {})}
            page = (await c.get(url, params=params)).json()
            seen += [m["contact_id"] for m in page["data"]]
            cursor = page["next_cursor"]
            if not cursor:
                break
        assert seen == sorted(ids[:999])
        first = (await c.get(url, params={"limit": 1})).json()["data"][0]
        assert first["email"] == "u0@x.test" and first["added_at"]

        # A contact shows its lists.
        await c.post(f"/v1/lists/{other['id']}/members", json={"contact_ids": [ids[0]]})
        r = await c.get(f"/v1/contacts/{ids[0]}")
        assert r.json()["lists"] == [beta["id"], other["id"]]

        # Removal: by body (ids or emails), and one by one.
        r = await c.request("DELETE", url, json={"contact_ids": [ids[1], ids[1], ids[999]]})
        assert [x["changed"] for x in r.json()["results"]] == [True, False, False]
        r = await c.request("DELETE", url, json={"emails": ["u2@x.test"]})
        assert r.json()["changed"] == 1
        assert (await c.delete(f"{url}/{ids[3]}")).status_code == 200
        assert (await c.delete(f"{url}/{ids[3]}")).status_code == 404
        assert (await c.get(f"/v1/lists/{beta['id']}")).json()["members"] == 996

        # Bad bodies: both or neither kind, too many, not ids.
        for body, path in (
            ({"contact_ids": [1], "emails": ["a@x.test"]}, "body"),
            ({}, "body"),
            ({"contact_ids": list(range(1, 1002))}, "contact_ids"),
            ({"contact_ids": ["x"]}, "contact_ids[0]"),
            ({"contact_ids": [0]}, "contact_ids[0]"),
            ({"emails": []}, "emails"),
            ({"contact_ids": [1], "all": True}, "all"),
        ):
            r = await c.post(url, json=body)
            assert r.status_code == 422, (body, r.text)
            assert r.json()["error"]["fields"][0]["path"] == path, (body, r.text)
        r = await c.post("/v1/lists", json={"name": " "})
        assert r.status_code == 422 and r.json()["error"]["fields"][0]["path"] == "name"

        # Deleting a contact takes it out of its lists; deleting a list keeps its contacts.
        assert (await c.delete(f"/v1/contacts/{ids[0]}")).status_code == 200
        assert (await c.get(f"/v1/lists/{other['id']}")).json()["members"] == 0
        assert (await c.delete(f"/v1/lists/{beta['id']}")).status_code == 200
        assert (await c.get(f"/v1/lists/{beta['id']}")).status_code == 404
        assert (await c.get(url)).status_code == 404
        assert (await c.get(f"/v1/contacts/{ids[5]}")).json()["lists"] == []
