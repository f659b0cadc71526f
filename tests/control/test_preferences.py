"""The preference center through the real appliance (``/p/<token>``): a GET shows the
tenant's topics (escaped), the contact's frequency and the opt-out, and changes
nothing; a POST saves topic choices and the frequency, opts out through the one
unsubscribe recorder (and the address is then dropped by ``/v1/messages``), and
resubscribes with a consent recorded, lifting an unsubscribe and never a complaint; a
forged token or one of another kind is 404 and counted; the page speaks the contact's
language; the database down is 503 and changes nothing."""

from __future__ import annotations

import asyncio
import tomllib
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from sqlalchemy import func, select

from postwarden.control.preferences import CATALOG, preferences_url, wording_version
from postwarden.control.unsubscribe import list_unsubscribe_headers
from postwarden.engagement import tokens
from postwarden.engagement.tokens import Kind, Link
from postwarden.lab import Lab
from postwarden.store.campaign_models import UnsubscribeRequest
from postwarden.store.contact_models import Consent, Contact, TopicSubscription
from postwarden.store.contacts import ContactIn, upsert_contacts
from tests.control.conftest import ControlApi, ControlFactory
from tests.control.test_database_outage import api_on, own_postgres  # noqa: F401
from tests.control.test_messages import ready_tenant
from tests.control.test_unsubscribe import campaign_with_records, tenant_id
from tests.control.test_unsubscribe_v2 import events
from tests.pg import PgServer
from tests.waiting import eventually

FORM = {"Content-Type": "application/x-www-form-urlencoded"}


@dataclass
class Setup:
    api: ControlApi
    key: str
    tid: int
    campaign: int
    contact: int
    news: int  # default opt-in
    offers: int  # default opt-out; a name with markup
    path: str  # /p/<token>


async def setup(api: ControlApi, locale: str | None = None) -> Setup:
    # Mail sent to ann is delivered: a bounce would suppress her (and a resubscribe
    # would then rightly be refused) as soon as delivery runs ahead of the test.
    api.lab.add_domain("inbox.test")
    key = await ready_tenant(api)
    tid = await tenant_id(api, key)
    cid, (ann,) = await campaign_with_records(api, tid, ["ann@inbox.test"])
    if locale:
        async with api.app.control.sessions() as s:
            await upsert_contacts(s, tid, [ContactIn("ann@inbox.test", locale=locale)])
            await s.commit()
    async with api.client(key) as c:
        r = await c.post(
            "/v1/topics", json={"name": "News", "description": "Monthly", "default_opt_in": True}
        )
        assert r.status_code == 201, r.text
        news = r.json()["id"]
        r = await c.post("/v1/topics", json={"name": "<b>Offers</b> & more"})
        assert r.status_code == 201, r.text
        offers = r.json()["id"]
    plane = api.app.control
    url = preferences_url(plane, await plane.tenant_keys.signer(tid), cid, ann)
    return Setup(api, key, tid, cid, ann, news, offers, urlsplit(url).path)


async def contact_api(s: Setup) -> dict[str, Any]:
    async with s.api.client(s.key) as c:
        r = await c.get(f"/v1/contacts/{s.contact}")
        assert r.status_code == 200, r.text
        out: dict[str, Any] = r.json()
        return out


async def standing(s: Setup) -> dict[int, tuple[bool, bool]]:
    """Topic id -> (opted in, chosen by the contact)."""
    return {
        t["topic_id"]: (t["opted_in"], t["chosen_at"] is not None)
        for t in (await contact_api(s))["topics"]
    }


async def count(api: ControlApi, model: Any) -> int:
    async with api.app.control.sessions() as s:
        return int(await s.scalar(select(func.count()).select_from(model)) or 0)


async def consents(s: Setup) -> list[dict[str, Any]]:
    async with s.api.client(s.key) as c:
        r = await c.get(f"/v1/contacts/{s.contact}/consents")
        assert r.status_code == 200, r.text
        data: list[dict[str, Any]] = r.json()["data"]
        return data


