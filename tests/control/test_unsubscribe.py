"""List-Unsubscribe through the real appliance: the fields a campaign message gets,
the public link (a GET asks and changes nothing; a one-click POST records, suppresses
the address through the one suppression store and answers 200 without a redirect or
a cookie; a forged link is 404 and counted), and the campaign validation's check
that the fields would be inside the From domain's DKIM signature."""

from __future__ import annotations

import asyncio
import dataclasses
import email
import email.policy
import re
from typing import Any
from urllib.parse import urlsplit

import pytest
from sqlalchemy import delete, func, select

from postwarden.campaigns.unsubscribe import (
    ONE_CLICK,
    derive_key,
    make_token,
)
from postwarden.config import load_config
from postwarden.control.unsubscribe import (
    covered_fields,
    list_unsubscribe_headers,
    list_unsubscribe_problem,
    public_base_url,
)
from postwarden.lab import Lab
from postwarden.mail.build import Draft, Mailbox, build
from postwarden.mta.dkim import DkimSigner, generate_key, parse_key
from postwarden.store.campaign_models import Campaign, SendRecord, UnsubscribeRequest
from postwarden.store.contact_models import Contact
from postwarden.store.contacts import ContactIn, upsert_contacts
from postwarden.store.models import DkimKey, Domain, Suppression
from tests.control.conftest import ControlApi, ControlFactory
from tests.control.test_campaign_send import FAST, approved_campaign, stats_when
from tests.control.test_campaigns import act
from tests.control.test_database_outage import api_on, own_postgres  # noqa: F401
from tests.control.test_domains import verify_signatures
from tests.control.test_messages import ready_tenant, until
from tests.pg import PgServer
from tests.waiting import eventually


async def tenant_id(api: ControlApi, key: str) -> int:
    async with api.client(key) as c:
        return int((await c.get("/v1/keys")).json()["data"][0]["tenant_id"])


async def campaign_with_records(
    api: ControlApi, tid: int, records: list[str]
) -> tuple[int, list[int]]:
    """A sending campaign of the tenant with a send record for each address (a
    contact each), and its contacts' ids in that order."""
    async with api.app.control.sessions() as s:
        made = await upsert_contacts(s, tid, [ContactIn(a) for a in records])
        # Audience and template are not read here (ids without foreign keys).
        camp = Campaign(tenant_id=tid, name="c", audience_id=0, template_id=0,
                        from_email="news@acme.test", state="sending")  # fmt: skip
        s.add(camp)
        await s.flush()
        s.add_all(
            SendRecord(tenant_id=tid, campaign_id=camp.id, contact_id=m.id, email=m.email)
            for m in made
        )
        await s.commit()
        return camp.id, [m.id for m in made]


async def requests_of(api: ControlApi, tid: int) -> list[UnsubscribeRequest]:
    async with api.app.control.sessions() as s:
        rows = await s.execute(
            select(UnsubscribeRequest)
            .where(UnsubscribeRequest.tenant_id == tid)
            .order_by(UnsubscribeRequest.id)
        )
        return list(rows.scalars())


def link_path(fields: list[tuple[str, str]]) -> str:
    value = dict(fields)["List-Unsubscribe"]
    url = re.match(r"<([^>]+)>", value)
    assert url is not None
    return urlsplit(url.group(1)).path


