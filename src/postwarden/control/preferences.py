"""The preference center (issue 22; docs/api.md, "Preference center"): one page per
contact, reached by a signed link in every campaign message (``{public_url}/p/<token>``, a
version 2 token of kind ``preferences`` under the tenant's links key), served without
an API key and without JavaScript.

* ``GET /p/<token>`` (and HEAD) shows the tenant's topics with the contact's standing
  on each, the contact's frequency, and either the global opt-out or, for an address
  unsubscribed, the resubscribe form. A GET changes nothing.
* ``POST /p/<token>`` (a plain HTML form, ``application/x-www-form-urlencoded``) does
  one ``action``: ``save`` (the ticked ``topic`` ids are opted in, the others out; the
  ``frequency``: empty, ``weekly`` or ``monthly``), ``optout`` (an unsubscribe through
  ``store.unsubscribes``, method ``preferences``, source ``preference-center``) or
  ``resubscribe`` (an ``unsubscribe`` suppression is lifted and a consent recorded;
  a bounce, complaint or manual suppression stays: 409). A form that does not read is
  400 and changes nothing.
* A token that does not read, of another kind (tracking, unsubscribe) or naming a
  contact that is gone: 404, counted in ``postwarden_preference_requests_total``.
  The database down: 503 with Retry-After, nothing changed.

The words come from ``preferences.toml`` in the contact's language (``de-AT`` → de),
English otherwise. Everything put in the page is escaped: topic names are tenant input.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import html
import logging
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from sqlalchemy import select, update
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route

from postwarden.control.tenant_keys import LinkKey
from postwarden.control.unsubscribe import _HEADERS, public_base_url
from postwarden.engagement.tokens import Kind, Link
from postwarden.mail.addresses import suppression_key
from postwarden.store import memberships, unsubscribes
from postwarden.store.availability import LogLimiter
from postwarden.store.contact_models import FREQUENCIES, Consent, Contact, Topic
from postwarden.store.models import Suppression
from postwarden.store.suppress import remove_suppression
from postwarden.store.unsubscribes import Unsubscribe

log = logging.getLogger("postwarden.control.preferences")
_limited = LogLimiter(log)

#: The path of the links: ``{public_url}/p/{token}``.
PATH_PREFIX = "/p/"
#: The suppression's source, the consent's source.
SOURCE = "preference-center"
#: The consent's purpose.
PURPOSE = "marketing"
#: Largest form body read (a few thousand topic ids).
MAX_FORM = 64 * 1024
USER_AGENT_MAX = 500
CATALOG = Path(__file__).with_name("preferences.toml")
DEFAULT_LANGUAGE = "en"
ACTIONS = ("save", "optout", "resubscribe")


def preferences_url(ctx: Any, signer: LinkKey, campaign_id: int, contact_id: int) -> str:
    """A contact's preference center link (``{{ preferences_url }}``) in a message of
    ``campaign_id`` (0: none), signed by the tenant's links key ``signer``."""
    token = ctx.tenant_keys.make(signer, Link(Kind.PREFERENCES, campaign_id, contact_id))
    return f"{public_base_url(ctx.cfg)}{PATH_PREFIX}{token}"


# ------------------------------------------------------------------ words


@functools.cache
def catalog() -> dict[str, dict[str, str]]:
    """Every language's words (read once)."""
    with CATALOG.open("rb") as f:
        data: dict[str, dict[str, str]] = tomllib.load(f)
    return data


def language(locale: str | None) -> str:
    """The catalog's language for a BCP 47 tag: its primary subtag when the catalog
    has it, else English."""
    primary = (locale or "").split("-", 1)[0].strip().lower()
    return primary if primary in catalog() else DEFAULT_LANGUAGE


def words(lang: str) -> dict[str, str]:
    return {**catalog()[DEFAULT_LANGUAGE], **catalog().get(lang, {})}


def wording_version(lang: str) -> str:
    """What a resubscribe's consent records as its wording: the language and a hash of
    the words the contact agreed to."""
    w = words(lang)
    text = f"{w['resubscribe_text']}\n{w['resubscribe_button']}".encode()
    return f"{lang}:{hashlib.sha256(text).hexdigest()[:16]}"


# ------------------------------------------------------------------ the page

