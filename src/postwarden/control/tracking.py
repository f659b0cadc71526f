"""Open and click tracking (issue 22; docs/tracking.md, docs/decisions/0011): the
public routes a campaign's links reach, and the writer that stores their hits.

* ``GET /t/o/{token}`` (and HEAD): the open pixel, a 1x1 transparent GIF.
* ``GET /t/c/{token}`` (and HEAD): a click, answered ``302`` to the destination the
  sealed token carries — never one from a parameter, so no open redirect.
* A token that does not read (forged, altered, cut, a retired key, the wrong kind for
  the route): 404, counted in ``postwarden_tracking_requests_total{verdict="forged"}``;
  nothing is written.

Hits are written first and judged later (the verdict pass): a request appends its hit
to the writer's next batch and waits until that batch is committed (one transaction a
batch: group commit), so a hit answered is a hit stored. With the database down the
person still gets the pixel and their destination; the hit is counted as ``lost``.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ipaddress
import logging
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from sqlalchemy import Table, insert, select
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from postwarden.control.tenant_keys import LinkKey, TenantKeyCache
from postwarden.control.unsubscribe import public_base_url
from postwarden.engagement.tokens import Kind, Link
from postwarden.store.availability import LogLimiter
from postwarden.store.engagement_models import TrackingHit
from postwarden.store.models import Domain

HITS: Table = TrackingHit.__table__  # type: ignore[assignment]

log = logging.getLogger("postwarden.control.tracking")
_limited = LogLimiter(log)

OPEN_PREFIX = "/t/o/"
CLICK_PREFIX = "/t/c/"
USER_AGENT_MAX = 500

# The smallest transparent GIF (1x1, one transparent colour).
PIXEL = (
    b"GIF89a\x01\x00\x01\x00\x80\x00\x00\x00\x00\x00\x00\x00\x00"
    b"!\xf9\x04\x01\x00\x00\x00\x00,\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;"
)
_NO_STORE = {
    "Cache-Control": "no-store, no-cache, must-revalidate, private, max-age=0",
    "Pragma": "no-cache",
    "Referrer-Policy": "no-referrer",
    "X-Robots-Tag": "noindex, nofollow",
}


@dataclass(frozen=True, slots=True)
class Tracker:
    """The tracked URLs of one message: ``click`` and ``pixel`` for
    ``content.links.rewrite_html``. Anonymous (``contact_id`` 0, no message id): the
    same URLs for every recipient of the campaign, counts only."""

    keys: TenantKeyCache
    signer: LinkKey
    base: str  # public_base_url, without a final "/"
    campaign_id: int
    contact_id: int = 0
    message_id: str = ""

    def click(self, index: int, url: str) -> str:
        link = Link(Kind.CLICK, self.campaign_id, self.contact_id, index, self.message_id, url)
        return f"{self.base}{CLICK_PREFIX}{self.keys.make(self.signer, link)}"

    def pixel(self, links: int) -> str:
        """The pixel's URL; its token carries how many links the message has (the
        verdicts' "every link at once")."""
        link = Link(Kind.OPEN, self.campaign_id, self.contact_id, links, self.message_id)
        return f"{self.base}{OPEN_PREFIX}{self.keys.make(self.signer, link)}"


async def tracking_base(s: Any, ctx: Any, tenant_id: int, from_domain: str) -> str:
    """Where a message's tracked links point: ``https://<tracking host>`` of its From
    domain when the domain's tracking CNAME (``<control.tracking_label>.<domain>``) was
    found at its last check, else ``control.public_url``."""
    domain = await s.scalar(
        select(Domain).where(Domain.tenant_id == tenant_id, Domain.name == from_domain.lower())
    )
    for rec in (domain.last_check or {}).get("records", []) if domain is not None else []:
        if rec.get("purpose") == "tracking" and rec.get("status") == "ok" and rec.get("name"):
            return f"https://{str(rec['name']).rstrip('.')}"
    return public_base_url(ctx.cfg)


def truncate_ip(ip: str | None) -> str | None:
    """An IPv4 address as its /24, an IPv6 address as its /48, in network notation
    (``203.0.113.0/24``: what a tenant that keeps less asks for, and what the verdicts
    read as a truncated address); anything else as None."""
    if not ip:
        return None
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return None
    prefix = 24 if addr.version == 4 else 48
    return str(ipaddress.ip_network(f"{addr}/{prefix}", strict=False))


