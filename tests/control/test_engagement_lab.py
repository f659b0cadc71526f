"""Issue 22's scenario in the lab, end to end through the real appliance: a campaign's
message is opened by a person-like client and by a simulated Apple MPP proxy, its link
clicked by a scanner right after delivery and later by a person; the campaign shows one
human open and one human click, the rest flagged with the rule that decided; a forged
token gets 404; a one-click POST unsubscribes, and then nothing reaches the address by
any path (the next campaign, the API, SMTP); an erased contact stays suppressed.

The verdict windows are shortened by an operator rules file (tracking.verdicts_file),
so that the person's click can come after them without a fixed sleep: the test waits
until the machine hits are judged, which is a settle time later."""

from __future__ import annotations

import email
import email.policy
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiosmtplib
import pytest

from tests.control.conftest import ControlApi, ControlFactory
from tests.control.test_campaign_send import approved_campaign, stats_when
from tests.control.test_campaigns import act
from tests.control.test_messages import ready_tenant
from tests.control.test_templates import FOOTER
from tests.waiting import eventually

SHOP = "https://shop.example/sale?id=7&ref=mail"
HTML = (
    "<html><body><h1>Hi {{ contact.name }}</h1>"
    f'<p><a href="{SHOP.replace("&", "&amp;")}">Shop the sale</a></p>'
    '<p><a href="https://acme.example/about" data-notrack>About us</a></p>'
    + FOOTER
    + "</body></html>"
)
CHROME = (
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/537.36 (KHTML, like Gecko)"
    " Chrome/131.0.0.0 Safari/537.36"
)
VERDICTS = """
[[rules]]
name = "click-at-delivery"
kinds = ["click"]
after_delivery = 2

[[rules]]
name = "pixel-then-click"
before_click = 0.5
"""


def links_of(raw: bytes) -> tuple[str, str, str]:
    """The paths of the tracked link, the pixel and the List-Unsubscribe HTTPS URL of a
    message (the tests' control.listen has port 0: the links' base names no port)."""
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    body = msg.get_body(("html",))
    assert body is not None
    html = body.get_content()
    assert SHOP not in html and 'href="https://acme.example/about"' in html
    assert "data-notrack" not in html
    # The From domain's tracking host (its CNAME was published and found).
    click = re.findall(r'href="(https://track\.acme\.test/t/c/[^"]+)"', html)
    pixel = re.findall(r'<img src="(https://track\.acme\.test/t/o/[^"]+)"', html)
    unsubscribe = re.match(r"<([^>]+)>", str(msg["List-Unsubscribe"]))
    assert len(click) == 1 and len(pixel) == 1 and unsubscribe is not None, html
    return tuple(urlsplit(u).path for u in (click[0], pixel[0], unsubscribe.group(1)))  # type: ignore[return-value]


async def hits(api: ControlApi, key: str, cid: int, **query: Any) -> list[dict[str, Any]]:
    async with api.client(key) as c:
        r = await c.get(f"/v1/campaigns/{cid}/hits", params=query)
        assert r.status_code == 200, r.text
        data: list[dict[str, Any]] = r.json()["data"]
        return data


async def judged(api: ControlApi, key: str, cid: int, n: int) -> None:
    async def done() -> bool:
        got = await hits(api, key, cid)
        return len(got) == n and all(h["machine"] is not None for h in got)

    await eventually(done, 30, f"{n} hits judged", interval=0.1)


