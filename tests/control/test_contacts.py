"""/v1/contacts: upsert by email (201 then 200), listing and finding by any spelling
of an address, cursors, PATCH and DELETE, declared attribute types, consent records,
the batch route with per-item results, and bad input answered 422 with its field path."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.control.conftest import ControlFactory


def fields(r: httpx.Response) -> list[str]:
    assert r.status_code == 422, r.text
    return [f["path"] for f in r.json()["error"]["fields"]]


async def test_contact_crud_attributes_and_consents(control: ControlFactory) -> None:
    api = await control()
    key = await api.tenant("acme")
    async with api.client(key) as c:
        r = await c.post("/v1/contact-attributes", json={"name": "seats", "type": "number"})
        assert r.status_code == 201 and r.json()["type"] == "number"
        r = await c.post("/v1/contact-attributes", json={"name": "seats", "type": "number"})
        assert r.status_code == 200
        r = await c.post("/v1/contact-attributes", json={"name": "renews", "type": "date"})
        assert r.status_code == 201

        r = await c.post(
            "/v1/contacts",
            json={
                "email": "Ann@Example.COM",
                "name": "Ann",
                "attributes": {"seats": 3, "renews": "2027-01-31", "plan": "pro"},
                "timezone": "Europe/Paris",
                "locale": "fr-FR",
            },
        )
        assert r.status_code == 201, r.text
        ann = r.json()
        assert ann["email"] == "ann@example.com" and ann["status"] == "active"
        assert ann["attributes"] == {"seats": 3, "renews": "2027-01-31", "plan": "pro"}
        assert (ann["timezone"], ann["locale"]) == ("Europe/Paris", "fr-FR")
        assert ann["created_at"] and ann["updated_at"]
        # The same address in another spelling: the same contact, updated (200).
        r = await c.post(
            "/v1/contacts", json={"email": "ANN@example.com", "attributes": {"plan": None}}
        )
        assert r.status_code == 200 and r.json()["id"] == ann["id"]
        assert r.json()["attributes"] == {"seats": 3, "renews": "2027-01-31"}
        assert r.json()["name"] == "Ann"

        for i in range(4):
            r = await c.post("/v1/contacts", json={"email": f"u{i}@example.net"})
            assert r.status_code == 201
        r = await c.get("/v1/contacts", params={"limit": 3})
        first = r.json()
        assert len(first["data"]) == 3 and first["next_cursor"]
        r = await c.get("/v1/contacts", params={"limit": 3, "cursor": first["next_cursor"]})
        assert len(r.json()["data"]) == 2 and r.json()["next_cursor"] is None
        r = await c.get("/v1/contacts", params={"email": "  ann@EXAMPLE.com"})
        assert [x["id"] for x in r.json()["data"]] == [ann["id"]]
        r = await c.get("/v1/contacts", params={"email": "nobody@example.com"})
        assert r.json()["data"] == []

        url = f"/v1/contacts/{ann['id']}"
        r = await c.patch(url, json={"name": "Ann B", "attributes": {"seats": 5}, "timezone": None})
        assert r.status_code == 200, r.text
        got = r.json()
        assert (got["name"], got["attributes"]["seats"], got["timezone"]) == ("Ann B", 5, None)
        assert got["locale"] == "fr-FR" and got["updated_at"] >= ann["updated_at"]
        r = await c.get(url)
        assert r.status_code == 200 and r.json()["lists"] == [] and r.json()["topics"] == []
        assert r.json()["name"] == "Ann B"

        # A type cannot change while values of the old one do not fit it.
        r = await c.post("/v1/contact-attributes", json={"name": "seats", "type": "boolean"})
        assert r.status_code == 409 and "seats" in r.json()["error"]["message"]
        r = await c.post("/v1/contact-attributes", json={"name": "seats", "type": "string"})
        assert r.status_code == 409
        # ...but may when every value fits (a string attribute of strings, say).
        r = await c.post("/v1/contacts", json={"email": "u0@example.net", "attributes": {"t": "x"}})
        r = await c.post("/v1/contact-attributes", json={"name": "t", "type": "list"})
        assert r.status_code == 409
        r = await c.post("/v1/contact-attributes", json={"name": "t", "type": "string"})
        assert r.status_code == 201
        r = await c.get("/v1/contact-attributes")
        assert [(a["name"], a["type"]) for a in r.json()["data"]] == [
            ("seats", "number"),
            ("renews", "date"),
            ("t", "string"),
        ]
        assert (await c.delete("/v1/contact-attributes/seats")).status_code == 200
        assert (await c.delete("/v1/contact-attributes/seats")).status_code == 404
        # Undeclared, the values stay; any type may now be declared... if they fit.
        r = await c.post("/v1/contact-attributes", json={"name": "seats", "type": "string"})
        assert r.status_code == 409

        # Consents: added, listed, never changed.
        r = await c.post(
            f"{url}/consents",
            json={
                "source": "signup form",
                "wording_version": "v3",
                "purpose": "marketing",
                "ip": "2001:DB8::1",
            },
        )
        assert r.status_code == 201, r.text
        con = r.json()
        assert con["ip"] == "2001:db8::1" and con["at"] and con["contact_id"] == ann["id"]
        r = await c.post(
            f"{url}/consents", json={"source": "import", "at": "2026-01-02T03:04:05+01:00"}
        )
        assert r.status_code == 201 and r.json()["at"].startswith("2026-01-02T02:04:05")
        r = await c.get(f"{url}/consents")
        assert [x["source"] for x in r.json()["data"]] == ["signup form", "import"]
        assert (await c.patch(f"{url}/consents", json={})).status_code == 405
        for ip in ("1.2.3", "fe80::1%eth0", "::ffff:ffff:ffff%" + "a" * 28):
            assert fields(await c.post(f"{url}/consents", json={"source": "x", "ip": ip})) == ["ip"]
        assert fields(
            await c.post(f"{url}/consents", json={"source": "x", "at": "2026-01-01"})
        ) == ["at"]

        assert (await c.delete(url)).status_code == 200
        assert (await c.get(url)).status_code == 404
        assert (await c.get(f"{url}/consents")).status_code == 404
        assert (await c.delete(url)).status_code == 404
        assert (await c.patch(url, json={"name": "x"})).status_code == 404


@pytest.mark.sqlite_only
async def test_bad_input_names_the_field(control: ControlFactory) -> None:
    api = await control()
    key = await api.tenant("acme")
    async with api.client(key) as c:
        await c.post("/v1/contact-attributes", json={"name": "seats", "type": "number"})
        post = c.post
        assert fields(await post("/v1/contacts", json={"email": "not an address"})) == ["email"]
        assert fields(await post("/v1/contacts", json={"email": "a@x.test", "plan": 1})) == ["plan"]
        r = await post("/v1/contacts", json={"email": "a@x.test", "attributes": {"seats": "3"}})
        assert fields(r) == ["attributes.seats"]
        r = await post("/v1/contacts", json={"email": "a@x.test", "attributes": {"9x": 1}})
        assert fields(r) == ["attributes.9x"]
        r = await post("/v1/contacts", json={"email": "a@x.test", "timezone": "Mars/Olympus"})
        assert fields(r) == ["timezone"]
        r = await post("/v1/contacts", json={"email": "a@x.test", "timezone": "../../etc/passwd"})
        assert fields(r) == ["timezone"]
        assert fields(await post("/v1/contacts", json={"email": "a@x.test", "locale": "f"})) == [
            "locale"
        ]
        r = await post("/v1/contacts", json={"email": "a@x.test", "status": "gone"})
        assert fields(r) == ["status"]
        assert fields(await post("/v1/contacts", json={"email": "a@x.test", "name": "a\nb"})) == [
            "name"
        ]
        r = await post("/v1/contact-attributes", json={"name": "seats", "type": "money"})
        assert fields(r) == ["type"]
        r = await post("/v1/contact-attributes", json={"name": "a-b", "type": "string"})
        assert fields(r) == ["name"]
        r = await c.get("/v1/contacts", params={"status": "gone"})
        assert fields(r) == ["status"]
        r = await c.get("/v1/contacts", params={"cursor": "!!"})
        assert fields(r) == ["cursor"]
        # Nothing of it was written.
        assert (await c.get("/v1/contacts")).json()["data"] == []
        r = await post("/v1/contacts", json={"email": "a@x.test"})
        assert r.status_code == 201
        cid = r.json()["id"]
        r = await c.patch(f"/v1/contacts/{cid}", json={"email": "b@x.test"})
        assert fields(r) == ["email"]
        r = await c.patch(f"/v1/contacts/{cid}", json={"attributes": {"seats": True}})
        assert fields(r) == ["attributes.seats"]

        # Batch: too many items is refused whole.
        many = [{"email": f"u{i}@x.test"} for i in range(1001)]
        assert fields(await post("/v1/contacts/batch", json={"contacts": many})) == ["contacts"]
        assert fields(await post("/v1/contacts/batch", json={"contacts": []})) == ["contacts"]


async def test_batch_writes_the_good_and_reports_the_bad(control: ControlFactory) -> None:
    api = await control()
    key = await api.tenant("acme")
    async with api.client(key) as c:
        await c.post("/v1/contact-attributes", json={"name": "seats", "type": "number"})
        await c.post("/v1/contacts", json={"email": "old@x.test", "name": "Old"})
        items: list[Any] = [
            {"email": f"user{i}@x.test", "attributes": {"seats": i}} for i in range(995)
        ]
        items += [
            {"email": "OLD@x.test", "name": "Old, updated"},
            {"email": "bad"},
            {"email": "n@x.test", "attributes": {"seats": "many"}},
            {"email": "t@x.test", "timezone": "Nowhere/Land", "shoe": 42},
            "not an object",
        ]
        r = await c.post("/v1/contacts/batch", json={"contacts": items})
        assert r.status_code == 200, r.text
        out = r.json()
        assert (out["created"], out["updated"], out["failed"]) == (995, 1, 4)
        res = out["results"]
        assert [x["index"] for x in res] == list(range(1000))
        assert all(x["created"] and x["id"] and x["error"] is None for x in res[:995])
        assert res[995]["created"] is False and res[995]["error"] is None
        assert [f["path"] for f in res[996]["error"]["fields"]] == ["contacts[996].email"]
        assert [f["path"] for f in res[997]["error"]["fields"]] == [
            "contacts[997].attributes.seats"
        ]
        assert res[997]["error"]["message"].startswith("contacts[997].attributes.seats:")
        assert sorted(f["path"] for f in res[998]["error"]["fields"]) == [
            "contacts[998].shoe",
            "contacts[998].timezone",
        ]
        assert res[999]["error"]["fields"][0]["path"] == "contacts[999]"
        assert all(x["id"] is None for x in res[996:])
        r = await c.get("/v1/contacts", params={"email": "old@x.test"})
        assert r.json()["data"][0]["name"] == "Old, updated"
        r = await c.get("/v1/contacts", params={"email": "user994@x.test"})
        assert r.json()["data"][0]["attributes"] == {"seats": 994}
        for bad in ("n@x.test", "t@x.test"):
            assert (await c.get("/v1/contacts", params={"email": bad})).json()["data"] == []
        pages, cursor = 0, None
        while True:
            params: dict[str, Any] = {"limit": 1000, **({"cursor": cursor} if cursor else {})}
            page = (await c.get("/v1/contacts", params=params)).json()
            pages += len(page["data"])
            cursor = page["next_cursor"]
            if not cursor:
                break
        assert pages == 996
