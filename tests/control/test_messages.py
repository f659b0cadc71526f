"""The messages API end to end: a tenant made through the API sends through POST
/v1/messages and follows each recipient to delivered, bounced or dropped; bad input
gets a 422 naming the field; idempotency; batches; the events API."""

from __future__ import annotations

import asyncio
import base64
import email
import email.policy
from typing import Any

import httpx
import pytest

from tests.control.conftest import ControlApi, ControlFactory, domain_in_force
from tests.control.test_domains import verify_signatures
from tests.waiting import eventually


async def until(c: httpx.AsyncClient, msg_id: str, done: Any, timeout: float = 15) -> dict:  # type: ignore[type-arg]
    """The message's JSON once ``done`` says so of it."""
    last: list[httpx.Response] = []

    async def fetched() -> bool:
        r = await c.get(f"/v1/messages/{msg_id}")
        last[:] = [r]
        return r.status_code == 200 and bool(done(r.json()))

    try:
        await eventually(fetched, timeout, f"message {msg_id}", interval=0.1)
    except AssertionError:
        raise AssertionError(f"timed out: {last[0].status_code} {last[0].text[:2000]}") from None
    return last[0].json()  # type: ignore[no-any-return]


async def ready_tenant(api: ControlApi, name: str = "acme", domain: str = "acme.test") -> str:
    """A tenant's key, once the appliance's cache of verified domains has its domain."""
    key = await api.tenant(name)
    await api.verified_domain(key, domain)
    await domain_in_force(api, domain)
    return key


async def test_send_and_follow_each_recipient(control: ControlFactory) -> None:
    api = await control()
    api.lab.add_domain("inbox.test")
    api.lab.add_domain("nouser.test", behaviour="reject")
    key = await ready_tenant(api)
    pdf = b"%PDF-1.4 fake\x00\xff binary"
    async with api.client(key) as c:
        await c.post(
            "/v1/suppressions", json={"address": "unsub@inbox.test", "reason": "unsubscribe"}
        )
        r = await c.post(
            "/v1/messages",
            json={
                "from": {"email": "news@acme.test", "name": "Acme News"},
                "to": ["ann@inbox.test", {"email": "gone@nouser.test", "name": "Gone"}],
                "bcc": ["unsub@inbox.test", "hidden@inbox.test"],
                "subject": "Your order ünïcode",
                "text": "Hello\nthere",
                "html": "<p>Hello</p>",
                "headers": {"X-Campaign": "spring"},
                "attachments": [
                    {
                        "filename": "bill.pdf",
                        "content_type": "application/pdf",
                        "content": base64.b64encode(pdf).decode(),
                    }
                ],
                "tags": ["orders"],
                "metadata": {"order": "42"},
            },
        )
        assert r.status_code == 202, r.text
        sent = r.json()
        status = {x["email"]: x for x in sent["recipients"]}
        assert status["unsub@inbox.test"] == {
            **status["unsub@inbox.test"],
            "status": "dropped",
            "reason": "unsubscribe",
        }
        assert status["ann@inbox.test"]["status"] == "queued"
        final = {"delivered", "bounced", "dropped"}
        m = await until(
            c,
            sent["id"],
            lambda m: (
                len(m["recipients"]) == 4 and all(x["state"] in final for x in m["recipients"])
            ),
        )
    states = {x["email"]: x for x in m["recipients"]}
    assert states["ann@inbox.test"]["state"] == "delivered"
    assert states["hidden@inbox.test"]["state"] == "delivered"
    assert states["gone@nouser.test"]["state"] == "bounced"
    assert states["gone@nouser.test"]["last_response"].startswith("550")
    assert states["unsub@inbox.test"]["state"] == "dropped"
    assert states["unsub@inbox.test"]["last_response"] == "unsubscribe"
    assert {x["id"] for x in m["recipients"]} == {x["id"] for x in sent["recipients"]}
    assert m["source"] == "api" and m["tags"] == ["orders"] and m["metadata"] == {"order": "42"}
    types = [e["type"] for e in m["events"]]
    assert types.count("accepted") == 4 and "bounced" in types and "dropped" in types
    assert [e["id"] for e in m["events"]] == sorted(e["id"] for e in m["events"])
    bounced = next(e for e in m["events"] if e["type"] == "bounced")
    assert bounced["detail"]["response"].startswith("550")
    # What arrived: one copy per recipient (each with its own signed return path on the
    # verified domain, VERP); Bcc nowhere in the headers; signed.
    got = await api.lab.wait_for_messages(1)

    def inbox_copies() -> list[Any]:
        return [x for x in api.lab.messages if x.rcpt_tos[0].endswith("@inbox.test")]

    await eventually(lambda: len(inbox_copies()) >= 2, 10, "both copies for inbox.test")
    copies = inbox_copies()
    assert sorted(r for x in copies for r in x.rcpt_tos) == ["ann@inbox.test", "hidden@inbox.test"]
    assert all(len(x.rcpt_tos) == 1 and x.mail_from.endswith("@pwb.acme.test") for x in copies)
    inbox = [x for x in copies if "ann@inbox.test" in x.rcpt_tos]
    raw = inbox[0].data
    assert b"hidden@inbox.test" not in raw and b"unsub@" not in raw
    assert b"\nBcc:" not in raw and b"d=acme.test" in raw
    assert len(await verify_signatures(api, raw)) == 2  # both keys, checked by dkimpy
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    assert parsed["Subject"] == "Your order ünïcode" and parsed["X-Campaign"] == "spring"
    assert parsed["From"].addresses[0].display_name == "Acme News"
    att = next(parsed.iter_attachments())
    assert att.get_filename() == "bill.pdf" and att.get_content() == pdf
    body = parsed.get_body(("plain",))
    assert body is not None and body.get_content().replace("\r\n", "\n") == "Hello\nthere\n"
    assert got