async def send_to_ann(s: Setup) -> dict[str, Any]:
    async with s.api.client(s.key) as c:
        r = await c.post(
            "/v1/messages",
            json={"from": "news@acme.test", "to": ["ann@inbox.test"], "subject": "s", "text": "x"},
        )
        assert r.status_code == 202, r.text
        (rcpt,) = r.json()["recipients"]
        out: dict[str, Any] = rcpt
        return out


def checkbox(topic: int, checked: bool) -> str:
    return f"<input type='checkbox' name='topic' value='{topic}'{' checked' if checked else ''}>"


def radio(value: str, checked: bool) -> str:
    return f"<input type='radio' name='frequency' value='{value}'{' checked' if checked else ''}>"


async def test_get_shows_the_page_and_changes_nothing(control: ControlFactory) -> None:
    s = await setup(await control())
    async with s.api.client() as c:
        for _ in range(2):
            r = await c.get(s.path, headers={"User-Agent": "Scanner/1.0"})
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
            assert "set-cookie" not in r.headers and r.headers["cache-control"] == "no-store"
            assert "default-src 'none'" in r.headers["content-security-policy"]
            assert r.headers["x-robots-tag"] == "noindex, nofollow"
        assert (await c.head(s.path)).status_code == 200
    page = r.text
    assert "<html lang='en'>" in page and "<title>Email preferences</title>" in page
    assert "<b>ann@inbox.test</b>" in page
    # The topics, the contact's standing (the defaults: no choice yet), escaped.
    assert checkbox(s.news, True) + " News<small>Monthly</small>" in page
    assert checkbox(s.offers, False) + " &lt;b&gt;Offers&lt;/b&gt; &amp; more" in page
    assert "<b>Offers" not in page
    assert radio("", True) in page and radio("weekly", False) in page
    assert "value='optout'" in page and "value='resubscribe'" not in page
    assert "<script" not in page and " action=" not in page  # posts back to itself
    # Nothing changed.
    assert await standing(s) == {s.news: (True, False), s.offers: (False, False)}
    assert (await contact_api(s))["frequency"] is None
    assert await count(s.api, TopicSubscription) == 0
    assert await count(s.api, UnsubscribeRequest) == 0
    assert s.api.app.control.suppressions.check(s.tid, "ann@inbox.test") is None


async def test_save_topics_and_frequency(control: ControlFactory) -> None:
    s = await setup(await control())
    async with s.api.client() as c:
        # News unticked, Offers ticked, weekly.
        r = await c.post(
            s.path, data={"action": "save", "topic": str(s.offers), "frequency": "weekly"}
        )
        assert r.status_code == 200, r.text
        assert "Your preferences are saved." in r.text
        assert checkbox(s.news, False) in r.text and checkbox(s.offers, True) in r.text
        assert radio("weekly", True) in r.text and radio("", False) in r.text
        assert await standing(s) == {s.news: (False, True), s.offers: (True, True)}
        assert (await contact_api(s))["frequency"] == "weekly"
        # Both ticked, monthly: only the changed topic is written again.
        r = await c.post(
            s.path,
            data={"action": "save", "topic": [str(s.news), str(s.offers)], "frequency": "monthly"},
        )
        assert r.status_code == 200 and radio("monthly", True) in r.text
        assert await standing(s) == {s.news: (True, True), s.offers: (True, True)}
        # Back to every campaign.
        r = await c.post(s.path, data={"action": "save", "frequency": ""})
        assert r.status_code == 200 and radio("", True) in r.text
        assert (await contact_api(s))["frequency"] is None
        assert await standing(s) == {s.news: (False, True), s.offers: (False, True)}

        # What the page's forms never send: 400, the page again, nothing changed.
        other = await s.api.tenant("other")
        async with s.api.client(other) as o:
            foreign = (await o.post("/v1/topics", json={"name": "Theirs"})).json()["id"]
        bad: list[Any] = [
            {"action": "save", "topic": str(foreign), "frequency": ""},
            {"action": "save", "topic": "1x", "frequency": ""},
            {"action": "save", "topic": str(s.news), "frequency": "daily"},
            {"action": "save", "topic": str(s.news)},
            {"action": "delete"},
            {"action": ["save", "optout"], "frequency": ""},
            {},
            b"action=save&frequency=&topic=%FF",
            b"\x00\xff garbage",
            b"action=save&" + b"x" * 70_000,
        ]
        for body in bad:
            if isinstance(body, bytes):
                r = await c.post(s.path, content=body, headers=FORM)
            else:
                r = await c.post(s.path, data=body)
            assert r.status_code == 400, (body, r.text)
            assert "This form could not be read. Nothing was changed." in r.text
            assert checkbox(s.news, False) in r.text  # the stored state
    assert await standing(s) == {s.news: (False, True), s.offers: (False, True)}
    assert (await contact_api(s))["frequency"] is None
    assert s.api.app.control.suppressions.check(s.tid, "ann@inbox.test") is None
    registry = s.api.app.metrics.registry

    def sample(verdict: str) -> float | None:
        return registry.get_sample_value(
            "postwarden_preference_requests_total", {"method": "POST", "verdict": verdict}
        )

    assert (sample("valid"), sample("invalid")) == (3, len(bad))