_STYLE = (
    "body{font-family:sans-serif;max-width:36em;margin:3em auto;padding:0 1em;line-height:1.4}"
    "fieldset{border:1px solid #ccc;margin:0 0 1em;padding:.5em 1em}"
    "label{display:block;margin:.3em 0}.note{background:#eef6ee;padding:.5em 1em}"
    ".warn{background:#fdf0e6;padding:.5em 1em}small{color:#555;display:block}"
)


def _esc(text: object) -> str:
    return html.escape(str(text), quote=True)


# The List-Unsubscribe page's headers (_HEADERS): no store, no referrer, noindex, a
# Content-Security-Policy with no script.
def _html(lang: str, title: str, body: str, status: int = 200, **headers: str) -> HTMLResponse:
    return HTMLResponse(
        f"<!doctype html><html lang='{_esc(lang)}'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width'>"
        f"<meta name='robots' content='noindex'><title>{_esc(title)}</title>"
        f"<style>{_STYLE}</style></head><body>{body}</body></html>",
        status_code=status,
        headers={**_HEADERS, **headers},
    )


def _message_page(
    lang: str, title_key: str, text_key: str, status: int, **headers: str
) -> HTMLResponse:
    w = words(lang)
    body = f"<h1>{_esc(w[title_key])}</h1><p>{_esc(w[text_key])}</p>"
    return _html(lang, w[title_key], body, status, **headers)


def _not_found() -> HTMLResponse:
    return _message_page(DEFAULT_LANGUAGE, "not_found_title", "not_found", 404)


def _unavailable(lang: str) -> HTMLResponse:
    return _message_page(lang, "retry_title", "retry", 503, **{"Retry-After": "5"})


@dataclass(frozen=True)
class TopicState:
    id: int
    name: str
    description: str
    opted_in: bool


@dataclass(frozen=True)
class State:
    """What the page shows of one contact."""

    tenant_id: int
    contact_id: int
    email: str
    lang: str
    frequency: str | None
    topics: list[TopicState]
    suppressed: str | None  # the reason of the suppression in force, if any


async def _suppression(s: Any, tenant_id: int, email: str) -> Suppression | None:
    row: Suppression | None = (
        await s.execute(
            select(Suppression).where(
                Suppression.tenant_id == tenant_id,
                Suppression.address == suppression_key(email),
            )
        )
    ).scalar_one_or_none()
    if row is None:
        return None
    expires = row.expires_at
    if expires is not None:
        if expires.tzinfo is None:  # SQLite gives naive UTC back
            expires = expires.replace(tzinfo=dt.UTC)
        if expires <= dt.datetime.now(dt.UTC):
            return None
    return row


async def _state(s: Any, tenant_id: int, contact_id: int) -> State | None:
    contact = (
        await s.execute(
            select(Contact).where(Contact.tenant_id == tenant_id, Contact.id == contact_id)
        )
    ).scalar_one_or_none()
    if contact is None:
        return None
    topics = {
        t.id: t
        for t in (await s.execute(select(Topic).where(Topic.tenant_id == tenant_id))).scalars()
    }
    choices = await memberships.choices_of(s, tenant_id, contact_id)
    states = [
        TopicState(c.topic_id, topics[c.topic_id].name, topics[c.topic_id].description, c.opted_in)
        for c in choices
        if c.topic_id in topics
    ]
    found = await _suppression(s, tenant_id, contact.email)
    return State(
        tenant_id,
        contact_id,
        contact.email,
        language(contact.locale),
        contact.frequency,
        states,
        None if found is None else found.reason,
    )


