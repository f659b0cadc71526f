"""Sending the webhook outbox (issue 23; docs/decisions/0012): due rows are claimed
(their ``next_at`` moved a lease ahead in the claiming transaction), then each endpoint
sends its own with a few requests at a time, so that a slow endpoint never holds up the
others. A 2xx answer delivers the row; 410 Gone disables the endpoint; anything else,
or no answer, tries again later (``webhooks.retry``) until the schedule runs out. Every
try is logged (``webhook_attempts``).

A delivery is a POST of the event as the events API shows it, in a Standard Webhooks
envelope (``{"type", "timestamp", "data"}``), with ``webhook-id`` ``evt_<event id>``
(the same on every try and on a replay), ``webhook-timestamp`` the try's time, and
``webhook-signature`` (``v1`` per live secret, ``v1a`` Ed25519). The URL is reached
under delivery's private-network rule (``control.safe_http``), no redirect followed,
the answer read up to a kilobyte.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import random
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import httpx
from sqlalchemy import select, update

from postwarden.control import stop_task
from postwarden.control.safe_http import UnsafeUrl, checked
from postwarden.control.schemas import EventOut
from postwarden.mta.destinations import parse_networks
from postwarden.store.availability import LogLimiter, is_unavailable
from postwarden.store.models import Event
from postwarden.store.webhook_models import WebhookAttempt, WebhookEndpoint, WebhookOutbox
from postwarden.webhooks import retry, signing

log = logging.getLogger("postwarden.control.webhooks")
_limited = LogLimiter(log)

#: Rows claimed per pass.
BATCH = 500
#: A claimed row is due again after this long if its try never ends (a crash).
LEASE = 120.0
#: Requests in flight to one endpoint at most.
PER_ENDPOINT = 4
TIMEOUT = httpx.Timeout(10.0, connect=5.0)
RESPONSE_KEPT = 1024
USER_AGENT = "Postwarden-Webhooks/1"


def _aware(value: dt.datetime) -> dt.datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=dt.UTC)


def envelope(event: Event) -> bytes:
    """The body of a delivery: the event as ``GET /v1/events`` shows it, with its
    tags, in Standard Webhooks' envelope."""
    data = EventOut.model_validate(event).model_dump(mode="json")
    data["tags"] = [t for t in (event.tags or "").split(",") if t]
    body = {"type": event.type, "timestamp": data["ts"], "data": data}
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