async def test_frequency_through_the_contacts_api(control: ControlFactory) -> None:
    s = await setup(await control())
    async with s.api.client(s.key) as c:
        url = f"/v1/contacts/{s.contact}"
        r = await c.patch(url, json={"frequency": "monthly"})
        assert r.status_code == 200 and r.json()["frequency"] == "monthly", r.text
        r = await c.patch(url, json={"name": "Ann"})  # not given: kept
        assert r.json()["frequency"] == "monthly"
        r = await c.patch(url, json={"frequency": "daily"})
        assert r.status_code == 422 and r.json()["error"]["fields"][0]["path"] == "frequency"
        assert (await c.get(url)).json()["frequency"] == "monthly"
        r = await c.patch(url, json={"frequency": None})
        assert r.status_code == 200 and r.json()["frequency"] is None
    async with s.api.client() as c:
        assert radio("", True) in (await c.get(s.path)).text


async def test_opt_out_then_resubscribe_with_consent(control: ControlFactory) -> None:
    s = await setup(await control())
    plane = s.api.app.control
    async with s.api.client() as c:
        r = await c.post(s.path, data={"action": "optout"}, headers={"User-Agent": "Browser/1"})
        assert r.status_code == 200, r.text
        assert "You are unsubscribed" in r.text and "value='resubscribe'" in r.text
        assert "value='optout'" not in r.text
        # In force in this process before the answer; the contact follows.
        assert plane.suppressions.check(s.tid, "ann@inbox.test") == "unsubscribe"
    assert (await contact_api(s))["status"] == "unsubscribed"
    async with plane.sessions() as db:
        (req,) = (await db.execute(select(UnsubscribeRequest))).scalars()
    assert (req.method, req.email, req.campaign_id, req.contact_id, req.user_agent) == (
        "preferences", "ann@inbox.test", s.campaign, s.contact, "Browser/1",
    )  # fmt: skip
    (event,) = await events(s.api, s.key, "unsubscribed")
    assert event["detail"]["method"] == "preferences"  # type: ignore[index]
    assert event["detail"]["source"] == "preference-center"  # type: ignore[index]
    async with s.api.client(s.key) as c:
        r = await c.get("/v1/suppressions/ann@inbox.test")
        assert (r.json()["reason"], r.json()["source"]) == ("unsubscribe", "preference-center")
    # The one suppression check: an API send to the address is dropped.
    dropped = await send_to_ann(s)
    assert (dropped["status"], dropped["reason"]) == ("dropped", "unsubscribe")
    assert await consents(s) == []

    async with s.api.client() as c:
        r = await c.post(s.path, data={"action": "resubscribe"})
        assert r.status_code == 200, r.text
        assert "You are subscribed again." in r.text and "value='optout'" in r.text
    assert plane.suppressions.check(s.tid, "ann@inbox.test") is None
    assert (await contact_api(s))["status"] == "active"
    (consent,) = await consents(s)
    assert consent["source"] == "preference-center" and consent["purpose"] == "marketing"
    assert consent["ip"] == "127.0.0.1" and consent["wording_version"] == wording_version("en")
    assert consent["wording_version"].startswith("en:")
    assert (await send_to_ann(s))["status"] == "queued"
    # Resubscribing again lifts nothing and records nothing more.
    async with s.api.client() as c:
        assert (await c.post(s.path, data={"action": "resubscribe"})).status_code == 200
    assert len(await consents(s)) == 1


