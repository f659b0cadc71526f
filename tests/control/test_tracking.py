"""The tracking endpoints through the real appliance (issue 22): the pixel and the
redirect store their hit before they answer; a forged, altered, retired or
wrong-kind token answers 404 and is counted, never redirected; the destination comes
from the sealed token alone; keys rotate with overlap and retire."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from sqlalchemy import select

from postwarden.engagement.tokens import Kind, Link
from postwarden.lab import Lab
from postwarden.store.engagement_models import TrackingHit
from tests.control.conftest import ControlApi, ControlFactory
from tests.control.test_database_outage import api_on, own_postgres  # noqa: F401
from tests.control.test_unsubscribe import tenant_id
from tests.pg import PgServer


async def hits(api: ControlApi) -> list[TrackingHit]:
    async with api.app.control.sessions() as s:
        return list((await s.execute(select(TrackingHit).order_by(TrackingHit.id))).scalars())


async def token(api: ControlApi, tid: int, link: Link) -> str:
    plane = api.app.control
    return plane.tenant_keys.make(await plane.tenant_keys.signer(tid), link)


def counted(api: ControlApi, kind: str, verdict: str) -> float:
    return api.app.metrics.tracking_requests.labels(kind, verdict)._value.get()  # type: ignore[no-any-return]


def altered(tok: str) -> list[str]:
    """The token with one character changed at a few places, cut, and lengthened."""
    out = []
    for at in (0, 3, 8, len(tok) // 2, len(tok) - 1):
        ch = "A" if tok[at] != "A" else "B"
        out.append(tok[:at] + ch + tok[at + 1 :])
    return [*out, tok[:-1], tok + "A", tok[:10]]


async def test_pixel_and_redirect_store_their_hit_before_answering(
    control: ControlFactory,
) -> None:
    api = await control()
    key = await api.tenant("acme")
    tid = await tenant_id(api, key)
    dest = "https://shop.example.com/sale?utm_source=mail&x=ä b"
    open_tok = await token(api, tid, Link(Kind.OPEN, 7, 42, 0, "m1.0"))
    click_tok = await token(api, tid, Link(Kind.CLICK, 7, 42, 3, "m1.0", dest))
    async with api.client(follow_redirects=False) as c:
        r = await c.get(f"/t/o/{open_tok}", headers={"User-Agent": "Thunderbird/115"})
        assert r.status_code == 200 and r.headers["content-type"] == "image/gif", r.text
        assert r.content.startswith(b"GIF89a") and "no-store" in r.headers["cache-control"]
        assert "set-cookie" not in r.headers
        got = await hits(api)
        assert [(h.kind, h.campaign_id, h.contact_id, h.message_id) for h in got] == [
            ("open", 7, 42, "m1.0")
        ]
        assert got[0].user_agent == "Thunderbird/115" and got[0].machine is None
        assert got[0].ip == "127.0.0.1" and got[0].method == "GET"

        r = await c.get(
            f"/t/c/{click_tok}?url=https://evil.example/", headers={"Range": "bytes=0-"}
        )
        assert r.status_code == 302, r.text
        assert r.headers["location"] == "https://shop.example.com/sale?utm_source=mail&x=%C3%A4%20b"
        r = await c.head(f"/t/c/{click_tok}")
        assert r.status_code == 302
    got = await hits(api)
    clicks = [h for h in got if h.kind == "click"]
    assert [(h.method, h.ranged, h.link_index, h.url) for h in clicks] == [
        ("GET", True, 3, dest),
        ("HEAD", False, 3, dest),
    ]
    assert counted(api, "click", "valid") == 2 and counted(api, "open", "valid") == 1


async def test_forged_altered_and_wrong_kind_tokens_are_404(control: ControlFactory) -> None:
    api = await control()
    key = await api.tenant("acme")
    tid = await tenant_id(api, key)
    click_tok = await token(api, tid, Link(Kind.CLICK, 1, 2, 0, "", "https://a.example/"))
    open_tok = await token(api, tid, Link(Kind.OPEN, 1, 2))
    unsub_tok = await token(api, tid, Link(Kind.UNSUBSCRIBE, 1, 2))
    bad = [
        *(f"/t/c/{t}" for t in altered(click_tok)),
        *(f"/t/o/{t}" for t in altered(open_tok)),
        f"/t/c/{open_tok}",  # a pixel's token on the redirect
        f"/t/o/{click_tok}",
        f"/t/c/{unsub_tok}",
        "/t/c/x",
        "/t/o/" + "A" * 60,
    ]
    async with api.client(follow_redirects=False) as c:
        for path in bad:
            r = await c.get(path)
            assert r.status_code == 404, (path, r.status_code)
            assert "location" not in r.headers
    assert await hits(api) == []
    assert counted(api, "click", "forged") + counted(api, "open", "forged") == len(bad)


@pytest.mark.sqlite_only
async def test_a_token_of_one_tenant_reads_as_that_tenant(control: ControlFactory) -> None:
    api = await control()
    a = await tenant_id(api, await api.tenant("a"))
    b = await tenant_id(api, await api.tenant("b"))
    tok = await token(api, b, Link(Kind.OPEN, 5, 6))
    async with api.client() as c:
        assert (await c.get(f"/t/o/{tok}")).status_code == 200
    assert [(h.tenant_id, h.contact_id) for h in await hits(api)] == [(b, 6)]
    assert a != b


async def test_keys_rotate_with_overlap_and_retire(control: ControlFactory) -> None:
    api = await control()
    key = await api.tenant("acme")
    tid = await tenant_id(api, key)
    async with api.client(key, follow_redirects=False) as c:
        r = await c.get("/v1/tracking/keys")
        assert r.status_code == 200 and r.json()["data"] == []
        r = await c.post("/v1/tracking/keys")
        assert r.status_code == 201, r.text
        first = r.json()["data"]
        assert [(k["generation"], k["signing"]) for k in first] == [(1, True)]
        old = await token(api, tid, Link(Kind.OPEN, 1, 1))
        r = await c.post("/v1/tracking/keys")
        assert [(k["generation"], k["signing"]) for k in r.json()["data"]] == [
            (2, True),
            (1, False),
        ]
        new = await token(api, tid, Link(Kind.OPEN, 1, 1))
        assert new[:8] != old[:8]  # another kid
        assert (await c.get(f"/t/o/{old}")).status_code == 200  # the overlap
        assert (await c.get(f"/t/o/{new}")).status_code == 200
        newest = r.json()["data"][0]["kid"]
        r = await c.post(f"/v1/tracking/keys/{newest}/retire")
        assert r.status_code == 409, r.text
        r = await c.post(f"/v1/tracking/keys/{first[0]['kid']}/retire")
        assert r.status_code == 200, r.text
        assert r.json()["data"][1]["retired_at"] is not None
        assert (await c.get(f"/t/o/{old}")).status_code == 404
        assert (await c.get(f"/t/o/{new}")).status_code == 200
        assert (await c.post("/v1/tracking/keys/00000000/retire")).status_code == 404
        assert (await c.post("/v1/tracking/keys/nothex/retire")).status_code == 404
    other = await api.tenant("other")
    async with api.client(other) as c:
        # Another tenant neither sees nor retires them.
        assert (await c.get("/v1/tracking/keys")).json()["data"] == []
        assert (await c.post(f"/v1/tracking/keys/{newest}/retire")).status_code == 404


@pytest.mark.sqlite_only
async def test_ip_addresses_are_truncated_when_the_tenant_asks(control: ControlFactory) -> None:
    api = await control()
    key = await api.tenant("acme")
    tid = await tenant_id(api, key)
    async with api.client(api.admin_key) as c:
        r = await c.patch(f"/v1/tenants/{tid}", json={"settings": {"truncate_ip": True}})
        assert r.status_code == 200, r.text
    tok = await token(api, tid, Link(Kind.OPEN, 1, 1))
    async with api.client() as c:
        r = await c.get(f"/t/o/{tok}", headers={"X-Forwarded-For": "203.0.113.77"})
        assert r.status_code == 200
        r = await c.get(f"/t/o/{tok}")  # from loopback itself
    # uvicorn takes X-Forwarded-For from a proxy on loopback (a proxy in front).
    assert [h.ip for h in await hits(api)] == ["203.0.113.0/24", "127.0.0.0/24"]


@pytest.mark.sqlite_only  # the message path; the hits' storage has its twin above
async def test_an_api_message_that_asks_is_tracked(control: ControlFactory) -> None:
    import datetime as dt
    import email
    import email.policy
    import re
    from urllib.parse import urlsplit

    from tests.control.test_messages import ready_tenant, until

    api = await control()
    api.lab.add_domain("inbox.test")
    key = await ready_tenant(api)
    html = '<p><a href="https://shop.example/a?x=1&amp;y=2">Shop</a></p>'
    async with api.client(key, follow_redirects=False) as c:
        sent = {}
        for tracking in (True, False):
            r = await c.post("/v1/messages", json={
                "from": "news@acme.test", "to": [f"{tracking}@inbox.test"], "subject": "s",
                "html": html, "tracking": tracking})  # fmt: skip
            assert r.status_code == 202, r.text
            sent[tracking] = r.json()["id"]
            await until(c, sent[tracking], lambda m: m["recipients"][0]["state"] == "delivered")
        bodies = {}
        for m in api.lab.messages:
            part = email.message_from_bytes(m.data, policy=email.policy.default).get_body(("html",))
            assert part is not None
            bodies[m.rcpt_tos[0]] = part.get_content()
        assert "https://shop.example/a?x=1&amp;y=2" in bodies["False@inbox.test"]
        tracked = bodies["True@inbox.test"]
        assert "shop.example" not in tracked and "/t/o/" in tracked
        (link,) = re.findall(r'href="([^"]+/t/c/[^"]+)"', tracked)
        r = await c.get(
            urlsplit(link).path, headers={"User-Agent": "Mozilla/5.0 (X11) Firefox/133"}
        )
        assert r.status_code == 302 and r.headers["location"] == "https://shop.example/a?x=1&y=2"
    plane = api.app.control
    assert plane.verdicts is not None
    later = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=plane.verdicts.settle + 3600)
    assert await plane.verdicts.run_once(later) == 1
    async with api.client(key) as c:
        r = await c.get("/v1/events", params={"type": "clicked"})
        got = r.json()["data"]
    assert [(e["message_id"], e["recipient"]) for e in got] == [(sent[True], "True@inbox.test")]


async def test_with_the_database_stopped_people_still_get_there(
    request: pytest.FixtureRequest, appliance: Any, lab: Lab
) -> None:
    """The pixel and the redirect answer from the cached keys; the hit is counted as
    lost, never a 5xx for the person clicking."""
    server: PgServer = request.getfixturevalue("own_postgres")  # stopped, restarted
    api = await api_on(server, appliance, lab)
    tid = await tenant_id(api, await api.tenant("acme"))
    click = await token(api, tid, Link(Kind.CLICK, 1, 2, 0, "m", "https://shop.example/x"))
    pixel = await token(api, tid, Link(Kind.OPEN, 1, 2))
    await asyncio.to_thread(server.stop)
    try:
        async with api.client(follow_redirects=False) as c:
            r = await c.get(f"/t/c/{click}")
            assert r.status_code == 302 and r.headers["location"] == "https://shop.example/x"
            assert (await c.get(f"/t/o/{pixel}")).status_code == 200
    finally:
        await asyncio.to_thread(server.restart)
    assert counted(api, "click", "lost") == 1 and counted(api, "open", "lost") == 1
    assert counted(api, "click", "valid") == 0