class WebhookDispatcher:
    def __init__(
        self,
        ctx: Any,
        *,
        clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
        rng: random.Random | None = None,
        poll: float = 1.0,
    ) -> None:
        self.ctx = ctx
        self.sessions = ctx.sessions
        self.clock = clock  # when rows are due (a test moves it); signatures use real time
        self.rng = rng or random.Random()
        self.poll = poll
        self._gates: dict[int, asyncio.Semaphore] = defaultdict(
            lambda: asyncio.Semaphore(PER_ENDPOINT)
        )
        self._inflight: set[asyncio.Task[None]] = set()
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="webhooks")

    def wake(self) -> None:
        self._wake.set()

    async def stop(self) -> None:
        await stop_task(self._task)
        self._task = None
        for t in list(self._inflight):
            t.cancel()
        if self._inflight:
            await asyncio.gather(*self._inflight, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.poll)
            self._wake.clear()
            try:
                await self.run_once()
            except Exception as exc:
                if not is_unavailable(exc):
                    _limited(logging.WARNING, "dispatch", "event=webhook_dispatch_failed", exc=exc)

    async def run_once(self) -> int:
        """Claim what is due and start sending it; the number of rows claimed (their
        sends go on in the background: :meth:`settle` waits for them)."""
        now = self.clock()
        async with self.sessions() as s:
            rows = (
                await s.execute(
                    select(WebhookOutbox.id, WebhookOutbox.endpoint_id)
                    .join(WebhookEndpoint, WebhookEndpoint.id == WebhookOutbox.endpoint_id)
                    .where(
                        WebhookOutbox.state == "pending",
                        WebhookOutbox.next_at <= now,
                        WebhookEndpoint.enabled == 1,
                    )
                    .order_by(WebhookOutbox.next_at, WebhookOutbox.id)
                    .limit(BATCH)
                )
            ).all()
            if not rows:
                return 0
            ids = [r[0] for r in rows]
            claimed = await s.execute(
                update(WebhookOutbox)
                .where(WebhookOutbox.id.in_(ids), WebhookOutbox.next_at <= now)
                .values(next_at=now + dt.timedelta(seconds=LEASE))
                .execution_options(synchronize_session=False)
            )
            await s.commit()
        if claimed.rowcount != len(ids):  # another process took some: leave them all
            return 0
        for oid, endpoint_id in rows:
            task = asyncio.create_task(self._send(endpoint_id, oid))
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)
        return len(rows)

    async def settle(self) -> None:
        """Wait for the sends started so far (tests, shutdown)."""
        while self._inflight:
            await asyncio.gather(*list(self._inflight), return_exceptions=True)

    async def _send(self, endpoint_id: int, outbox_id: int) -> None:
        async with self._gates[endpoint_id]:
            try:
                await self._try(outbox_id)
            except Exception as exc:
                if is_unavailable(exc):
                    self.ctx.db.down(exc)
                _limited(logging.WARNING, "send", "event=webhook_send_failed", exc=exc)

    async def _try(self, outbox_id: int) -> None:
        ctx = self.ctx
        async with self.sessions() as s:
            row = await s.get(WebhookOutbox, outbox_id)
            if row is None or row.state != "pending":
                return
            endpoint = await s.get(WebhookEndpoint, row.endpoint_id)
            event = await s.get(Event, row.event_id)
        if endpoint is None or not endpoint.enabled:
            return
        status: int | None = None
        error = ""
        answer = ""
        started = time.monotonic()
        if event is None:  # pruned by retention before it could be sent
            error = "the event is gone (database.event_retention)"
        else:
            body = envelope(event)
            msg_id = f"evt_{event.id}"
            stamp = int(time.time())
            now = self.clock()
            secrets = [
                ctx.box.open(x["sealed"].encode("ascii"))
                for x in endpoint.secrets
                if x.get("expires_at") is None
                or _aware(dt.datetime.fromisoformat(x["expires_at"])) > now
            ]
            headers = {
                "content-type": "application/json",
                "user-agent": USER_AGENT,
                "webhook-id": msg_id,
                "webhook-timestamp": str(stamp),
                "webhook-signature": signing.signature(
                    msg_id, stamp, body, secrets, ctx.box.open(endpoint.signing_key)
                ),
            }
            try:
                allowed = parse_networks(ctx.cfg.delivery.allowed_private_networks)
                target = await checked(endpoint.url, ctx.resolver, allowed)
                async with (
                    httpx.AsyncClient(
                        timeout=TIMEOUT, follow_redirects=False, trust_env=False
                    ) as client,
                    client.stream(
                        "POST",
                        target.url,
                        content=body,
                        headers={**headers, **target.headers},
                        extensions=target.extensions,
                    ) as resp,
                ):
                    status = resp.status_code
                    kept = bytearray()
                    async for piece in resp.aiter_bytes():
                        kept += piece
                        if len(kept) >= RESPONSE_KEPT:
                            break
                    answer = kept[:RESPONSE_KEPT].decode("utf-8", "replace")
            except UnsafeUrl as exc:
                error = str(exc)[:300]
            except httpx.HTTPError as exc:
                error = f"{type(exc).__name__}: {exc}"[:300]
        await self._record(outbox_id, endpoint, status, error, answer, started)

    async def _record(
        self,
        outbox_id: int,
        endpoint: WebhookEndpoint,
        status: int | None,
        error: str,
        answer: str,
        started: float,
    ) -> None:
        now = self.clock()
        async with self.sessions() as s:
            row = await s.get(WebhookOutbox, outbox_id)
            if row is None:
                return
            row.attempts += 1
            row.last_status = status
            s.add(
                WebhookAttempt(
                    outbox_id=outbox_id,
                    endpoint_id=endpoint.id,
                    at=now,
                    status=status,
                    error=error,
                    response=answer,
                    duration_ms=int((time.monotonic() - started) * 1000),
                )
            )
            if status is not None and 200 <= status < 300:
                row.state, row.delivered_at = "delivered", now
            elif status == 410:
                row.state = "failed"
                await s.execute(
                    update(WebhookEndpoint)
                    .where(WebhookEndpoint.id == endpoint.id)
                    .values(enabled=0, disabled_reason="the endpoint answered 410 Gone")
                )
                log.warning("event=webhook_endpoint_disabled endpoint=%d reason=410", endpoint.id)
            else:
                wait = retry.delay(row.attempts, self.rng)
                if wait is None:
                    row.state = "failed"
                else:
                    row.next_at = now + dt.timedelta(seconds=wait)
            await s.commit()
        metrics = getattr(self.ctx, "metrics", None)
        if metrics is not None:
            outcome = "delivered" if status is not None and 200 <= status < 300 else "failed"
            metrics.webhook_attempts.labels(outcome).inc()