async def test_get_asks_post_unsubscribes_once_and_sending_stops(control: ControlFactory) -> None:
    api = await control()
    api.lab.add_domain("inbox.test")
    key = await ready_tenant(api)
    tid = await tenant_id(api, key)
    cid, (ann, bob) = await campaign_with_records(api, tid, ["ann@inbox.test", "bob@inbox.test"])
    async with api.app.control.sessions() as s:  # a contact with no send record
        (cat,) = await upsert_contacts(s, tid, [ContactIn("cat@inbox.test")])
        await s.commit()
    plane = api.app.control
    fields = list_unsubscribe_headers(plane, tid, cid, ann, "acme.test")
    assert [n for n, _ in fields] == ["List-Unsubscribe", "List-Unsubscribe-Post"]
    assert fields[1][1] == ONE_CLICK
    value = fields[0][1]
    base = public_base_url(plane.cfg)
    token = link_path(fields).removeprefix("/u/")
    # The HTTPS link first, then a mailto to the domain's return path (our inbound MX).
    assert value == f"<{base}/u/{token}>, <mailto:unsubscribe+{token}@pwb.acme.test>"
    check = plane.suppressions.check
    async with api.client() as c:
        # A GET (a person, or a scanner following the link): a page that asks.
        r = await c.get(f"/u/{token}", headers={"User-Agent": "Scanner/1.0 " + "x" * 600})
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        assert "<form method='post'>" in r.text and "List-Unsubscribe" in r.text
        assert "set-cookie" not in r.headers and r.headers["cache-control"] == "no-store"
        assert check(tid, "ann@inbox.test") is None
        [seen] = await requests_of(api, tid)
        assert (seen.method, seen.email, seen.campaign_id, seen.contact_id, seen.ip) == (
            "GET", "ann@inbox.test", cid, ann, "127.0.0.1",
        )  # fmt: skip
        assert seen.user_agent.startswith("Scanner/1.0") and len(seen.user_agent) == 500
        r = await c.head(f"/u/{token}")
        assert r.status_code == 200 and check(tid, "ann@inbox.test") is None
        # RFC 8058's one-click POST.
        r = await c.post(
            f"/u/{token}",
            content=ONE_CLICK,
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
        assert r.status_code == 200, r.text
        assert "location" not in r.headers and "set-cookie" not in r.headers
        # In force in this process before the answer.
        assert check(tid, "ann@inbox.test") == "unsubscribe"
        # Again, and with any body: still 200, one suppression.
        r = await c.post(f"/u/{token}", content=b"\x00garbage")
        assert r.status_code == 200
        # Bob's link has a send record; Cat's falls back to the contact; a contact
        # that does not exist is recorded and answered all the same.
        for contact, campaign in ((bob, cid), (cat.id, cid + 1000), (10**12, cid)):
            path = link_path(list_unsubscribe_headers(plane, tid, campaign, contact, "acme.test"))
            r = await c.post(path, data={"List-Unsubscribe": "One-Click"})
            assert r.status_code == 200
    async with api.client(key) as c:
        r = await c.get("/v1/suppressions/ann@inbox.test")
        assert r.status_code == 200
        assert (r.json()["reason"], r.json()["source"]) == ("unsubscribe", "list-unsubscribe")
        r = await c.get("/v1/suppressions", params={"reason": "unsubscribe"})
        assert sorted(x["address"] for x in r.json()["data"]) == [
            "ann@inbox.test", "bob@inbox.test", "cat@inbox.test",
        ]  # fmt: skip
        # The one suppression check: an API message to Ann is dropped.
        r = await c.post(
            "/v1/messages",
            json={
                "from": {"email": "news@acme.test"},
                "to": ["ann@inbox.test", "dan@inbox.test"],
                "subject": "again",
                "text": "hello",
            },
        )
        assert r.status_code == 202, r.text
        status = {x["email"]: x for x in r.json()["recipients"]}
        assert (status["ann@inbox.test"]["status"], status["ann@inbox.test"]["reason"]) == (
            "dropped",
            "unsubscribe",
        )
        assert status["dan@inbox.test"]["status"] == "queued"
        await until(c, r.json()["id"], lambda m: len(m["recipients"]) == 2)
    rows = await requests_of(api, tid)
    assert [(x.method, x.email) for x in rows] == [
        ("GET", "ann@inbox.test"),
        ("HEAD", "ann@inbox.test"),
        ("POST", "ann@inbox.test"),
        ("POST", "ann@inbox.test"),
        ("POST", "bob@inbox.test"),
        ("POST", "cat@inbox.test"),
        ("POST", ""),
    ]
    assert rows[-1].contact_id == 10**12
    async with plane.sessions() as s:
        n = await s.execute(
            select(func.count()).select_from(Suppression).where(Suppression.tenant_id == tid)
        )
        assert n.scalar() == 3
        # The contact's status follows its suppression.
        status_of = dict((await s.execute(select(Contact.email, Contact.status))).all())
        assert status_of["ann@inbox.test"] == "unsubscribed"


async def test_a_suppression_in_force_is_kept(control: ControlFactory) -> None:
    """A complaint already on file stays a complaint: the unsubscribe adds nothing."""
    api = await control()
    key = await ready_tenant(api)
    tid = await tenant_id(api, key)
    cid, (ann,) = await campaign_with_records(api, tid, ["ann@inbox.test"])
    async with api.client(key) as c:
        r = await c.post(
            "/v1/suppressions", json={"address": "ann@inbox.test", "reason": "complaint"}
        )
        assert r.status_code == 201
    path = link_path(list_unsubscribe_headers(api.app.control, tid, cid, ann, "acme.test"))
    async with api.client() as c:
        assert (await c.post(path, content=ONE_CLICK)).status_code == 200
    async with api.client(key) as c:
        r = await c.get("/v1/suppressions/ann@inbox.test")
        assert r.json()["reason"] == "complaint"
    assert [x.method for x in await requests_of(api, tid)] == ["POST"]


@pytest.mark.sqlite_only
async def test_forged_links_are_404_and_counted(control: ControlFactory) -> None:
    api = await control()
    key = await ready_tenant(api)
    tid = await tenant_id(api, key)
    cid, (ann,) = await campaign_with_records(api, tid, ["ann@inbox.test"])
    token = link_path(list_unsubscribe_headers(api.app.control, tid, cid, ann, "acme.test"))[3:]
    registry = api.app.metrics.registry

    def forged(method: str) -> float:
        labels = {"method": method, "verdict": "forged"}
        return registry.get_sample_value("postwarden_unsubscribe_requests_total", labels) or 0.0

    flipped = token[:-3] + ("A" if token[-3] != "A" else "B") + token[-2:]
    other_key = make_token(derive_key(b"another appliance's key material"), tid, cid, ann)
    bad = [flipped, other_key, token + "A", token[:-1], "nothing", "A" * 40]
    before = forged("POST"), forged("GET")
    async with api.client() as c:
        for t in bad:
            r = await c.post(f"/u/{t}", content=ONE_CLICK)
            assert r.status_code == 404 and "set-cookie" not in r.headers, t
            r = await c.get(f"/u/{t}")
            assert r.status_code == 404, t
        # Not a route of the API: no key asked, and other methods are refused.
        assert (await c.put(f"/u/{token}")).status_code == 405
    assert forged("POST") == before[0] + len(bad)
    assert forged("GET") == before[1] + len(bad)
    assert await requests_of(api, tid) == []
    assert api.app.control.suppressions.check(tid, "ann@inbox.test") is None
    valid = registry.get_sample_value(
        "postwarden_unsubscribe_requests_total", {"method": "POST", "verdict": "valid"}
    )
    assert valid == 0.0


class Overridden:
    """The control plane as it is, with another configuration (the check reads
    ``control.public_url`` from it)."""

    def __init__(self, plane: Any, **control: Any) -> None:
        self._plane = plane
        self.cfg = dataclasses.replace(
            plane.cfg, control=dataclasses.replace(plane.cfg.control, **control)
        )

    def __getattr__(self, name: str) -> Any:
        return getattr(self._plane, name)


async def test_the_validation_check(control: ControlFactory) -> None:
    api = await control()
    key = await ready_tenant(api)
    tid = await tenant_id(api, key)
    plane = api.app.control
    # Verified, with DKIM keys: the fields are signed (and the lab's default
    # public_url is http on loopback, which labs may use).
    assert await list_unsubscribe_problem(plane, tid, "news@acme.test") is None
    assert await list_unsubscribe_problem(plane, tid, "News@ACME.test.") is None
    https = Overridden(plane, public_url="https://mail.example.com/pw/")
    assert await list_unsubscribe_problem(https, tid, "news@acme.test") is None
    assert list_unsubscribe_headers(https, tid, 1, 2, "acme.test")[0][1].startswith(
        "<https://mail.example.com/pw/u/"
    )
    # A From domain the appliance does not know: the mailto on it, in ASCII.
    value = list_unsubscribe_headers(plane, tid, 1, 2, "Bücher.test")[0][1]
    assert value.endswith("@xn--bcher-kva.test>") and value.isascii()
    for url in ("http://mail.example.com", "http://10.0.0.1:8025"):
        problem = await list_unsubscribe_problem(
            Overridden(plane, public_url=url), tid, "n@acme.test"
        )
        assert problem is not None and (problem["code"], problem["path"]) == (
            "list_unsubscribe",
            "public_url",
        )
    for url in ("http://localhost:8025", "http://[::1]:8025", "http://127.9.9.9"):
        assert (
            await list_unsubscribe_problem(Overridden(plane, public_url=url), tid, "n@acme.test")
            is None
        )
    # Another tenant's domain, and a domain registered but not verified: not signed.
    other = await ready_tenant(api, "other", "other.test")
    assert await list_unsubscribe_problem(plane, await tenant_id(api, other), "n@acme.test") == {
        "code": "list_unsubscribe",
        "path": "from.email",
        "message": "acme.test is not a verified sending domain of the tenant",
    }
    async with api.client(key) as c:
        r = await c.post("/v1/domains", json={"name": "pending.test"})
        assert r.status_code == 201
    problem = await list_unsubscribe_problem(plane, tid, "n@pending.test")
    assert problem is not None and problem["path"] == "from.email"
    # Verified, but its keys gone: nothing would sign the fields.
    async with plane.sessions() as s:
        dom = (await s.execute(select(Domain.id).where(Domain.name == "acme.test"))).scalar_one()
        await s.execute(delete(DkimKey).where(DkimKey.domain_id == dom))
        await s.commit()
    await plane.signing.reload()
    problem = await list_unsubscribe_problem(plane, tid, "news@acme.test")
    assert problem is not None and problem["path"] == "from.email"
    assert "no DKIM signing keys" in problem["message"]


def test_covered_fields_verifies_what_it_reports() -> None:
    """What the check relies on: each signature's h= names the fields, and it
    verifies over them as they are; a field changed after signing is not covered
    (List-Unsubscribe is oversigned, so its name alone proves nothing)."""
    rsa = parse_key("acme.test", "a", generate_key("rsa-sha256"), "rsa-sha256")
    ed = parse_key("acme.test", "b", generate_key("ed25519-sha256"), "ed25519-sha256")
    signer = DkimSigner([rsa, ed])
    fields = [("List-Unsubscribe", "<https://x.test/u/t>"), ("List-Unsubscribe-Post", ONE_CLICK)]
    draft = Draft(Mailbox("a@acme.test"), [Mailbox("b@inbox.test")], text="hi", headers=fields)
    message = build(draft, message_id="<m@acme.test>", date=0)
    signed = signer.sign(message, "acme.test") + message
    covered = covered_fields(signed, [rsa, ed])
    assert len(covered) == 2
    for names in covered:
        assert {"from", "list-unsubscribe", "list-unsubscribe-post"} <= names
    altered = signed.replace(b"https://x.test/u/t", b"https://evil.test/u/t")
    assert covered_fields(altered, [rsa, ed]) == [set(), set()]
    # Checked against other keys' records: nothing verifies.
    stranger = parse_key("acme.test", "a", generate_key("ed25519-sha256"), "ed25519-sha256")
    assert covered_fields(signed, [stranger]) == [set(), set()]
    assert covered_fields(message, [rsa, ed]) == []
    assert signer.sign(message, "other.test") == b""


@pytest.mark.parametrize(
    ("control_cfg", "base"),
    [
        ({}, "http://127.0.0.1:8025"),
        ({"listen": "0.0.0.0:80"}, "http://127.0.0.1:80"),
        ({"listen": "[::]:8025"}, "http://[::1]:8025"),
        ({"listen": "[2001:db8::1]:8025"}, "http://[2001:db8::1]:8025"),
        ({"public_url": "https://mail.example.com/pw/"}, "https://mail.example.com/pw"),
    ],
)
def test_public_base_url(control_cfg: dict[str, str], base: str) -> None:
    cfg = load_config(None, environ={}, overrides={"control": control_cfg})
    assert public_base_url(cfg) == base


async def test_a_campaign_message_carries_signed_working_links(control: ControlFactory) -> None:
    """Through the campaign runner into the lab: the message has both fields, every
    DKIM signature verifies over them, and the one-click POST of its link suppresses
    the recipient."""
    api = await control(FAST)
    api.lab.add_domain("inbox.test")
    key = await ready_tenant(api)
    people = [{"email": "ann@inbox.test", "name": "Ann"}]
    async with api.client(key) as c:
        cid = await approved_campaign(api, c, people)
        assert (await act(c, cid, "schedule")).status_code == 200
        await stats_when(c, cid, lambda s: s["state"] == "sent")
    [got] = [m for m in api.lab.messages if m.rcpt_tos[0] == "ann@inbox.test"]
    raw = got.data
    parsed = email.message_from_bytes(raw, policy=email.policy.SMTP)
    value = re.sub(r"\r?\n", "", str(parsed["List-Unsubscribe"]))
    assert parsed["List-Unsubscribe-Post"] == ONE_CLICK
    m = re.fullmatch(
        r"<(http://[^>]+/u/([A-Za-z0-9_-]+))>, <mailto:unsubscribe\+\2@pwb\.acme\.test>", value
    )
    assert m is not None, value
    sels = await verify_signatures(api, raw)
    assert len(sels) == len(re.findall(rb"(?m)^DKIM-Signature:", raw)) >= 1
    for h in re.findall(rb"(?m)^DKIM-Signature:.*?\bh=([^;]+)", raw, re.S):
        names = {n.strip().lower() for n in h.replace(b"\r\n", b"").split(b":")}
        assert {b"list-unsubscribe", b"list-unsubscribe-post"} <= names
    async with api.client() as c:
        r = await c.post(urlsplit(m.group(1)).path, content=ONE_CLICK)
        assert r.status_code == 200
    tid = await tenant_id(api, key)
    assert api.app.control.suppressions.check(tid, "ann@inbox.test") == "unsubscribe"
    [row] = await requests_of(api, tid)
    assert (row.campaign_id, row.email, row.method) == (cid, "ann@inbox.test", "POST")


async def test_database_down_answers_503_and_changes_nothing(
    request: pytest.FixtureRequest, appliance: Any, lab: Lab
) -> None:
    server: PgServer = request.getfixturevalue("own_postgres")  # stopped, restarted
    api = await api_on(server, appliance, lab)
    app = api.app
    key = await ready_tenant(api)
    tid = await tenant_id(api, key)
    cid, (ann,) = await campaign_with_records(api, tid, ["ann@inbox.test"])
    path = link_path(list_unsubscribe_headers(app.control, tid, cid, ann, "acme.test"))
    await asyncio.to_thread(server.stop)
    async with api.client() as c:
        for method in ("GET", "POST"):
            r = await c.request(method, path, content=ONE_CLICK)
            assert r.status_code == 503 and r.headers["retry-after"] == "5", r.text
            assert "Traceback" not in r.text and "asyncpg" not in r.text
        assert app.control.suppressions.check(tid, "ann@inbox.test") is None
        await asyncio.to_thread(server.restart)

        async def unsubscribed() -> bool:
            return (await c.post(path, content=ONE_CLICK)).status_code == 200

        await eventually(unsubscribed, 30, "the POST answered once the database is back")
    assert app.control.suppressions.check(tid, "ann@inbox.test") == "unsubscribe"
    assert [x.method for x in await requests_of(api, tid)] == ["POST"]
