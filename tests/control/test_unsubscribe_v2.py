"""List-Unsubscribe with the tenant's keys (issue 22): the token is a version 2 token
under the tenant's links key; one POST unsubscribes, suppresses, moves the contact and
adds one ``unsubscribed`` event; the mailto is handled by the appliance's inbound MX
the same way; a tracking token or a forged one on either way in does nothing."""

from __future__ import annotations

import re
from urllib.parse import urlsplit

import aiosmtplib

from postwarden.control.unsubscribe import list_unsubscribe_headers
from postwarden.engagement import tokens
from postwarden.engagement.tokens import Kind, Link
from tests.conftest import free_port
from tests.control.conftest import ControlApi, ControlFactory
from tests.control.test_messages import ready_tenant
from tests.control.test_unsubscribe import campaign_with_records, requests_of, tenant_id
from tests.waiting import eventually


async def events(api: ControlApi, key: str, kind: str) -> list[dict[str, object]]:
    async with api.client(key) as c:
        r = await c.get("/v1/events", params={"type": kind})
        assert r.status_code == 200, r.text
        data: list[dict[str, object]] = r.json()["data"]
        return data


def parts(fields: list[tuple[str, str]]) -> tuple[str, str]:
    """The HTTPS link's path and the mailto's address of a List-Unsubscribe value."""
    value = dict(fields)["List-Unsubscribe"]
    https, mailto = re.findall(r"<([^>]+)>", value)
    return urlsplit(https).path, mailto.removeprefix("mailto:")


async def test_one_click_unsubscribes_once_with_one_event(control: ControlFactory) -> None:
    api = await control()
    key = await ready_tenant(api)
    tid = await tenant_id(api, key)
    cid, (ann,) = await campaign_with_records(api, tid, ["ann@inbox.test"])
    plane = api.app.control
    signer = await plane.tenant_keys.signer(tid)
    path, _ = parts(list_unsubscribe_headers(plane, tid, cid, ann, "acme.test", signer))
    token = path.removeprefix("/u/")
    assert tokens.kid_of(token) == signer.kid  # the tenant's key, not the appliance's
    tracking = tokens.make(signer.kid, signer.key, Link(Kind.OPEN, cid, ann))
    async with api.client() as c:
        assert (await c.post(f"/u/{tracking}")).status_code == 404
        for _ in range(2):
            r = await c.post(path, data={"List-Unsubscribe": "One-Click"})
            assert r.status_code == 200 and "location" not in r.headers
    assert plane.suppressions.check(tid, "ann@inbox.test") == "unsubscribe"
    got = await events(api, key, "unsubscribed")
    assert [(e["recipient"], e["detail"]["method"], e["detail"]["campaign_id"])  # type: ignore[index]
            for e in got] == [("ann@inbox.test", "POST", cid)]  # fmt: skip
    async with api.client(key) as c:
        r = await c.get(f"/v1/contacts/{ann}")
        assert r.json()["status"] == "unsubscribed", r.text
        stats = (await c.get(f"/v1/campaigns/{cid}/stats")).json()
        assert stats["unsubscribed"] == 1, stats


async def test_the_mailto_is_handled_by_the_inbound_mx(control: ControlFactory) -> None:
    port = free_port()
    api = await control({"inbound": {"listen": [f"127.0.0.1:{port}"]}})
    key = await ready_tenant(api)
    tid = await tenant_id(api, key)
    cid, (ann, _bob) = await campaign_with_records(api, tid, ["ann@inbox.test", "bob@inbox.test"])
    plane = api.app.control
    signer = await plane.tenant_keys.signer(tid)
    _, mailto = parts(list_unsubscribe_headers(plane, tid, cid, ann, "acme.test", signer))
    assert re.fullmatch(r"unsubscribe\+[A-Za-z0-9_-]+@pwb\.acme\.test", mailto), mailto
    local, _, domain = mailto.partition("@")
    forged = local[:-2] + ("AA" if not local.endswith("AA") else "BB") + "@" + domain
    note = b"Subject: unsubscribe\r\n\r\nplease\r\n"
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False) as smtp:
        await smtp.sendmail("ann@inbox.test", [forged], note)
        await smtp.sendmail("ann@inbox.test", [mailto], note)

    async def suppressed() -> bool:
        return plane.suppressions.check(tid, "ann@inbox.test") == "unsubscribe"

    await eventually(suppressed, 30, "the mailto's unsubscribe")
    rows = await requests_of(api, tid)
    assert [(r.method, r.email, r.user_agent) for r in rows] == [
        ("mailto", "ann@inbox.test", "mail from <ann@inbox.test>")
    ]
    assert plane.suppressions.check(tid, "bob@inbox.test") is None

    async def counted() -> bool:  # the processor counts the report once it is done
        return bool(api.app.metrics.inbound_reports.labels("unsubscribe")._value.get() == 1)

    await eventually(counted, 30, "the mailto counted as an unsubscribe report")
    got = await events(api, key, "unsubscribed")
    assert [e["detail"]["method"] for e in got] == ["mailto"]  # type: ignore[index]

    async def forged_kept() -> bool:
        return api.app.metrics.inbound_reports.labels("unparsed")._value.get() == 1

    await eventually(forged_kept, 30, "the forged mailto kept as unparsed")