@pytest.mark.parametrize("reason", ["complaint", "hard_bounce"])
async def test_resubscribe_never_lifts_a_complaint_or_bounce(
    control: ControlFactory, reason: str
) -> None:
    s = await setup(await control())
    async with s.api.client(s.key) as c:
        r = await c.post("/v1/suppressions", json={"address": "ann@inbox.test", "reason": reason})
        assert r.status_code == 201, r.text
    plane = s.api.app.control
    await eventually(
        lambda: plane.suppressions.check(s.tid, "ann@inbox.test") == reason, 15, "in force"
    )
    async with s.api.client() as c:
        page = (await c.get(s.path)).text
        assert "This page cannot resume them" in page
        assert "value='resubscribe'" not in page and "value='optout'" not in page
        r = await c.post(s.path, data={"action": "resubscribe"})
        assert r.status_code == 409 and "This page cannot resume them" in r.text
        # An opt-out on top keeps what is on file.
        assert (await c.post(s.path, data={"action": "optout"})).status_code == 200
    async with s.api.client(s.key) as c:
        assert (await c.get("/v1/suppressions/ann@inbox.test")).json()["reason"] == reason
    assert plane.suppressions.check(s.tid, "ann@inbox.test") == reason
    assert await consents(s) == []


@pytest.mark.parametrize(
    ("locale", "lang", "title"),
    [
        ("de-AT", "de", "E-Mail-Einstellungen"),
        ("fr", "fr", "Préférences e-mail"),
        ("pt-BR", "en", "Email preferences"),
    ],
)
@pytest.mark.sqlite_only
async def test_the_page_speaks_the_contacts_language(
    control: ControlFactory, locale: str, lang: str, title: str
) -> None:
    s = await setup(await control(), locale=locale)
    async with s.api.client() as c:
        r = await c.get(s.path)
        assert f"<html lang='{lang}'>" in r.text and f"<h1>{title}</h1>" in r.text
        r = await c.post(s.path, data={"action": "optout"})
        r = await c.post(s.path, data={"action": "resubscribe"})
        assert r.status_code == 200 and f"<html lang='{lang}'>" in r.text
    (consent,) = await consents(s)
    assert consent["wording_version"] == wording_version(lang)


def test_every_language_has_every_word() -> None:
    with CATALOG.open("rb") as f:
        catalog = tomllib.load(f)
    assert {"en", "de", "fr"} <= set(catalog)
    for lang, words in catalog.items():
        assert set(words) == set(catalog["en"]), lang
        assert all(w.strip() for w in words.values()), lang
        assert "{email}" in words["intro"], lang
    versions = {wording_version(lang) for lang in catalog}
    assert len(versions) == len(catalog)