async def expect_422(c: httpx.AsyncClient, body: dict[str, Any], path: str) -> None:
    r = await c.post("/v1/messages", json=body)
    assert r.status_code == 422, r.text
    paths = [f["path"] for f in r.json()["error"]["fields"]]
    assert path in paths, paths


@pytest.mark.sqlite_only  # HTTP/SMTP-level: see tests/control/conftest.py
async def test_bad_input_names_the_field_and_sends_nothing(control: ControlFactory) -> None:
    api = await control(
        {"smtp": {"max_message_size": "20KB"}, "control": {"max_api_recipients": 3}}
    )
    api.lab.add_domain("inbox.test")
    key = await ready_tenant(api)
    ok = {"from": "a@acme.test", "to": ["u@inbox.test"], "subject": "s", "text": "t"}
    async with api.client(key) as c:
        await expect_422(
            c, {**ok, "headers": {"X-Note": "a\r\nBcc: evil@x.test"}}, "headers.X-Note"
        )
        await expect_422(c, {**ok, "headers": {"X-Note\r\nBcc": "v"}}, "headers.X-Note\r\nBcc")
        await expect_422(c, {**ok, "headers": {"Bcc": "evil@x.test"}}, "headers.Bcc")
        await expect_422(c, {**ok, "subject": "hi\nBcc: evil@x.test"}, "subject")
        await expect_422(
            c, {**ok, "from": {"email": "a@acme.test", "name": "A\r\nBcc: e@x.test"}}, "from.name"
        )
        await expect_422(c, {**ok, "to": ["u@inbox.test", "not an address"]}, "to[1].email")
        await expect_422(c, {**ok, "to": ["u@inbox.test\r\nRCPT TO:<e@x.test>"]}, "to[0].email")
        await expect_422(c, {**ok, "from": "a@elsewhere.test"}, "from")
        await expect_422(c, {**ok, "to": [f"u{i}@inbox.test" for i in range(4)]}, "to")
        await expect_422(
            c,
            {**ok, "attachments": [{"filename": "a", "content": "%%%"}]},
            "attachments[0].content",
        )
        # Too large for smtp.max_message_size: 413 (issue 16), as docs/api.md says.
        big = base64.b64encode(b"x" * 30_000).decode()
        r = await c.post(
            "/v1/messages", json={**ok, "attachments": [{"filename": "a", "content": big}]}
        )
        assert r.status_code == 413, r.text
        assert r.json()["error"]["fields"][0]["path"] == "attachments[0].content"
        r = await c.post("/v1/messages", json={**ok, "text": "y" * 30_000})
        assert r.status_code == 413 and r.json()["error"]["fields"][0]["path"] == "body", r.text
        await expect_422(c, {k: v for k, v in ok.items() if k != "text"}, "body")
        await expect_422(c, {**ok, "colour": "red"}, "colour")
        await expect_422(c, {**ok, "tags": ["bad tag"]}, "tags[0]")
    # Nothing should happen, so there is no event to wait for: a window in which a
    # wrongly accepted message would reach the lab (delivery takes tens of ms here).
    await asyncio.sleep(0.3)
    assert not api.lab.messages