def render(state: State, notice: str = "", warn: str = "", status: int = 200) -> HTMLResponse:
    """The page of ``state``; ``notice`` and ``warn`` are catalog keys shown on top."""
    w = words(state.lang)
    out = [f"<h1>{_esc(w['title'])}</h1>"]
    if notice:
        out.append(f"<p class='note' role='status'>{_esc(w[notice])}</p>")
    if warn:
        out.append(f"<p class='warn' role='alert'>{_esc(w[warn])}</p>")
    out.append(f"<p>{_esc(w['intro']).replace('{email}', f'<b>{_esc(state.email)}</b>')}</p>")
    # The form posts back to the URL it came from (no action attribute), whatever
    # prefix a proxy in front of the control plane adds.
    out.append("<form method='post'>")
    out.append(f"<fieldset><legend>{_esc(w['topics'])}</legend>")
    if not state.topics:
        out.append(f"<p>{_esc(w['no_topics'])}</p>")
    for t in state.topics:
        checked = " checked" if t.opted_in else ""
        about = f"<small>{_esc(t.description)}</small>" if t.description else ""
        out.append(
            f"<label><input type='checkbox' name='topic' value='{t.id}'{checked}>"
            f" {_esc(t.name)}{about}</label>"
        )
    out.append(f"</fieldset><fieldset><legend>{_esc(w['frequency'])}</legend>")
    for value, key in (("", "every"), *((f, f) for f in FREQUENCIES)):
        checked = " checked" if (state.frequency or "") == value else ""
        out.append(
            f"<label><input type='radio' name='frequency' value='{value}'{checked}>"
            f" {_esc(w[key])}</label>"
        )
    out.append(
        "</fieldset><button type='submit' name='action' value='save'>"
        f"{_esc(w['save'])}</button></form>"
    )
    if state.suppressed is None:
        out.append(
            f"<h2>{_esc(w['optout_heading'])}</h2><p>{_esc(w['optout_text'])}</p>"
            "<form method='post'><button type='submit' name='action' value='optout'>"
            f"{_esc(w['optout_button'])}</button></form>"
        )
    elif state.suppressed == "unsubscribe":
        out.append(
            f"<h2>{_esc(w['resubscribe_button'])}</h2><p>{_esc(w['unsubscribed'])}</p>"
            f"<p>{_esc(w['resubscribe_text'])}</p>"
            "<form method='post'><button type='submit' name='action' value='resubscribe'>"
            f"{_esc(w['resubscribe_button'])}</button></form>"
        )
    else:
        out.append(f"<p class='warn' id='blocked'>{_esc(w['blocked'])}</p>")
    return _html(state.lang, w["title"], "".join(out), status)


# ------------------------------------------------------------------ the actions


class BadForm(ValueError):
    """A form this page did not write."""


@dataclass(frozen=True)
class Form:
    action: str
    topics: frozenset[int]
    frequency: str | None


