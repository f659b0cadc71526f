"""/v1/templates end to end, on SQLite and PostgreSQL: versions, lint, previews with a
contact or sample data, hostile templates stopped, tenants kept apart; a test send
delivered into the lab, DKIM-signed and marked."""

from __future__ import annotations

import email
import email.policy
from typing import Any

import httpx
import pytest

from postwarden.content.variables import PLACEHOLDER_URLS
from postwarden.store.contact_models import AttributeDef
from postwarden.store.contacts import ContactIn, upsert_contacts
from tests.control.conftest import ControlApi, ControlFactory
from tests.control.test_domains import verify_signatures
from tests.control.test_messages import ready_tenant, until
from tests.waiting import eventually

ADDRESS = "Acme Inc., 1 Main St, Springfield"
HTML = (
    "<html><body><h1>Hi {{ contact.name }}</h1>"
    "<p>Plan: {{ contact.attributes.plan | default('free') }}, order {{ order_id }}</p>"
    '<img src="https://cdn.acme.test/logo.png">'
    "</body></html>"
)
FOOTER = '<p><a href="{{ unsubscribe_url }}">Unsubscribe</a> {{ postal_address }}</p>'


async def tenant_id(api: ControlApi, key: str) -> int:
    async with api.client(key) as c:
        return int((await c.get("/v1/keys")).json()["data"][0]["tenant_id"])


async def set_postal_address(api: ControlApi, tid: int, address: str) -> None:
    async with api.client(api.admin_key) as c:
        r = await c.patch(f"/v1/tenants/{tid}", json={"settings": {"postal_address": address}})
        assert r.status_code == 200 and r.json()["settings"]["postal_address"] == address, r.text


async def contact_with_plan(api: ControlApi, tid: int) -> int:
    """A contact with a declared attribute (the contacts API is another module's)."""
    async with api.app.control.sessions() as s:
        s.add(AttributeDef(tenant_id=tid, name="plan", type="string"))
        [made] = await upsert_contacts(
            s, tid, [ContactIn(email="Ann@Inbox.test", name="Ann", attributes={"plan": "pro"})]
        )
        await s.commit()
    return made.id


def codes(body: dict[str, Any]) -> list[tuple[str, str, str]]:
    return [(f["code"], f["severity"], f["location"]["part"]) for f in body["findings"]]


async def expect_422(r: httpx.Response, path: str, kind: str = "validation_error") -> dict:  # type: ignore[type-arg]
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["type"] == kind and err["fields"][0]["path"] == path, err
    return err  # type: ignore[no-any-return]