async def test_idempotency_key(control: ControlFactory) -> None:
    api = await control()
    api.lab.add_domain("inbox.test")
    key = await ready_tenant(api)
    body = {"from": "a@acme.test", "to": ["u@inbox.test"], "subject": "once", "text": "t"}
    async with api.client(key) as c:
        r1 = await c.post("/v1/messages", json=body, headers={"Idempotency-Key": "order-42"})
        r2 = await c.post("/v1/messages", json=body, headers={"Idempotency-Key": "order-42"})
        assert r1.status_code == r2.status_code == 202 and r1.json() == r2.json()
        r3 = await c.post(
            "/v1/messages",
            json={**body, "subject": "other"},
            headers={"Idempotency-Key": "order-42"},
        )
        assert r3.status_code == 409 and r3.json()["error"]["type"] == "idempotency_conflict"
        # The key is per tenant: another tenant's same key is its own.
        other = await api.tenant("other")
    await api.lab.wait_for_messages(1)
    await asyncio.sleep(0.5)  # a window for a wrong second copy to arrive (none should)
    assert len(api.lab.messages) == 1
    async with api.client(other) as c:
        r = await c.post("/v1/messages", json=body, headers={"Idempotency-Key": "order-42"})
        assert r.status_code == 422  # acme.test is not other's domain: its own answer


@pytest.mark.sqlite_only  # HTTP/SMTP-level: see tests/control/conftest.py
async def test_batch_all_or_nothing_validation(control: ControlFactory) -> None:
    api = await control({"control": {"max_batch": 5}})
    api.lab.add_domain("inbox.test")
    key = await ready_tenant(api)
    one = {"from": "a@acme.test", "subject": "s", "text": "t"}
    async with api.client(key) as c:
        bad = [{**one, "to": [f"u{i}@inbox.test"]} for i in range(3)]
        bad[1]["to"] = ["nope"]
        r = await c.post("/v1/messages/batch", json={"messages": bad})
        assert r.status_code == 422
        assert r.json()["error"]["fields"][0]["path"].startswith("messages[1].to[0]")
        r = await c.post(
            "/v1/messages/batch", json={"messages": [{**one, "to": ["u@inbox.test"]}] * 6}
        )
        assert r.status_code == 422 and r.json()["error"]["fields"][0]["path"] == "messages"
        good = [{**one, "to": [f"u{i}@inbox.test"]} for i in range(3)]
        r = await c.post("/v1/messages/batch", json={"messages": good})
        assert r.status_code == 202, r.text
        res = r.json()["results"]
        assert [x["index"] for x in res] == [0, 1, 2] and {x["status"] for x in res} == {202}
    await api.lab.wait_for_messages(3)
    await asyncio.sleep(0.3)  # a window for a wrong extra copy to arrive (none should)
    assert sorted(m.rcpt_tos[0] for m in api.lab.messages) == [
        "u0@inbox.test",
        "u1@inbox.test",
        "u2@inbox.test",
    ]