@pytest.mark.sqlite_only  # the scenario, not the database: the parts have their twins
async def test_people_machines_unsubscribe_and_erasure(
    control: ControlFactory, tmp_path: Path
) -> None:
    rules = tmp_path / "verdicts.toml"
    rules.write_text(VERDICTS)
    api = await control({"campaigns": {"poll": "0.2s"},
                         "tracking": {"settle": "2s", "verdicts_file": str(rules)}})  # fmt: skip
    api.lab.add_domain("inbox.test")
    key = await ready_tenant(api)
    people = [
        {"email": "ann@inbox.test", "name": "Ann"},
        {"email": "bob@inbox.test", "name": "Bob"},
    ]
    async with api.client(key, follow_redirects=False) as c:
        cid = await approved_campaign(api, c, people, HTML, tracking="per_recipient")
        assert (await act(c, cid, "schedule")).status_code == 200
        await api.lab.wait_for_messages(2, timeout=30)
        ann = next(m for m in api.lab.messages if m.rcpt_tos == ["ann@inbox.test"])
        click, pixel, unsubscribe = links_of(ann.data)

        # A scanner clicks at once, looking like a browser; Apple's proxy fetches the pixel.
        r = await c.get(click, headers={"User-Agent": CHROME})
        assert r.status_code == 302 and r.headers["location"] == SHOP
        assert (await c.get(pixel, headers={"User-Agent": "Mozilla/5.0"})).status_code == 200
        await judged(api, key, cid, 2)  # a settle time later: past the scanner's window
        # Then the person opens, and (once that is judged too) clicks.
        assert (await c.get(pixel, headers={"User-Agent": CHROME})).status_code == 200
        await judged(api, key, cid, 3)
        r = await c.get(click, headers={"User-Agent": CHROME})
        assert r.status_code == 302 and r.headers["location"] == SHOP
        await judged(api, key, cid, 4)
        # A forged token: 404, never a redirect.
        token = click.rsplit("/", 1)[1]
        forged = token[:-3] + ("abc" if not token.endswith("abc") else "xyz")
        r = await c.get(f"/t/c/{forged}")
        assert r.status_code == 404 and "location" not in r.headers

        got = await hits(api, key, cid)
        assert [(h["kind"], h["machine"], h["reason"]) for h in got] == [
            ("click", True, "click-at-delivery"),
            ("open", True, "apple-mpp-proxy"),
            ("open", False, "person"),
            ("click", False, "person"),
        ]
        stats = await stats_when(c, cid, lambda s: s["clicked"] == 1)
        assert (stats["opened"], stats["clicked"], stats["opens"], stats["clicks"]) == (1, 1, 1, 1)
        assert (stats["machine_opens"], stats["machine_clicks"]) == (1, 1)
        r = await c.get("/v1/events", params={"type": "clicked"})
        assert sorted((e["detail"]["machine"], e["detail"]["reason"]) for e in r.json()["data"]) \
            == [(False, "person"), (True, "click-at-delivery")]  # fmt: skip

        # One-click unsubscribe; then the next campaign skips Ann.
        r = await c.post(unsubscribe, data={"List-Unsubscribe": "One-Click"})
        assert r.status_code == 200
        r = await c.post(f"/v1/campaigns/{cid}/clone", json={})
        assert r.status_code == 201, r.text
        again = r.json()["id"]
        assert (await act(c, again, "validate")).json()["problems"] == []
    await approve(api, key, again)
    async with api.client(key) as c:
        assert (await act(c, again, "schedule")).status_code == 200
        done = await stats_when(c, again, lambda s: s["state"] == "sent")
        assert (done["delivered"], done["suppressed"]) == (1, 1), done
        r = await c.get(f"/v1/campaigns/{again}/records", params={"state": "suppressed"})
        assert [(x["email"], x["reason"]) for x in r.json()["data"]] == [
            ("ann@inbox.test", "unsubscribe")
        ]
        # Nor by the API, nor by SMTP: only Bob's copies arrive.
        r = await c.post("/v1/messages", json={"from": "news@acme.test", "subject": "api",
                         "text": "x", "to": ["ann@inbox.test", "bob@inbox.test"]})  # fmt: skip
        assert r.status_code == 202, r.text
        host, port = api.app.smtp_addresses[0]
        async with aiosmtplib.SMTP(hostname=host, port=port, start_tls=False) as smtp:
            await smtp.login("acme", key)
            await smtp.sendmail("news@acme.test", ["ann@inbox.test", "bob@inbox.test"],
                                b"From: news@acme.test\r\nSubject: smtp\r\n\r\nx\r\n")  # fmt: skip
        assert [x["status"] for x in r.json()["recipients"]] == ["dropped", "queued"], r.text
        # 2 + Bob's copies of the second campaign, the API and SMTP messages (one
        # transaction each for both recipients: Ann would be in Bob's).
        await api.lab.wait_for_messages(5, timeout=30)
        to_ann = [m for m in api.lab.messages if "ann@inbox.test" in m.rcpt_tos]
        assert len(to_ann) == 1  # the first campaign's, before the unsubscribe

        # Bob is erased: his address stays suppressed, as a tombstone.
        bob = (await c.get("/v1/contacts", params={"email": "bob@inbox.test"})).json()["data"][0]
        r = await c.post(f"/v1/contacts/{bob['id']}/erase")
        assert r.status_code == 200, r.text
        r = await c.post("/v1/messages", json={"from": "news@acme.test", "subject": "after",
                         "text": "x", "to": ["bob@inbox.test"]})  # fmt: skip
        assert r.json()["recipients"][0]["status"] == "dropped", r.text


async def approve(api: ControlApi, key: str, cid: int) -> None:
    from tests.control.test_campaigns import operator_made_key, tenant_id

    async with api.client(key) as c:
        tid = await tenant_id(c)
    approver = await operator_made_key(api, tid, ["approve", "read"])
    async with api.client(approver) as a:
        r = await act(a, cid, "approve")
        assert r.status_code == 200, r.text