async def test_templates_versions_lint_and_preview(control: ControlFactory) -> None:
    api = await control()
    key = await api.tenant("acme")
    other = await api.tenant("other")
    reader = await api.tenant("readers", scopes=("read",))
    tid = await tenant_id(api, key)
    await set_postal_address(api, tid, ADDRESS)
    contact_id = await contact_with_plan(api, tid)
    body = {
        "name": "Welcome",
        "category": "marketing",
        "subject": "Welcome, {{ contact.name }}",
        "preheader": "Order {{ order_id }}",
        "html": HTML,
        "variables": [{"name": "order_id", "description": "the order", "sample": 42}],
    }
    async with api.client(key) as c:
        # Create: version 1; names are unique per tenant.
        r = await c.post("/v1/templates", json=body)
        assert r.status_code == 201, r.text
        t = r.json()
        assert (t["version"], t["text"], t["category"]) == (1, None, "marketing")
        assert t["variables"] == [{"name": "order_id", "description": "the order", "sample": 42}]
        r = await c.post("/v1/templates", json=body)
        assert r.status_code == 409 and r.json()["error"]["type"] == "conflict"
        r = await c.post("/v1/templates", json={"name": "x", "subject": "s", "html": "<p>t</p>"})
        assert r.status_code == 201 and r.json()["category"] == "transactional"
        other_id = r.json()["id"]

        # Bad input names the field and makes nothing.
        await expect_422(await c.post("/v1/templates", json={"name": "y", "subject": "s"}), "body")
        bad_var = {**body, "name": "z", "variables": [{"name": "contact"}]}
        await expect_422(await c.post("/v1/templates", json=bad_var), "variables[0]")
        await expect_422(
            await c.post("/v1/templates", json={**body, "name": "z", "subject": "a\nb"}), "subject"
        )
        await expect_422(
            await c.post("/v1/templates", json={**body, "name": "z", "category": "spam"}),
            "category",
        )
        r = await c.get("/v1/templates", params={"limit": 1})
        assert [x["name"] for x in r.json()["data"]] == ["Welcome"] and r.json()["next_cursor"]
        r = await c.get("/v1/templates", params={"cursor": r.json()["next_cursor"]})
        assert [x["name"] for x in r.json()["data"]] == ["x"] and r.json()["next_cursor"] is None
        r = await c.get("/v1/templates", params={"category": "marketing"})
        assert [(x["name"], x["version"]) for x in r.json()["data"]] == [("Welcome", 1)]

        # Lint: the marketing rules, the image, the generated text part, with places.
        r = await c.post(f"/v1/templates/{t['id']}/lint")
        assert r.status_code == 200, r.text
        lint = r.json()
        assert codes(lint) == [
            ("image_missing_alt", "warning", "html"),
            ("text_generated", "info", "text"),
            ("missing_unsubscribe", "error", "html"),
            ("missing_postal_address", "error", "html"),
        ]
        assert (lint["errors"], lint["warnings"], lint["infos"], lint["version"]) == (2, 1, 1, 1)
        img = lint["findings"][0]["location"]
        assert (img["line"], img["column"]) == (1, HTML.index("<img") + 1)

        # PATCH: new content is a new version; a name alone or equal content is not.
        fixed = HTML.replace("</body>", FOOTER + "</body>").replace('.png">', '.png" alt="">')
        r = await c.patch(f"/v1/templates/{t['id']}", json={"html": fixed})
        assert r.status_code == 200 and r.json()["version"] == 2, r.text
        r = await c.patch(f"/v1/templates/{t['id']}", json={"name": "Welcome 2", "html": fixed})
        assert r.status_code == 200 and (r.json()["version"], r.json()["name"]) == (2, "Welcome 2")
        r = await c.patch(f"/v1/templates/{t['id']}", json={"name": "x"})
        assert r.status_code == 409
        r = await c.patch(f"/v1/templates/{t['id']}", json={"text": "Hi {{ contact.name"})
        assert r.json()["version"] == 3
        r = await c.post(f"/v1/templates/{t['id']}/lint")
        assert codes(r.json()) == [("syntax_error", "error", "text")]
        loc = r.json()["findings"][0]["location"]
        assert (loc["line"], loc["column"]) == (1, 15)  # the last token: "name"
        r = await c.patch(f"/v1/templates/{t['id']}", json={"text": None})
        assert (r.json()["version"], r.json()["text"]) == (4, None)
        r = await c.post(f"/v1/templates/{t['id']}/lint")
        assert codes(r.json()) == [("text_generated", "info", "text")]
        await expect_422(await c.patch(f"/v1/templates/{t['id']}", json={"html": None}), "html")
        await expect_422(await c.patch(f"/v1/templates/{t['id']}", json={"name": None}), "name")

        # Versions: immutable, listed oldest first, each shown as it was.
        r = await c.get(f"/v1/templates/{t['id']}/versions", params={"limit": 3})
        assert [v["version"] for v in r.json()["data"]] == [1, 2, 3]
        r = await c.get(
            f"/v1/templates/{t['id']}/versions", params={"cursor": r.json()["next_cursor"]}
        )
        assert [v["version"] for v in r.json()["data"]] == [4]
        r = await c.get(f"/v1/templates/{t['id']}/versions/1")
        assert r.status_code == 200 and r.json()["html"] == HTML
        assert r.json()["created_by"] and r.json()["design"] is None
        assert (await c.get(f"/v1/templates/{t['id']}/versions/9")).status_code == 404
        assert (await c.get(f"/v1/templates/{t['id']}")).json()["version"] == 4

        # Preview with the declared sample, then with a contact and data on top.
        r = await c.post(f"/v1/templates/{t['id']}/preview", json={})
        assert r.status_code == 200, r.text
        p = r.json()
        assert (p["subject"], p["preheader"], p["text_generated"]) == ("Welcome,", "Order 42", True)
        assert "Plan: free, order 42" in p["text"] and ADDRESS in p["text"]
        assert f'href="{PLACEHOLDER_URLS["unsubscribe_url"]}"' in p["html"]
        assert codes(p) == [("text_generated", "info", "text")]
        r = await c.post(
            f"/v1/templates/{t['id']}/preview",
            json={"contact_id": contact_id, "data": {"order_id": "A-7<b>"}},
        )
        p = r.json()
        assert p["subject"] == "Welcome, Ann" and "<h1>Hi Ann</h1>" in p["html"]
        assert "Plan: pro, order A-7&lt;b&gt;" in p["html"] and "order A-7<b>" in p["text"]
        r = await c.post(f"/v1/templates/{t['id']}/preview", json={"version": 1})
        assert r.json()["version"] == 1 and "Unsubscribe" not in r.json()["html"]
        r = await c.post(f"/v1/templates/{t['id']}/preview", json={"contact_id": 10**6})
        await expect_422(r, "contact_id")

        # Hostile templates: stopped, with the part, line and limit.
        for html, limit in (
            ("{% for i in range(10**9) %}x{% endfor %}", "range"),
            ('line\n{{ "x" * 10**9 }}', "value"),
            ("{% macro m() %}{{ m() }}{% endmacro %}{{ m() }}", "recursion"),
        ):
            r = await c.patch(f"/v1/templates/{other_id}", json={"html": html})
            assert r.status_code == 200
            r = await c.post(f"/v1/templates/{other_id}/preview", json={})
            err = await expect_422(r, "html", "template_error")
            assert f"({limit} limit)" in err["message"], err
        assert "line 2" in err["message"] or limit != "value"
        r = await c.patch(f"/v1/templates/{other_id}", json={"html": "{{ ''.__class__ }}"})
        err = await expect_422(
            await c.post(f"/v1/templates/{other_id}/preview", json={}), "html", "template_error"
        )
        assert "security_error" in err["fields"][0]["message"]

    # Another tenant's key finds nothing; a read key may look but not change.
    async with api.client(other) as c:
        for r in (
            await c.get(f"/v1/templates/{t['id']}"),
            await c.get(f"/v1/templates/{t['id']}/versions"),
            await c.get(f"/v1/templates/{t['id']}/versions/1"),
            await c.patch(f"/v1/templates/{t['id']}", json={"name": "mine"}),
            await c.post(f"/v1/templates/{t['id']}/lint"),
            await c.post(f"/v1/templates/{t['id']}/preview", json={}),
            await c.delete(f"/v1/templates/{t['id']}"),
        ):
            assert r.status_code == 404, r.text
        assert (await c.get("/v1/templates")).json()["data"] == []
        r = await c.post(f"/v1/templates/{t['id']}/preview", json={"contact_id": contact_id})
        assert r.status_code == 404
    async with api.client(reader) as c:
        r = await c.post("/v1/templates", json=body)
        assert r.status_code == 403
    async with api.client(key) as c:
        assert (await c.delete(f"/v1/templates/{t['id']}")).status_code == 200
        assert (await c.get(f"/v1/templates/{t['id']}")).status_code == 404
        assert (await c.get(f"/v1/templates/{t['id']}/versions")).status_code == 404
        assert (await c.post("/v1/templates", json=body)).status_code == 201  # the name is free


