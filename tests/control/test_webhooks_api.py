"""/v1/webhooks (issue 23): endpoints made with a secret shown once, their filters
feeding the outbox (the trigger on events), rotation with overlap, the deliveries
list, replays, the JWKS, and tenant isolation."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import select

from postwarden.store.models import Event
from postwarden.store.webhook_models import WebhookOutbox
from tests.control.conftest import ControlApi, ControlFactory
from tests.control.test_unsubscribe import tenant_id


async def add_event(api: ControlApi, tid: int, kind: str) -> int:
    async with api.app.control.sessions() as s:
        e = Event(
            tenant_id=tid,
            ts=dt.datetime.now(dt.UTC),
            type=kind,
            message_id="m1",
            recipient="ann@inbox.test",
            detail={},
        )
        s.add(e)
        await s.commit()
        return e.id


async def outbox(api: ControlApi) -> list[tuple[int, int]]:
    async with api.app.control.sessions() as s:
        rows = (await s.execute(select(WebhookOutbox).order_by(WebhookOutbox.id))).scalars()
        return [(r.endpoint_id, r.event_id) for r in rows]


async def test_endpoints_filters_rotation_replay_and_isolation(control: ControlFactory) -> None:
    api = await control()
    key = await api.tenant("acme")
    tid = await tenant_id(api, key)
    async with api.client(key) as c:
        bad = [
            {"url": "ftp://hooks.test/x", "events": ["*"]},
            {"url": "https://hooks.test/x", "events": ["delivered", "nope"]},
            {"url": "https://hooks.test/x", "events": []},
        ]
        for body in bad:
            r = await c.post("/v1/webhooks", json=body)
            assert r.status_code == 422, r.text
        assert [f["path"] for f in r.json()["error"]["fields"]] == ["events"]
        r = await c.post("/v1/webhooks", json={"url": "https://hooks.test/all", "events": ["*"]})
        assert r.status_code == 201, r.text
        every = r.json()
        assert every["secret"].startswith("whsec_") and every["public_key"].startswith("whpk_")
        r = await c.post(
            "/v1/webhooks",
            json={"url": "https://hooks.test/b", "events": ["bounced", "complained"]},
        )
        bounces = r.json()
        r = await c.get("/v1/webhooks")
        assert [w["id"] for w in r.json()["data"]] == [every["id"], bounces["id"]]
        assert all("secret" not in w for w in r.json()["data"])
        assert r.json()["data"][1]["events"] == ["bounced", "complained"]

        delivered = await add_event(api, tid, "delivered")
        bounced = await add_event(api, tid, "bounced")
        assert await outbox(api) == [
            (every["id"], delivered),
            (every["id"], bounced),
            (bounces["id"], bounced),
        ]
        r = await c.get(f"/v1/webhooks/{every['id']}/deliveries", params={"state": "pending"})
        assert [d["event_id"] for d in r.json()["data"]] == [delivered, bounced]

        # Disabled, an endpoint gets nothing; its filter changed, the next event follows it.
        r = await c.patch(f"/v1/webhooks/{every['id']}", json={"enabled": False})
        assert r.status_code == 200 and r.json()["enabled"] is False
        r = await c.patch(f"/v1/webhooks/{bounces['id']}", json={"events": ["opened"]})
        assert r.json()["events"] == ["opened"]
        opened = await add_event(api, tid, "opened")
        await add_event(api, tid, "bounced")
        assert (await outbox(api))[3:] == [(bounces["id"], opened)]

        # Rotation: two secrets sign until the overlap ends.
        r = await c.post(f"/v1/webhooks/{every['id']}/secret", json={"overlap_hours": 1})
        assert r.status_code == 200, r.text
        assert r.json()["secret"] != every["secret"] and r.json()["secrets"] == 2
        r = await c.post(f"/v1/webhooks/{every['id']}/secret", json={"overlap_hours": 0})
        assert r.json()["secrets"] == 1

        # Replays: one event, a time range, and what cannot be.
        r = await c.post(f"/v1/webhooks/{bounces['id']}/replay", json={"event_id": opened})
        assert r.status_code == 200 and r.json() == {"queued": 1}
        since = (dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)).isoformat()
        r = await c.post(f"/v1/webhooks/{every['id']}/replay", json={"since": since})
        assert r.json() == {"queued": 4}
        assert (await c.post(f"/v1/webhooks/{every['id']}/replay", json={})).status_code == 422
        r = await c.post(f"/v1/webhooks/{every['id']}/replay", json={"event_id": 10**9})
        assert r.status_code == 404

        r = await c.get("/v1/webhooks/jwks")
        assert [k["kid"] for k in r.json()["keys"]] == [f"wh_{every['id']}", f"wh_{bounces['id']}"]
        assert {k["crv"] for k in r.json()["keys"]} == {"Ed25519"}

    other = await api.tenant("other")
    async with api.client(other) as o:
        wid = every["id"]
        assert (await o.get(f"/v1/webhooks/{wid}")).status_code == 404
        assert (await o.patch(f"/v1/webhooks/{wid}", json={"enabled": True})).status_code == 404
        assert (await o.get(f"/v1/webhooks/{wid}/deliveries")).status_code == 404
        r = await o.post(f"/v1/webhooks/{wid}/replay", json={"event_id": opened})
        assert r.status_code == 404
        assert (await o.get("/v1/webhooks")).json()["data"] == []
        assert (await o.get("/v1/webhooks/jwks")).json()["keys"] == []
        assert (await o.delete(f"/v1/webhooks/{wid}")).status_code == 404
    async with api.client(key) as c:
        r = await c.delete(f"/v1/webhooks/{bounces['id']}")
        # Its pending deliveries: the bounce, the open, and the open's replay.
        assert r.status_code == 200 and r.json() == {"deleted": True, "dropped": 3}
        assert (await c.get(f"/v1/webhooks/{bounces['id']}")).status_code == 404
