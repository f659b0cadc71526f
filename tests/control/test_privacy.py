"""A contact's data (issue 22, GDPR): the export holds everything that names it; the
erasure removes every readable trace of its address from the control database while a
tombstone keeps the address suppressed — in this process, after a reload of the
suppressions (another process), and for a message sent to it afterwards."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import select

from postwarden.store.campaign_models import SendRecord, UnsubscribeRequest
from postwarden.store.engagement_models import TrackingHit
from postwarden.store.models import Event, Recipient, Suppression
from tests.control.conftest import ControlFactory
from tests.control.test_messages import ready_tenant, until
from tests.control.test_unsubscribe import campaign_with_records, tenant_id

ANN = "ann@inbox.test"


async def test_export_then_erase_leaves_only_a_suppressed_tombstone(
    control: ControlFactory,
) -> None:
    api = await control()
    api.lab.add_domain("inbox.test")
    key = await ready_tenant(api)
    tid = await tenant_id(api, key)
    cid, (ann, bob) = await campaign_with_records(api, tid, [ANN, "bob@inbox.test"])
    plane = api.app.control
    async with plane.sessions() as s:
        s.add(
            UnsubscribeRequest(
                tenant_id=tid,
                campaign_id=cid,
                contact_id=ann,
                email=ANN,
                method="GET",
                ip="203.0.113.5",
                user_agent="Firefox",
            )
        )
        s.add(TrackingHit(tenant_id=tid, kind="click", campaign_id=cid, contact_id=ann,
                          message_id="mx", url="https://shop.example/?u=ann", ip="203.0.113.5",
                          user_agent="Firefox", at=dt.datetime.now(dt.UTC)))  # fmt: skip
        await s.commit()
    async with api.client(key) as c:
        r = await c.post(f"/v1/contacts/{ann}/consents", json={"source": "signup form"})
        assert r.status_code == 201, r.text
        r = await c.post("/v1/messages", json={"from": "news@acme.test", "to": [ANN],
                                               "subject": "Receipt", "text": "Thanks"})  # fmt: skip
        assert r.status_code == 202, r.text
        await until(c, r.json()["id"], lambda m: m["recipients"][0]["state"] == "delivered")

        r = await c.get(f"/v1/contacts/{ann}/export")
        assert r.status_code == 200, r.text
        assert "attachment" in r.headers["content-disposition"]
        got = r.json()
        assert got["contact"]["email"] == ANN and got["consents"][0]["source"] == "signup form"
        assert [x["campaign_id"] for x in got["send_records"]] == [cid]
        assert [x["address"] for x in got["message_recipients"]] == [ANN]
        assert {e["type"] for e in got["events"]} >= {"accepted", "delivered"}
        assert [u["method"] for u in got["unsubscribe_requests"]] == ["GET"]
        assert [h["url"] for h in got["tracking_hits"]] == ["https://shop.example/?u=ann"]
        assert got["suppression"] is None

        # Another tenant can neither export nor erase it.
        other = await api.tenant("other")
        async with api.client(other) as o:
            assert (await o.get(f"/v1/contacts/{ann}/export")).status_code == 404
            assert (await o.post(f"/v1/contacts/{ann}/erase")).status_code == 404

        r = await c.post(f"/v1/contacts/{ann}/erase")
        assert r.status_code == 200, r.text
        tomb = r.json()["tombstone"]
        assert tomb.startswith("h1:") and len(tomb) == 67
        assert r.json()["rows"]["send_records"] == 1 and r.json()["rows"]["contacts"] == 1
        assert (await c.get(f"/v1/contacts/{ann}")).status_code == 404
        assert (await c.get(f"/v1/contacts/{ann}/export")).status_code == 404
        assert (await c.post(f"/v1/contacts/{ann}/erase")).status_code == 404
        assert (await c.get(f"/v1/contacts/{bob}")).status_code == 200  # the others stay

    async with plane.sessions() as s:
        rows = [
            *(await s.execute(select(SendRecord.email))).scalars(),
            *(await s.execute(select(Recipient.address, Recipient.last_response))).all(),
            *(await s.execute(select(Event.recipient, Event.detail))).all(),
            *(
                await s.execute(
                    select(
                        UnsubscribeRequest.email,
                        UnsubscribeRequest.ip,
                        UnsubscribeRequest.user_agent,
                    )
                )
            ).all(),
            *(
                await s.execute(select(TrackingHit.ip, TrackingHit.url, TrackingHit.user_agent))
            ).all(),
            *(await s.execute(select(Suppression.address))).scalars(),
        ]
    text = repr(rows)
    for trace in ("ann@", "203.0.113.5", "Firefox", "u=ann"):
        assert trace not in text, (trace, text)
    assert tomb in text

    # Suppressed here, after a reload (how another process reads it), and for mail.
    assert plane.suppressions.check(tid, ANN) == "manual"
    assert plane.suppressions.check(tid, "ANN@Inbox.test") == "manual"
    await plane.suppressions.load()
    assert plane.suppressions.check(tid, ANN) == "manual"
    assert plane.suppressions.check(tid, "bob@inbox.test") is None
    async with api.client(key) as c:
        r = await c.post("/v1/messages", json={"from": "news@acme.test", "to": [ANN],
                                               "subject": "Again", "text": "Hello"})  # fmt: skip
        assert r.status_code == 202, r.text
        assert r.json()["recipients"][0]["status"] == "dropped", r.text