class HitWriter:
    """Group commit of tracking hits: every hit added while a batch is being written
    goes into the next one; each ``add`` returns once its batch is committed."""

    def __init__(self, sessions: Any, batch: int) -> None:
        self.sessions = sessions
        self.batch = batch
        self._pending: list[tuple[dict[str, Any], asyncio.Future[None]]] = []
        self._task: asyncio.Task[None] | None = None

    async def add(self, row: dict[str, Any]) -> None:
        """Store one hit (a ``tracking_hits`` row as a dict); raises what the
        database raised for its batch."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((row, fut))
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="tracking-hits")
        await fut

    async def _run(self) -> None:
        while self._pending:
            batch, self._pending = self._pending[: self.batch], self._pending[self.batch :]
            try:
                async with self.sessions() as s:
                    # A Core insert of the table: the ORM's bulk insert costs a fifth
                    # more CPU a hit for the same statement (bench/tracking.py).
                    await s.execute(insert(HITS), [row for row, _ in batch])
                    await s.commit()
            except Exception as exc:
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            for _, fut in batch:
                if not fut.done():
                    fut.set_result(None)

    async def stop(self) -> None:
        if self._task is not None:
            with contextlib.suppress(Exception):
                await self._task


def _count(ctx: Any, kind: str, verdict: str) -> None:
    metrics = getattr(ctx, "metrics", None)
    if metrics is not None:
        metrics.tracking_requests.labels(kind, verdict).inc()


def _hit(ctx: Any, tenant_id: int, link: Link, request: Request) -> dict[str, Any]:
    # One pass over the raw header list (ASGI names are lower case): Starlette's
    # Headers scans it again for every lookup, a third of this function's time.
    agent: bytes | None = None
    ranged = False
    for name, value in request.scope["headers"]:
        if name == b"user-agent":
            if agent is None:
                agent = value
        elif name == b"range":
            ranged = True
    client = request.scope.get("client")
    ip: str | None = client[0] if client else None
    if tenant_id in ctx.pool_cache.truncate_ip_tenants:
        ip = truncate_ip(ip)
    return {
        "tenant_id": tenant_id,
        "kind": "open" if link.kind is Kind.OPEN else "click",
        "campaign_id": link.campaign_id or None,
        "contact_id": link.contact_id or None,
        "message_id": link.message_id or None,
        # A click: which link; an open: how many tracked links its message has.
        "link_index": link.index,
        "url": link.url or None,
        "at": dt.datetime.now(dt.UTC),
        "method": request.method[:8],
        "ip": ip[:45] if ip else None,
        "user_agent": (agent or b"").decode("latin-1")[:USER_AGENT_MAX],
        "ranged": ranged,
        "reason": "",
    }


async def _store(ctx: Any, kind: str, row: dict[str, Any]) -> None:
    try:
        await ctx.hits.add(row)
    except Exception as exc:
        if not ctx.db.lost(
            exc,
            _limited,
            "tracking_unavailable",
            "event=tracking_hit_lost reason=database_unavailable kind=%s",
            kind,
        ):
            log.error("event=tracking_hit_failed kind=%s", kind, exc_info=exc)  # fmt: skip
        _count(ctx, kind, "lost")
        return
    _count(ctx, kind, "valid")


def location(url: str) -> str:
    """A destination as a Location value: ASCII, what is not a URI character
    percent-encoded (UTF-8), what already is a URI kept as it is."""
    return quote(url, safe="!#$%&'()*+,/:;=?@[]~-._")


class _Fixed(Response):
    """A response whose header lines are encoded once (every recipient's pixel and
    click; Starlette would encode them again for each)."""

    def __init__(self, status: int, body: bytes, raw: list[tuple[bytes, bytes]]) -> None:
        self.status_code = status
        self.body = body
        self.background = None
        self.raw_headers = [*raw, (b"content-length", str(len(body)).encode())]


_RAW_NO_STORE = [(k.lower().encode(), v.encode()) for k, v in _NO_STORE.items()]
_PIXEL_HEADERS = [*_RAW_NO_STORE, (b"content-type", b"image/gif")]


def _not_found() -> Response:
    return Response(b"not found\n", 404, headers=_NO_STORE, media_type="text/plain")


def routes(ctx: Any) -> list[Route]:
    """The pixel and the redirect, served without an API key."""

    async def pixel(request: Request) -> Response:
        found = ctx.tenant_keys.read(request.path_params["token"])
        if found is None or found[1].kind is not Kind.OPEN:
            _count(ctx, "open", "forged")
            return _not_found()
        await _store(ctx, "open", _hit(ctx, found[0], found[1], request))
        return _Fixed(200, PIXEL, _PIXEL_HEADERS)

    async def click(request: Request) -> Response:
        found = ctx.tenant_keys.read(request.path_params["token"])
        link = found[1] if found is not None else None
        if (
            found is None
            or link is None
            or link.kind is not Kind.CLICK
            or not link.url.lower().startswith(("https://", "http://"))
        ):
            _count(ctx, "click", "forged")
            return _not_found()
        await _store(ctx, "click", _hit(ctx, found[0], link, request))
        return _Fixed(302, b"", [*_RAW_NO_STORE, (b"location", location(link.url).encode())])

    return [
        Route(OPEN_PREFIX + "{token}", pixel, methods=["GET", "HEAD"]),
        Route(CLICK_PREFIX + "{token}", click, methods=["GET", "HEAD"]),
    ]
