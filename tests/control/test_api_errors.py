"""Errors that say what is wrong (issue 16, items 5-8): which key a route needs, a
disabled tenant, unknown filter values, request ids on every answer, no pydantic
prefixes in messages, 413 for a message over smtp.max_message_size."""

from __future__ import annotations

import base64
import re
from typing import get_args

import httpx
import pytest

from postwarden.control.api import api as declared
from postwarden.control.event_list import EventType
from postwarden.control.events import STATE_AFTER
from postwarden.queue.records import OPERATOR_ACTIONS
from tests.control.conftest import ControlFactory
from tests.control.test_messages import ready_tenant

# Error envelopes, request ids, the docs page, validation answers: SQLite only
# (the rule is in tests/control/conftest.py).
pytestmark = pytest.mark.sqlite_only

HEX_ID = re.compile(r"^[0-9a-f]{16}$")


async def test_wrong_key_kind_or_scope_says_what_is_needed(control: ControlFactory) -> None:
    api = await control()
    reader = await api.tenant("acme", scopes=("read",))
    sender = await api.tenant("other", scopes=("send",))
    async with api.client(api.admin_key) as c:
        r = await c.get("/v1/domains")
        assert r.status_code == 403
        msg = r.json()["error"]["message"]
        assert msg.startswith(
            "this route needs a tenant key with the 'read' scope; this is an operator key"
        ), msg
        r = await c.post("/v1/messages", json={})
        assert (
            "a tenant key with the 'send' scope; this is an operator key"
            in (r.json()["error"]["message"])
        )
    async with api.client(reader) as c:
        r = await c.get("/v1/tenants")
        assert r.status_code == 403
        assert r.json()["error"]["message"] == (
            "this route needs an operator key (scope 'admin'); this is a key of tenant 'acme'"
        )
        r = await c.post("/v1/domains", json={"name": "acme.test"})
        assert r.status_code == 403
        assert r.json()["error"]["message"] == (
            "this route needs the 'manage' scope; this key has 'read'"
        )
    async with api.client(sender) as c:
        r = await c.get("/v1/suppressions")
        assert r.status_code == 403
        assert r.json()["error"]["message"] == (
            "this route needs the 'read' scope or 'manage'; this key has 'send'"
        )


async def test_docs_and_openapi_name_the_key_each_route_needs(control: ControlFactory) -> None:
    api = await control()
    async with api.client() as c:
        schema = (await c.get("/openapi.json")).json()
        page = (await c.get("/docs")).text
    ops = {(m.upper(), p): op for p, item in schema["paths"].items() for m, op in item.items()}
    assert ops[("GET", "/v1/tenants")]["x-postwarden-key"] == "operator key (admin)"
    assert ops[("POST", "/v1/messages")]["x-postwarden-key"] == "tenant key, scope send"
    assert ops[("GET", "/v1/events")]["x-postwarden-key"] == "tenant key, scope read"
    assert ops[("POST", "/v1/domains")]["x-postwarden-key"] == "tenant key, scope manage"
    assert ops[("POST", "/v1/messages")]["description"].startswith("Key: tenant key, scope send.")
    assert "(key)" not in page
    for (method, path), op in ops.items():
        # Every declared operation, on the page with the key its schema entry names.
        row = re.search(
            rf"<tr><td><code>{method}</code></td><td><code>{re.escape(path)}</code></td>"
            r"<td>[^<]*</td><td>([^<]*)</td></tr>",
            page,
        )
        assert row is not None, (method, path)
        assert row.group(1) == op["x-postwarden-key"], (method, path)
    assert len(ops) == len(declared.ops)


def test_event_type_lists_every_type_the_appliance_writes() -> None:
    allowed = set(get_args(EventType))
    assert set(STATE_AFTER) <= allowed
    assert {kind for _, _, kind in OPERATOR_ACTIONS.values()} <= allowed
    assert "complained" in allowed


async def test_unknown_filter_values_are_422_with_the_allowed_values(
    control: ControlFactory,
) -> None:
    api = await control()
    key = await api.tenant("acme")
    async with api.client(key) as c:
        r = await c.get("/v1/events", params={"type": "bounce"})
        assert r.status_code == 422, r.text
        err = r.json()["error"]
        assert err["fields"][0]["path"] == "type"
        for value in ("'bounce'", "'bounced'", "'delivered'", "'complained'"):
            assert value in err["message"], err["message"]
        assert (await c.get("/v1/events", params={"type": "bounced"})).status_code == 200
        r = await c.get("/v1/suppressions", params={"reason": "spam"})
        assert r.status_code == 422
        err = r.json()["error"]
        assert err["fields"][0]["path"] == "reason"
        assert "'spam'" in err["message"] and "'soft_bounce'" in err["message"]
        schema = (await c.get("/openapi.json")).json()
    params = {p["name"]: p for p in schema["paths"]["/v1/events"]["get"]["parameters"]}
    listed = params["type"]["schema"]["anyOf"][0]["enum"]
    assert set(listed) == set(get_args(EventType))
    params = {p["name"]: p for p in schema["paths"]["/v1/suppressions"]["get"]["parameters"]}
    assert "soft_bounce" in params["reason"]["schema"]["anyOf"][0]["enum"]


