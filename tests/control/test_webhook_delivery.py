"""Webhook deliveries to a receiver the test starts (issue 23), every one verified by
the reference ``standardwebhooks`` package: a receiver down for 10 minutes of simulated
time, then back, gets every event exactly once per id; one that answers 500 at random
30 % of the time loses nothing; 410 Gone disables the endpoint. The dispatcher's clock
is the test's (when rows are due); signatures carry the real time, as the verifier
checks it."""

from __future__ import annotations

import collections
import datetime as dt
import random
from typing import Any

import pytest
from sqlalchemy import func, select
from standardwebhooks.webhooks import Webhook, WebhookVerificationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from postwarden.control.server import HttpServer
from postwarden.store.webhook_models import WebhookAttempt, WebhookEndpoint, WebhookOutbox
from tests.conftest import free_port
from tests.control.conftest import ControlApi, ControlFactory
from tests.control.test_unsubscribe import tenant_id
from tests.control.test_webhooks_api import add_event


class Receiver:
    """Answers ``mode``: ``ok`` (200), ``flaky`` (500 three times in ten), ``gone``
    (410); verifies every delivery and counts the accepted ones by webhook-id."""

    def __init__(self, secret: str, port: int) -> None:
        self.hook = Webhook(secret)
        self.port = port
        self.mode = "ok"
        self.rng = random.Random(3)
        self.accepted: collections.Counter[str] = collections.Counter()
        self.refused = 0
        self.unverified: list[str] = []
        self.bodies: dict[str, Any] = {}
        self.server: HttpServer | None = None

    async def handle(self, request: Request) -> Response:
        body = await request.body()
        try:
            payload = self.hook.verify(body, dict(request.headers))
        except WebhookVerificationError as exc:
            self.unverified.append(str(exc))
            return Response(status_code=400)
        if self.mode == "gone":
            return Response(status_code=410)
        if self.mode == "flaky" and self.rng.random() < 0.3:
            self.refused += 1
            return Response(b"busy", status_code=500)
        msg_id = request.headers["webhook-id"]
        self.accepted[msg_id] += 1
        self.bodies[msg_id] = payload
        return Response(b"ok")

    async def start(self) -> None:
        app = Starlette(routes=[Route("/hook", self.handle, methods=["POST"])])
        self.server = HttpServer(app, "127.0.0.1", self.port)
        await self.server.start()

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop()
            self.server = None


class Clock:
    def __init__(self) -> None:
        self.now = dt.datetime.now(dt.UTC)

    def __call__(self) -> dt.datetime:
        return self.now


async def setup(api: ControlApi, port: int) -> tuple[Any, Receiver, int, Clock, str]:
    key = await api.tenant("acme")
    tid = await tenant_id(api, key)
    async with api.client(key) as c:
        r = await c.post(
            "/v1/webhooks", json={"url": f"http://127.0.0.1:{port}/hook", "events": ["*"]}
        )
        assert r.status_code == 201, r.text
    dispatcher = api.app.control.webhooks
    assert dispatcher is not None
    await dispatcher.stop()  # the test drives it, on its own clock
    clock = Clock()
    dispatcher.clock = clock
    return dispatcher, Receiver(r.json()["secret"], port), tid, clock, key


async def drive(dispatcher: Any, clock: Clock, until: dt.timedelta, step: float) -> None:
    """Passes of the dispatcher while the clock moves ``until`` on: from each pass to
    the next delivery due (at least ``step`` later), as a real clock would bring it."""
    end = clock.now + until
    while clock.now < end:
        await dispatcher.run_once()
        await dispatcher.settle()
        async with dispatcher.sessions() as s:
            due = await s.scalar(
                select(func.min(WebhookOutbox.next_at)).where(WebhookOutbox.state == "pending")
            )
        if due is None:
            return
        clock.now = min(end, max(due, clock.now + dt.timedelta(seconds=step)))


@pytest.mark.sqlite_only  # the outbox's database behaviour has its own twin test
async def test_a_receiver_down_ten_minutes_gets_every_event_once(control: ControlFactory) -> None:
    port = free_port()
    api = await control()
    dispatcher, receiver, tid, clock, key = await setup(api, port)
    events = [await add_event(api, tid, kind) for kind in ("delivered", "bounced") * 10]
    try:
        # Down: nothing listens. Ten minutes of simulated time, a pass every 20 s.
        await drive(dispatcher, clock, dt.timedelta(minutes=10), 20)
        assert not receiver.accepted
        await receiver.start()
        await drive(dispatcher, clock, dt.timedelta(hours=2), 60)
    finally:
        await receiver.stop()
    assert receiver.unverified == []
    assert receiver.accepted == collections.Counter({f"evt_{e}": 1 for e in events})
    body = receiver.bodies[f"evt_{events[1]}"]
    assert body["type"] == "bounced" and body["data"]["id"] == events[1]
    async with api.app.control.sessions() as s:
        states = dict(
            (
                await s.execute(
                    select(WebhookOutbox.state, func.count()).group_by(WebhookOutbox.state)
                )
            ).all()
        )
        failed_tries = await s.scalar(select(func.count()).where(WebhookAttempt.status.is_(None)))
    assert states == {"delivered": 20}
    # The log of one delivery: no answer while down, then 200.
    async with api.client(key) as c:
        wid = (await c.get("/v1/webhooks")).json()["data"][0]["id"]
        first = (await c.get(f"/v1/webhooks/{wid}/deliveries")).json()["data"][0]
        r = await c.get(f"/v1/webhooks/{wid}/deliveries/{first['id']}/attempts")
        assert r.status_code == 200, r.text
        tries = r.json()["data"]
        assert [t["status"] for t in tries][-1] == 200 and tries[-1]["response"] == "ok"
        assert all(t["status"] is None and t["error"] for t in tries[:-1]) and len(tries) >= 3
        r = await c.get(f"/v1/webhooks/{wid}/deliveries/{10**9}/attempts")
        assert r.status_code == 404
    assert failed_tries and failed_tries >= 20 * 3  # tries at 0 s, ~5 s, ~5 min: no answer


@pytest.mark.sqlite_only
async def test_a_flaky_receiver_loses_nothing_and_410_disables(control: ControlFactory) -> None:
    port = free_port()
    api = await control()
    dispatcher, receiver, tid, clock, _key = await setup(api, port)
    receiver.mode = "flaky"
    await receiver.start()
    try:
        events = [await add_event(api, tid, "delivered") for _ in range(40)]
        await drive(dispatcher, clock, dt.timedelta(hours=3), 30)
        assert receiver.refused > 5  # the 500s happened
        assert receiver.accepted == collections.Counter({f"evt_{e}": 1 for e in events})
        receiver.mode = "gone"
        await add_event(api, tid, "opened")
        await drive(dispatcher, clock, dt.timedelta(seconds=60), 30)
    finally:
        await receiver.stop()
    assert receiver.unverified == []
    async with api.app.control.sessions() as s:
        endpoint = (await s.execute(select(WebhookEndpoint))).scalar_one()
    assert endpoint.enabled == 0 and "410" in endpoint.disabled_reason