# The send path (acceptance, DKIM, delivery): nothing of it is the database's.
@pytest.mark.sqlite_only
async def test_test_send_is_delivered_signed_and_marked(control: ControlFactory) -> None:
    api = await control()
    api.lab.add_domain("inbox.test")
    key = await ready_tenant(api)
    tid = await tenant_id(api, key)
    await set_postal_address(api, tid, ADDRESS)
    contact_id = await contact_with_plan(api, tid)
    async with api.client(key) as c:
        await c.post("/v1/suppressions", json={"address": "gone@inbox.test"})
        r = await c.post(
            "/v1/templates",
            json={
                "name": "news",
                "category": "marketing",
                "subject": "News for {{ contact.name }}",
                "html": HTML.replace("</body>", FOOTER + "</body>"),
                "variables": [{"name": "order_id", "sample": 7}],
            },
        )
        t = r.json()
        send = {
            "from": {"email": "news@acme.test", "name": "Acme"},
            "to": ["seed1@inbox.test", "Seed2@Inbox.test", "gone@inbox.test"],
            "contact_id": contact_id,
        }
        r = await c.post(f"/v1/templates/{t['id']}/test-send", json=send)
        assert r.status_code == 202, r.text
        out = r.json()
        assert (out["template_id"], out["version"]) == (t["id"], 1)
        states = [m["recipients"][0]["status"] for m in out["messages"]]
        assert states == ["queued", "queued", "dropped"]  # the suppression check holds
        first = out["messages"][0]["id"]
        m = await until(c, first, lambda m: m["recipients"][0]["state"] == "delivered")
        assert m["tags"] == ["test-send"]
        assert m["metadata"] == {"template_id": str(t["id"]), "template_version": "1"}

        # Refused before anything is sent: an unverified From, too many addresses, a
        # template that does not render.
        bad = {**send, "from": "news@elsewhere.test"}
        await expect_422(await c.post(f"/v1/templates/{t['id']}/test-send", json=bad), "from")
        many = {**send, "to": [f"s{i}@inbox.test" for i in range(11)]}
        await expect_422(await c.post(f"/v1/templates/{t['id']}/test-send", json=many), "to")
        await c.patch(f"/v1/templates/{t['id']}", json={"subject": "{{ 'x' * 10**9 }}"})
        r = await c.post(f"/v1/templates/{t['id']}/test-send", json=send)
        await expect_422(r, "subject", "template_error")

    def arrived() -> list[Any]:
        return [x for x in api.lab.messages if x.rcpt_tos[0].lower().startswith("seed")]

    await eventually(lambda: len(arrived()) == 2, 15, "both seed copies in the lab")
    assert sorted(x.rcpt_tos[0] for x in arrived()) == ["Seed2@inbox.test", "seed1@inbox.test"]
    assert not [x for x in api.lab.messages if "gone@" in x.rcpt_tos[0]]
    raw = arrived()[0].data
    assert len(await verify_signatures(api, raw)) >= 1
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    assert parsed["X-Postwarden-Test"] == "1" and parsed["Subject"] == "News for Ann"
    assert parsed.get_content_type() == "multipart/alternative"
    text = parsed.get_body(("plain",))
    html = parsed.get_body(("html",))
    assert text is not None and html is not None
    assert "Plan: pro, order 7" in text.get_content() and ADDRESS in text.get_content()
    assert "<h1>Hi Ann</h1>" in html.get_content()