async def test_every_answer_carries_a_request_id(control: ControlFactory) -> None:
    """404 (no route, or a path parameter that does not convert), 405, 401 of /metrics
    and of the API, 403, 200: the id is in the header and in the error body."""
    api = await control({"metrics": {"bearer_token_sha256": "0" * 64}})
    key = await api.tenant("acme")

    def check(r: httpx.Response, given: str | None) -> None:
        rid = r.headers["x-request-id"]
        assert rid == given if given else HEX_ID.match(rid), (r.status_code, rid)
        if r.status_code >= 400:
            assert r.json()["error"]["request_id"] == rid, r.text

    for given in ("client-id.42", None):
        headers = {"X-Request-Id": given} if given else {}
        async with api.client(key) as c:
            for method, path, status in (
                ("GET", "/v1/nowhere", 404),
                ("GET", "/v1/tenants/not-a-number", 404),
                ("GET", "/v1/domains/99999999999999999999", 404),
                ("PUT", "/v1/domains", 405),
                ("GET", "/metrics", 401),
                ("GET", "/v1/tenants", 403),
                ("GET", "/v1/domains", 200),
                ("GET", "/healthz", 200),
            ):
                r = await c.request(method, path, headers=headers)
                assert r.status_code == status, (path, r.text)
                check(r, given)
        async with api.client("pw_000000000000_" + "A" * 43) as c:
            r = await c.get("/v1/domains", headers=headers)
            assert r.status_code == 401
            check(r, given)
    # A made id is made once: the body's and the header's are the same, and new each time.
    async with api.client() as c:
        a, b = await c.get("/v1/nowhere"), await c.get("/v1/nowhere")
        assert a.headers["x-request-id"] != b.headers["x-request-id"]
        # Starlette's own 404 and 405 say what is wrong, not only "Not Found".
        assert a.json()["error"]["message"] == (
            "nothing at /v1/nowhere: /docs lists the paths and the form of their parameters"
        )
        r = await c.put("/v1/domains")
        assert (
            r.json()["error"]["message"]
            == "/v1/domains does not take PUT; it takes GET, HEAD, POST"
        )


async def test_validator_messages_have_no_pydantic_prefix(control: ControlFactory) -> None:
    api = await control()
    key = await api.tenant("acme")
    async with api.client(key) as c:
        r = await c.post(
            "/v1/suppressions",
            json={"address": "x@example.com", "expires_at": "2030-01-01T00:00:00"},
        )
        assert r.status_code == 422
        field = r.json()["error"]["fields"][0]
        assert field == {
            "path": "expires_at",
            "message": "give a time zone (e.g. 2027-01-01T00:00:00Z)",
        }
        assert "Value error" not in r.text
        r = await c.post("/v1/domains", json={"name": "not_a_domain!"})
        assert r.status_code == 422
        assert r.json()["error"]["message"] == "name: not a domain name", r.text


@pytest.mark.parametrize("control", ["sqlite"], indirect=True)
async def test_message_over_the_size_limit_is_413(control: ControlFactory) -> None:
    limit = 20_000
    api = await control({"smtp": {"max_message_size": limit}})
    api.lab.add_domain("inbox.test")
    key = await ready_tenant(api)
    ok = {"from": "a@acme.test", "to": ["u@inbox.test"], "subject": "s", "text": "t"}
    big = {**ok, "text": "y" * (limit + 1)}
    attachment = {"filename": "a.bin", "content": base64.b64encode(b"x" * (limit + 1)).decode()}
    async with api.client(key) as c:
        for body, path in (
            (big, "body"),
            ({**ok, "attachments": [attachment]}, "attachments[0].content"),
        ):
            r = await c.post("/v1/messages", json=body)
            assert r.status_code == 413, r.text
            err = r.json()["error"]
            assert err["type"] == "too_large"
            assert err["fields"][0]["path"] == path
            assert f"the limit (smtp.max_message_size) is {limit} bytes" in err["message"]
        r = await c.post("/v1/messages/batch", json={"messages": [ok, big]})
        assert r.status_code == 413, r.text
        err = r.json()["error"]
        assert err["type"] == "too_large" and err["fields"][0]["path"] == "messages[1].body"
        # Just under the limit still goes.
        r = await c.post("/v1/messages", json={**ok, "text": "y" * (limit // 2)})
        assert r.status_code == 202, r.text
    await api.lab.wait_for_messages(1)
    assert len(api.lab.messages) == 1
