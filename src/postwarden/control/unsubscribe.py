"""List-Unsubscribe for campaign messages (issue 21), the placeholder before issue 22's
one-click endpoint and preference center: the header fields the feeder adds, the
public routes their HTTPS link reaches, and the campaign validation's check that the
fields would be signed.

* ``GET /u/<token>`` (and HEAD) records the request and answers a confirmation page
  whose button POSTs: a GET never unsubscribes (link scanners follow links).
* ``POST /u/<token>`` (RFC 8058 one-click; any body) records the request, suppresses
  the address for the tenant (reason ``unsubscribe``, through the one suppression
  store), and answers 200: no redirect, no cookie.
* A token that does not read (forged, altered, malformed): 404, counted in
  ``postwarden_unsubscribe_requests_total{verdict="forged"}``.

The token (``campaigns.unsubscribe``) is sealed and signed under a key derived from the
control plane's encryption key (``control.encryption_key`` or its key file): the
32 raw bytes of that Fernet key through HMAC-SHA256 with the label
``"postwarden list-unsubscribe v1"`` — never the encryption key itself, and another
key than the return paths' (``"postwarden return-path v1"``). Changing the
encryption key makes the links of mail already sent answer 404.
"""

from __future__ import annotations

import html
import ipaddress
import logging
import time
from typing import Any
from urllib.parse import urlsplit

import dkim
from sqlalchemy import select
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route

from postwarden.bounces.verp import control_key_material
from postwarden.campaigns import unsubscribe as tokens
from postwarden.config import Config, parse_hostport
from postwarden.control.tenant_keys import LinkKey
from postwarden.engagement import tokens as tokens_v2
from postwarden.engagement.tokens import Kind, Link
from postwarden.mail.addresses import suppression_key
from postwarden.mail.build import Draft, Mailbox, build
from postwarden.mta.dkim import DkimSigner, SigningKey, split_message
from postwarden.store import unsubscribes
from postwarden.store.availability import LogLimiter
from postwarden.store.models import Domain
from postwarden.store.unsubscribes import Unsubscribe

log = logging.getLogger("postwarden.control.unsubscribe")
_limited = LogLimiter(log)

#: The path of the links: ``{public_url}/u/{token}``.
PATH_PREFIX = "/u/"
#: The mailto's local part: ``unsubscribe+{token}``.
MAILTO_PREFIX = "unsubscribe+"
#: RFC 5321's limit of a local part: a longer mailto is left out (ids past 2**40).
MAX_LOCAL_PART = 64
#: The suppression's source, for the API's lists and exports.
SOURCE = "list-unsubscribe"
USER_AGENT_MAX = 500

# ------------------------------------------------------------------ links and fields

_keys: dict[tuple[str, str], bytes] = {}


def token_key(cfg: Config) -> bytes:
    """The token key of this configuration's encryption key (read once per key)."""
    which = (cfg.control.encryption_key, cfg.control.encryption_key_file)
    key = _keys.get(which)
    if key is None:
        key = _keys[which] = tokens.derive_key(control_key_material(cfg))
    return key


def public_base_url(cfg: Config) -> str:
    """``control.public_url`` without a final ``/``; by default the control plane's
    own address, ``http://<control.listen>`` (a wildcard host as loopback)."""
    if cfg.control.public_url:
        return cfg.control.public_url.rstrip("/")
    host, port = parse_hostport(cfg.control.listen, "control.listen")
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


def _url(ctx: Any, token: str) -> str:
    return f"{public_base_url(ctx.cfg)}{PATH_PREFIX}{token}"


def mailto_domain(ctx: Any, from_domain: str) -> str | None:
    """Where the mailto goes: the From domain's return-path domain
    (``<control.return_path_label>.<domain>``) when the appliance's inbound MX takes
    mail for it (a registered sending domain), else the From domain itself; in ASCII
    (an internationalized name as its A-label), None when it has none."""
    domain = from_domain.strip().rstrip(".").lower()
    return_path = f"{ctx.cfg.control.return_path_label}.{domain}"
    chosen = return_path if ctx.inbound.accepts(return_path) else domain
    if chosen.isascii():
        return chosen
    try:
        return chosen.encode("idna").decode("ascii")
    except UnicodeError:
        return None