async def read_form(request: Request) -> Form:
    """The posted form; BadForm for anything the page's forms would not send."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM:
            raise BadForm("form too large")
    try:
        fields = parse_qs(body.decode("utf-8"), keep_blank_values=True, strict_parsing=bool(body))
    except (UnicodeDecodeError, ValueError) as exc:
        raise BadForm(str(exc)) from None
    actions = fields.get("action", [])
    if len(actions) != 1 or actions[0] not in ACTIONS:
        raise BadForm("action: one of save, optout, resubscribe")
    action = actions[0]
    topics: set[int] = set()
    for value in fields.get("topic", []):
        if not value.isascii() or not value.isdigit() or len(value) > 19:
            raise BadForm(f"topic: {value!r} is not a topic id")
        topics.add(int(value))
    frequencies = fields.get("frequency", [])
    if action == "save" and (len(frequencies) != 1 or frequencies[0] not in ("", *FREQUENCIES)):
        raise BadForm("frequency: empty, weekly or monthly")
    frequency = (frequencies[0] or None) if frequencies else None
    return Form(action, frozenset(topics), frequency)


@dataclass(frozen=True)
class Done:
    notice: str = ""
    warn: str = ""
    status: int = 200
    refresh: str = ""  # an address whose suppression changed


async def _save(s: Any, state: State, form: Form) -> Done:
    known = {t.id for t in state.topics}
    if not form.topics <= known:
        raise BadForm("topic: not a topic of this sender")
    for t in state.topics:
        wanted = t.id in form.topics
        if wanted != t.opted_in:
            await memberships.choose(s, state.tenant_id, t.id, state.contact_id, wanted)
    await s.execute(
        update(Contact)
        .where(Contact.tenant_id == state.tenant_id, Contact.id == state.contact_id)
        .values(frequency=form.frequency)
    )
    return Done(notice="saved")


async def _optout(s: Any, state: State, campaign_id: int, ip: str | None, ua: str) -> Done:
    u = Unsubscribe(state.tenant_id, campaign_id or None, state.contact_id, "preferences",
                    SOURCE, ip, ua)  # fmt: skip
    done = await unsubscribes.record(s, u)
    if done is None or not done.email:
        return Done(notice="optedout")
    return Done(notice="optedout", refresh=done.email if done.unsubscribed else "")


async def _resubscribe(s: Any, state: State, ip: str | None) -> Done:
    row = await _suppression(s, state.tenant_id, state.email)
    if row is None:
        return Done(notice="resubscribed")  # nothing to lift (already subscribed)
    if row.reason != "unsubscribe":
        # A bounce, complaint or manual stop is not the contact's to lift.
        return Done(warn="blocked", status=409)
    await remove_suppression(s, state.tenant_id, state.email)
    s.add(
        Consent(
            tenant_id=state.tenant_id,
            contact_id=state.contact_id,
            source=SOURCE,
            purpose=PURPOSE,
            wording_version=wording_version(state.lang),
            ip=ip[:45] if ip else None,
        )
    )
    return Done(notice="resubscribed", refresh=state.email)


async def act(
    ctx: Any, tenant_id: int, link: Link, form: Form, ip: str | None, user_agent: str
) -> Done | None:
    """Do one posted action in one transaction (None: the contact is gone; BadForm:
    nothing changed). A suppression added or lifted is in force in this process before
    the answer."""
    async with ctx.sessions() as s:
        state = await _state(s, tenant_id, link.contact_id)
        if state is None:
            return None
        if form.action == "save":
            done = await _save(s, state, form)
        elif form.action == "optout":
            done = await _optout(s, state, link.campaign_id, ip, user_agent[:USER_AGENT_MAX])
        else:
            done = await _resubscribe(s, state, ip)
        await s.commit()
    if done.refresh:
        await ctx.suppressions.refresh([(tenant_id, suppression_key(done.refresh))])
        ctx.wake()
    log.info(
        "event=preferences action=%s tenant=%s campaign=%s contact=%s status=%s",
        form.action,
        tenant_id,
        link.campaign_id,
        link.contact_id,
        done.status,
    )
    return done


# ------------------------------------------------------------------ the routes


def read_link(ctx: Any, token: str) -> tuple[int, Link] | None:
    """The tenant and link of a preferences token naming a contact; None for anything
    else (forged, another kind, anonymous)."""
    found: tuple[int, Link] | None = ctx.tenant_keys.read(token)
    if found is None or found[1].kind is not Kind.PREFERENCES or not found[1].contact_id:
        return None
    return found


def _count(ctx: Any, method: str, verdict: str) -> None:
    metrics = getattr(ctx, "metrics", None)
    if metrics is not None:
        metrics.preference_requests.labels(method, verdict).inc()


async def _answer(ctx: Any, request: Request, tenant_id: int, link: Link) -> tuple[str, Response]:
    """The verdict counted and the answer of one request whose token read."""
    done = Done()
    if request.method == "POST":
        client = request.client.host if request.client else None
        agent = request.headers.get("user-agent", "")
        try:
            found = await act(ctx, tenant_id, link, await read_form(request), client, agent)
        except BadForm:
            found = Done(warn="bad_form", status=400)
        if found is None:
            return "gone", _not_found()
        done = found
    async with ctx.sessions() as s:  # the state after the action, as stored
        state = await _state(s, tenant_id, link.contact_id)
    if state is None:
        return "gone", _not_found()
    verdict = "invalid" if done.status == 400 else "valid"
    return verdict, render(state, done.notice, done.warn, done.status)


def routes(ctx: Any) -> list[Route]:
    """``/p/{token}`` (GET, HEAD, POST), served without an API key."""

    async def page(request: Request) -> Response:
        method = "POST" if request.method == "POST" else "GET"
        found = read_link(ctx, request.path_params["token"])
        if found is None:
            _count(ctx, method, "forged")
            return _not_found()
        try:
            verdict, response = await _answer(ctx, request, *found)
        except Exception as exc:
            if not ctx.db.lost(
                exc,
                _limited,
                "preferences_unavailable",
                "event=preferences_database_unavailable method=%s",
                method,
            ):
                raise  # fmt: skip
            verdict, response = "unavailable", _unavailable(DEFAULT_LANGUAGE)
        _count(ctx, method, verdict)
        return response

    return [Route(PATH_PREFIX + "{token}", page, methods=["GET", "HEAD", "POST"])]
