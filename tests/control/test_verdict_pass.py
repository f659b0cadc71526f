"""The verdict pass on a real control database (issue 22): settled hits are judged a
message at a time, with the delivery time and MX that delivery recorded; each becomes
one ``opened`` or ``clicked`` event with ``machine`` and the reason; a human one moves
the send record's first open or click, a machine one never does."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import select

from postwarden.store.campaign_models import SendRecord
from postwarden.store.engagement_models import TrackingHit
from postwarden.store.models import Event
from tests.control.conftest import ControlApi, ControlFactory
from tests.control.test_unsubscribe import campaign_with_records, tenant_id

T0 = dt.datetime(2026, 12, 1, 9, 0, tzinfo=dt.UTC)
CHROME = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko)"
    " Chrome/131.0.0.0 Safari/537.36"
)


async def seed(api: ControlApi, tid: int, cid: int, contacts: list[int],
               mx: str = "mx.inbox.test") -> list[str]:  # fmt: skip
    """Give each contact's record a message id, delivered at T0 to ``mx``."""
    ids = []
    async with api.app.control.sessions() as s:
        for contact in contacts:
            mid = f"m{cid}x{contact}"
            rec = await s.scalar(select(SendRecord).where(SendRecord.contact_id == contact))
            assert rec is not None
            rec.message_id, rec.state = mid, "delivered"
            s.add(Event(tenant_id=tid, ts=T0, type="delivered", message_id=mid,
                        recipient_id=f"{mid}.0", recipient=rec.email, tags="",
                        detail={"mx": mx, "ip": "127.0.0.1", "tls": False}))  # fmt: skip
            ids.append(mid)
        await s.commit()
    return ids


async def hit(api: ControlApi, tid: int, cid: int, contact: int | None, mid: str | None,
              kind: str, after: float, ua: str = CHROME, **kw: Any) -> None:  # fmt: skip
    row = {"tenant_id": tid, "kind": kind, "campaign_id": cid, "contact_id": contact,
           "message_id": mid, "link_index": 0, "url": "https://shop.example/" if kind == "click"
           else None, "at": T0 + dt.timedelta(seconds=after), "method": "GET",
           "ip": "198.51.100.7", "user_agent": ua, "ranged": False, "reason": ""} | kw  # fmt: skip
    await api.app.control.hits.add(row)


async def judged_events(api: ControlApi, tid: int) -> list[tuple[str, str, bool, str]]:
    async with api.app.control.sessions() as s:
        rows = await s.execute(
            select(Event.type, Event.message_id, Event.detail)
            .where(Event.tenant_id == tid, Event.type.in_(("opened", "clicked")))
            .order_by(Event.id)
        )
        return [(t, m, d["machine"], d["reason"]) for t, m, d in rows.all()]


async def test_people_and_machines_are_told_apart(control: ControlFactory) -> None:
    api = await control()
    key = await api.tenant("acme")
    tid = await tenant_id(api, key)
    cid, contacts = await campaign_with_records(
        api, tid, ["ann@inbox.test", "bob@inbox.test", "cat@corp.test"]
    )
    ann, bob, cat = contacts
    m_ann, m_bob = await seed(api, tid, cid, [ann, bob])
    (m_cat,) = await seed(api, tid, cid, [cat], mx="corp-test.mail.protection.outlook.com")
    await hit(api, tid, cid, ann, m_ann, "open", 3600)  # a person, an hour later
    await hit(api, tid, cid, ann, m_ann, "click", 3700)
    await hit(api, tid, cid, bob, m_bob, "open", 30, ua="Mozilla/5.0")  # Apple's proxy
    await hit(api, tid, cid, cat, m_cat, "click", 20)  # a gateway's scanner
    await hit(api, tid, cid, None, None, "open", 50)  # anonymous
    plane = api.app.control
    assert plane.verdicts is not None
    settle = plane.verdicts.settle
    # Ann's click has not settled yet: the rest has (her open, with her click known).
    assert await plane.verdicts.run_once(T0 + dt.timedelta(seconds=3700 + settle - 1)) == 4
    assert sorted(await judged_events(api, tid)) == [
        ("clicked", m_cat, True, "gateway-mx-click"),
        ("opened", "", False, "person"),
        ("opened", m_ann, False, "person"),
        ("opened", m_bob, True, "apple-mpp-proxy"),
    ]
    later = T0 + dt.timedelta(seconds=3700 + settle + 1)
    assert await plane.verdicts.run_once(later) == 1
    assert await plane.verdicts.run_once(later) == 0  # each hit once
    got = await judged_events(api, tid)
    assert len(got) == 5 and got[-1] == ("clicked", m_ann, False, "person")
    async with plane.sessions() as s:
        recs = {r.contact_id: r for r in (await s.execute(select(SendRecord))).scalars()}
        hits = list((await s.execute(select(TrackingHit))).scalars())
    assert recs[ann].opened_at is not None and recs[ann].clicked_at is not None
    assert recs[ann].clicked_at - recs[ann].opened_at == dt.timedelta(seconds=100)
    assert recs[bob].opened_at is None and recs[cat].clicked_at is None  # machines
    assert all(h.judged_at is not None and h.reason for h in hits)
    assert api.app.metrics.tracking_verdicts.labels("click", "machine")._value.get() == 1
    async with api.client(key) as c:
        r = await c.get("/v1/events", params={"type": "clicked"})
        assert r.status_code == 200, r.text
        assert sorted((e["recipient"], e["detail"]["machine"]) for e in r.json()["data"]) == [
            ("ann@inbox.test", False),
            ("cat@corp.test", True),
        ]