@pytest.mark.sqlite_only
async def test_forged_and_other_kind_tokens_are_404_and_counted(control: ControlFactory) -> None:
    s = await setup(await control())
    api, plane = s.api, s.api.app.control
    signer = await plane.tenant_keys.signer(s.tid)
    token = s.path.removeprefix("/p/")
    unsubscribe = list_unsubscribe_headers(plane, s.tid, s.campaign, s.contact, "acme.test", signer)
    bad = [
        tokens.make(signer.kid, signer.key, Link(Kind.OPEN, s.campaign, s.contact)),
        tokens.make(signer.kid, signer.key, Link(Kind.UNSUBSCRIBE, s.campaign, s.contact)),
        tokens.make(signer.kid, signer.key, Link(Kind.PREFERENCES, s.campaign, 0)),
        tokens.make(bytes(4), signer.key, Link(Kind.PREFERENCES, s.campaign, s.contact)),
        dict(unsubscribe)["List-Unsubscribe"].split("/u/")[1].split(">")[0],
        token[:-3] + ("A" if token[-3] != "A" else "B") + token[-2:],
        token + "A",
        token[:-1],
        "nothing",
    ]
    registry = api.app.metrics.registry

    def sample(method: str, verdict: str) -> float:
        labels = {"method": method, "verdict": verdict}
        return registry.get_sample_value("postwarden_preference_requests_total", labels) or 0.0

    async with api.client() as c:
        for t in bad:
            r = await c.get(f"/p/{t}")
            assert r.status_code == 404 and "This link is not valid." in r.text, t
            assert r.headers["cache-control"] == "no-store"
            r = await c.post(f"/p/{t}", data={"action": "optout"})
            assert r.status_code == 404, t
        assert (await c.put(s.path)).status_code == 405
    assert (sample("GET", "forged"), sample("POST", "forged")) == (len(bad), len(bad))
    assert sample("GET", "valid") == sample("POST", "valid") == 0

    # Another tenant's key naming this tenant's contact: that tenant has no such
    # contact. A deleted contact: gone.
    other = await tenant_id(api, await api.tenant("other"))
    theirs = await plane.tenant_keys.signer(other)
    cross = urlsplit(preferences_url(plane, theirs, 0, s.contact)).path
    async with api.client() as c:
        for path in (cross, s.path):
            if path == s.path:
                async with api.client(s.key) as k:
                    assert (await k.delete(f"/v1/contacts/{s.contact}")).status_code in (200, 204)
            assert (await c.get(path)).status_code == 404
            assert (await c.post(path, data={"action": "optout"})).status_code == 404
    assert sample("GET", "gone") == sample("POST", "gone") == 2
    assert await count(api, UnsubscribeRequest) == 0
    assert plane.suppressions.check(s.tid, "ann@inbox.test") is None


async def test_database_down_answers_503_and_changes_nothing(
    request: pytest.FixtureRequest, appliance: Any, lab: Lab
) -> None:
    server: PgServer = request.getfixturevalue("own_postgres")  # stopped, restarted
    api = await api_on(server, appliance, lab)
    app = api.app
    s = await setup(api)
    await asyncio.to_thread(server.stop)
    async with api.client() as c:
        for method in ("GET", "POST"):
            r = await c.request(method, s.path, data={"action": "optout"})
            assert r.status_code == 503 and r.headers["retry-after"] == "5", r.text
            assert "Traceback" not in r.text and "asyncpg" not in r.text
        assert app.control.suppressions.check(s.tid, "ann@inbox.test") is None
        await asyncio.to_thread(server.restart)

        async def answered() -> httpx.Response | None:
            r = await c.post(s.path, data={"action": "optout"})
            return r if r.status_code == 200 else None

        await eventually(answered, 30, "the POST answered once the database is back")
    assert app.control.suppressions.check(s.tid, "ann@inbox.test") == "unsubscribe"
    assert await count(api, UnsubscribeRequest) == 1
    async with app.control.sessions() as db:
        assert await db.scalar(select(func.count()).select_from(Consent)) == 0
        assert await db.scalar(select(Contact.status)) == "unsubscribed"