def list_unsubscribe_headers(
    ctx: Any,
    tenant_id: int,
    campaign_id: int,
    contact_id: int,
    from_domain: str,
    signer: LinkKey | None = None,
) -> list[tuple[str, str]]:
    """The List-Unsubscribe and List-Unsubscribe-Post fields of one campaign message
    (:func:`recipient_links`' second half)."""
    return recipient_links(ctx, tenant_id, campaign_id, contact_id, from_domain, signer)[1]


def recipient_links(
    ctx: Any,
    tenant_id: int,
    campaign_id: int,
    contact_id: int,
    from_domain: str,
    signer: LinkKey | None = None,
) -> tuple[str, list[tuple[str, str]]]:
    """One recipient's unsubscribe link (``{{ unsubscribe_url }}``) and the
    List-Unsubscribe and List-Unsubscribe-Post fields of their message, from one
    token: ``<{public_url}/u/{token}>, <mailto:unsubscribe+{token}@{mailto_domain}>``
    (the mailto left out when its local part would pass 64 characters), for
    ``mail.build.Draft.headers`` (which writes ASCII values as they are, folded only
    at spaces).

    ``signer``: the tenant's links key (``control.tenant_keys``): a version 2 token.
    Without one, a version 1 token under the appliance-wide key — what mail sent
    before issue 22 carries, still read by the route."""
    if signer is not None:
        token = tokens_v2.make(
            signer.kid, signer.key, Link(Kind.UNSUBSCRIBE, campaign_id, contact_id)
        )
    else:
        token = tokens.make_token(token_key(ctx.cfg), tenant_id, campaign_id, contact_id)
    url = _url(ctx, token)
    local = f"{MAILTO_PREFIX}{token}"
    domain = mailto_domain(ctx, from_domain)
    mailto = f"{local}@{domain}" if domain and len(local) <= MAX_LOCAL_PART else None
    return url, tokens.headers(url, mailto)


def read_link(ctx: Any, token: str) -> tokens.Recipient | None:
    """Who an unsubscribe token names: a version 2 token under the tenant's links
    key, else a version 1 token under the appliance-wide key; None for anything else
    (a tracking token included)."""
    found = ctx.tenant_keys.read(token)
    if found is not None:
        tenant_id, link = found
        if link.kind is not Kind.UNSUBSCRIBE or not link.contact_id:
            return None
        return tokens.Recipient(tenant_id, link.campaign_id, link.contact_id)
    return tokens.read_token(token_key(ctx.cfg), token)


# ------------------------------------------------------------------ the validation check


def _loopback(host: str) -> bool:
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _problem(path: str, message: str) -> dict[str, str]:
    return {"code": "list_unsubscribe", "path": path, "message": message}


def covered_fields(message: bytes, keys: list[SigningKey]) -> list[set[str]]:
    """For each DKIM-Signature of ``message``, top down: the header names its ``h=``
    tag signs (lower case) when it verifies against the public record of one of
    ``keys``, else an empty set. Oversigned names are in ``h=`` whether the message
    has the field or not; the verification is what shows the fields as they are in
    the message are inside the signature."""
    records = {
        f"{k.selector}._domainkey.{k.domain}".encode("idna"): k.public_txt().encode() for k in keys
    }

    def txt(name: bytes, **_: Any) -> bytes | None:
        return records.get(name.rstrip(b"."))

    out: list[set[str]] = []
    fields, _ = split_message(message)
    count = sum(1 for name, _ in fields if name.lower() == b"dkim-signature")
    for idx in range(count):
        verifier = dkim.DKIM(message)
        try:
            ok = verifier.verify(idx=idx, dnsfunc=txt)
        except (dkim.DKIMException, ValueError, TypeError):  # PyNaCl's are ValueErrors
            ok = False
        signed = getattr(verifier, "include_headers", None) or ()
        names = {h.decode("ascii", "replace") for h in signed}
        out.append(names if ok else set())
    return out