async def test_events_api_filters_and_pages(control: ControlFactory) -> None:
    api = await control()
    api.lab.add_domain("inbox.test")
    key = await ready_tenant(api)
    ids = []
    async with api.client(key) as c:
        for i in range(4):
            r = await c.post(
                "/v1/messages",
                json={
                    "from": "a@acme.test",
                    "to": [f"u{i}@inbox.test"],
                    "subject": "s",
                    "text": "t",
                    "tags": ["even" if i % 2 == 0 else "odd"],
                },
            )
            ids.append(r.json()["id"])
        for mid in ids:
            await until(c, mid, lambda m: m["recipients"][0]["state"] == "delivered")
        r = await c.get("/v1/events", params={"type": "delivered"})
        assert sorted(e["message_id"] for e in r.json()["data"]) == sorted(ids)
        r = await c.get("/v1/events", params={"tag": "even", "type": "delivered"})
        assert sorted(e["message_id"] for e in r.json()["data"]) == sorted(ids[0::2])
        r = await c.get("/v1/events", params={"message_id": ids[1]})
        assert [e["type"] for e in r.json()["data"]] == ["accepted", "delivered"]
        r = await c.get("/v1/events", params={"recipient": "u3@inbox.test"})
        assert {e["message_id"] for e in r.json()["data"]} == {ids[3]}
        seen, cursor = [], None
        while True:
            params: dict[str, Any] = {"limit": 3}
            if cursor:
                params["cursor"] = cursor
            page = (await c.get("/v1/events", params=params)).json()
            if not page["data"]:
                break
            seen += [e["id"] for e in page["data"]]
            cursor = page["next_cursor"]
        assert len(seen) == 8 and seen == sorted(seen)
        r = await c.get("/v1/events", params={"since": "2000-01-01T00:00:00"})
        assert r.status_code == 422 and r.json()["error"]["fields"][0]["path"] == "since"
        r = await c.get(
            "/v1/events", params={"since": "2000-01-01T00:00:00Z", "until": "2000-01-02T00:00:00Z"}
        )
        assert r.status_code == 200 and r.json()["data"] == []


async def test_idempotency_key_in_progress_and_abandoned(control: ControlFactory) -> None:
    import datetime as dt
    import hashlib

    from postwarden.store.models import IdempotencyKey

    api = await control()
    api.lab.add_domain("inbox.test")
    key = await ready_tenant(api)
    body = {"from": "a@acme.test", "to": ["u@inbox.test"], "subject": "s", "text": "t"}
    async with api.client(key) as c:
        tid = (await c.get("/v1/keys")).json()["data"][0]["tenant_id"]
        raw = httpx.Request("POST", "http://x/v1/messages", json=body).content
        digest = hashlib.sha256(b"/v1/messages\0" + raw).hexdigest()
        now = dt.datetime.now(dt.UTC)
        async with api.app.control.sessions() as s:
            # One request still running, one whose process died 11 minutes ago.
            s.add(
                IdempotencyKey(
                    tenant_id=tid,
                    key="busy",
                    request_hash=digest,
                    status_code=0,
                    response={},
                    created_at=now,
                )
            )
            s.add(
                IdempotencyKey(
                    tenant_id=tid,
                    key="dead",
                    request_hash=digest,
                    status_code=0,
                    response={},
                    created_at=now - dt.timedelta(minutes=11),
                )
            )
            await s.commit()
        r = await c.post("/v1/messages", json=body, headers={"Idempotency-Key": "busy"})
        assert r.status_code == 409 and r.json()["error"]["type"] == "idempotency_in_progress"
        r = await c.post("/v1/messages", json=body, headers={"Idempotency-Key": "dead"})
        assert r.status_code == 202, r.text


async def test_identical_idempotent_requests_at_once_send_one_message(
    control: ControlFactory,
) -> None:
    """Five at once, one process: one is carried out, the others answer as it did
    (or say it is still in progress); never a second message."""
    api = await control()
    api.lab.add_domain("inbox.test")
    key = await ready_tenant(api)
    body = {"from": "a@acme.test", "to": ["u@inbox.test"], "subject": "once", "text": "t"}
    async with api.client(key) as c:
        rs = await asyncio.gather(
            *(
                c.post("/v1/messages", json=body, headers={"Idempotency-Key": "burst"})
                for _ in range(5)
            )
        )
    ok = [r.json() for r in rs if r.status_code == 202]
    assert ok and all(o == ok[0] for o in ok), [r.text for r in rs]
    assert all(
        r.status_code == 202 or r.json()["error"]["type"] == "idempotency_in_progress" for r in rs
    )
    await api.lab.wait_for_messages(1)
    async with api.client(key) as c:  # the message's recipient is in its final answer
        r = await c.post("/v1/messages", json=body, headers={"Idempotency-Key": "burst"})
        assert r.status_code == 202 and r.json() == ok[0]
    assert len([m for m in api.lab.messages if m.rcpt_tos == ["u@inbox.test"]]) == 1