async def list_unsubscribe_problem(
    ctx: Any, tenant_id: int, from_email: str
) -> dict[str, Any] | None:
    """None when a campaign message From ``from_email`` would carry List-Unsubscribe
    and List-Unsubscribe-Post inside the DKIM signature of its domain; else the
    problem (``code`` list_unsubscribe, ``path`` public_url or from.email, ``message``).

    ``control.public_url`` must be https (http only on a loopback host: labs, tests).
    A sample message with the fields is built and signed with the signing keys the
    control plane has for the From domain of the tenant; every signature's ``h=``
    must name both fields, and the fields must come out as they went in."""
    base = public_base_url(ctx.cfg)
    parts = urlsplit(base)
    if parts.scheme != "https" and not (
        parts.scheme == "http" and parts.hostname and _loopback(parts.hostname)
    ):
        return _problem(
            "public_url",
            f"control.public_url must be an https:// URL that recipients reach (RFC 8058);"
            f" it is {base!r}",
        )
    domain = from_email.rpartition("@")[2].strip().rstrip(".").lower()
    keys = []
    if domain in ctx.signing.verified.get(tenant_id, ()):
        keys = [k for k in ctx.signing.keys if k.domain == domain]
    if not keys:
        # The cache knows verified domains with keys only: ask which one this is.
        async with ctx.sessions() as s:
            verified = (
                await s.execute(
                    select(Domain.id).where(
                        Domain.tenant_id == tenant_id,
                        Domain.name == domain,
                        Domain.verified_at.is_not(None),
                    )
                )
            ).first()
        if verified is None:
            return _problem(
                "from.email",
                f"{domain or repr(from_email)} is not a verified sending domain of the tenant",
            )
        return _problem(
            "from.email", f"{domain} has no DKIM signing keys: List-Unsubscribe would go unsigned"
        )
    signer = await ctx.tenant_keys.signer(tenant_id)
    fields = list_unsubscribe_headers(ctx, tenant_id, 0, 0, domain, signer)
    # Built as the campaign runner builds its messages (mail.build), then signed.
    draft = Draft(
        sender=Mailbox(f"sample@{domain}"),
        to=[Mailbox("recipient@example.invalid")],
        subject="List-Unsubscribe check",
        text="A sample of a campaign message.\n",
        headers=fields,
    )
    sample = build(draft, message_id=f"<list-unsubscribe-check@{domain}>", date=time.time())
    written = {
        name.decode().lower(): b"".join(value.split(b"\r\n")).strip().decode()
        for name, value in split_message(sample)[0]
    }
    for name, value in fields:
        if written.get(name.lower()) != value:
            return _problem(
                "from.email", f"{name} does not come out of the message builder as it went in"
            )
    signatures = await DkimSigner(keys).sign_async(sample, domain)
    signed = covered_fields(signatures + sample, keys)
    if len(signed) != len(keys):
        return _problem("from.email", f"the DKIM keys of {domain} did not sign the sample")
    for names in signed:
        missing = [n for n, _ in fields if n.lower() not in names]
        if missing:
            return _problem(
                "from.email",
                f"the DKIM signature of {domain} does not cover {', '.join(missing)}",
            )
    return None


# ------------------------------------------------------------------ the public routes

_HEADERS = {
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
    "X-Robots-Tag": "noindex, nofollow",
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'"
    ),
}


def _page(title: str, body: str, status: int = 200, **headers: str) -> HTMLResponse:
    return HTMLResponse(
        "<!doctype html><html><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width'>"
        f"<meta name='robots' content='noindex'><title>{html.escape(title)}</title>"
        "<style>body{font-family:sans-serif;max-width:32em;margin:3em auto;padding:0 1em}"
        "</style></head><body>" + body + "</body></html>",
        status_code=status,
        headers={**_HEADERS, **headers},
    )


def _confirm_page() -> HTMLResponse:
    # No action: the form posts back to the URL it came from, whatever prefix a proxy
    # in front of the control plane adds.
    return _page(
        "Unsubscribe",
        "<h1>Unsubscribe</h1><p>Stop receiving these emails?</p>"
        "<form method='post'><input type='hidden' name='List-Unsubscribe'"
        " value='One-Click'><button type='submit'>Unsubscribe</button></form>",
    )


def _done_page() -> HTMLResponse:
    return _page("Unsubscribed", "<h1>Unsubscribed</h1><p>You will not get these emails again.</p>")


def _not_found() -> HTMLResponse:
    return _page("Not found", "<h1>Not found</h1><p>This link is not valid.</p>", 404)


def _unavailable() -> HTMLResponse:
    return _page(
        "Try again",
        "<h1>Try again shortly</h1><p>Nothing was changed.</p>",
        503,
        **{"Retry-After": "5"},
    )


async def record_request(
    ctx: Any, who: tokens.Recipient, method: str, ip: str | None, user_agent: str
) -> str | None:
    """Record one request to a valid link (``store.unsubscribes``: a POST
    unsubscribes) and put a new suppression in force in this process before the
    answer. Returns the address ("" when unknown; None when the tenant is gone)."""
    u = Unsubscribe(who.tenant_id, who.campaign_id, who.contact_id, method, SOURCE, ip,
                    user_agent)  # fmt: skip
    async with ctx.sessions() as s:
        done = await unsubscribes.record(s, u)
        await s.commit()
    if done is None:
        return None
    if done.unsubscribed:
        # In force in this process before the answer; in the others within a poll.
        await ctx.suppressions.refresh([(who.tenant_id, suppression_key(done.email))])
        ctx.wake()
    log.info(
        "event=list_unsubscribe method=%s tenant=%s campaign=%s contact=%s known=%s",
        method,
        who.tenant_id,
        who.campaign_id,
        who.contact_id,
        bool(done.email),
    )
    return done.email


async def mailto_unsubscribe(ctx: Any, token: str, sender: str) -> bool:
    """A message the inbound MX took for ``unsubscribe+<token>@...``: the unsubscribe
    recorded (method ``mailto``; the envelope sender kept as the user agent) when the
    token reads; False for a token that does not (the report is kept as unparsed)."""
    who = read_link(ctx, token)
    _count(ctx, "mailto", "forged" if who is None else "valid")
    if who is None:
        return False
    await record_request(ctx, who, "mailto", None, f"mail from <{sender}>")
    return True


def _count(ctx: Any, method: str, verdict: str) -> None:
    metrics = getattr(ctx, "metrics", None)
    if metrics is not None:
        metrics.unsubscribe_requests.labels(method, verdict).inc()


def routes(ctx: Any) -> list[Route]:
    """``/u/{token}`` (GET, HEAD, POST), served without an API key."""

    async def link(request: Request) -> Response:
        method = request.method
        who = read_link(ctx, request.path_params["token"])
        if who is None:
            _count(ctx, method, "forged")
            return _not_found()
        _count(ctx, method, "valid")
        try:
            await record_request(
                ctx,
                who,
                method,
                request.client.host if request.client else None,
                request.headers.get("user-agent", ""),
            )
        except Exception as exc:
            if not ctx.db.lost(
                exc,
                _limited,
                "unsubscribe_unavailable",
                "event=list_unsubscribe_database_unavailable method=%s",
                method,
            ):
                raise  # fmt: skip
            return _unavailable()
        return _done_page() if method == "POST" else _confirm_page()

    return [Route(PATH_PREFIX + "{token}", link, methods=["GET", "HEAD", "POST"])]
