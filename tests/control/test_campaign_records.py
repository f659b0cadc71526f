"""A launch's send records (store.campaigns): one per member of the snapshot, in
batches that resume where they stopped and change nothing when written twice;
contacts not active or with a suppression in force are `suppressed` with the reason,
an expired suppression does not count, and contacts that join later get none."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import select

from postwarden.store.audience_models import Audience
from postwarden.store.campaign_models import Campaign, SendRecord
from postwarden.store.campaigns import record_counts, snapshot_audience, write_records
from postwarden.store.contacts import ContactIn, upsert_contacts
from postwarden.store.models import Suppression, utcnow
from postwarden.store.template_models import Template
from tests.control.conftest import ControlFactory


async def test_records_resume_skip_nobody_and_say_why(control: ControlFactory) -> None:
    api = await control()
    key = await api.tenant("acme")
    async with api.client(key) as c:
        tid = int((await c.get("/v1/keys")).json()["data"][0]["tenant_id"])
    other = await api.tenant("other")
    async with api.client(other) as c:
        other_tid = int((await c.get("/v1/keys")).json()["data"][0]["tenant_id"])
    async with api.app.control.sessions() as s:
        people = [ContactIn(f"p{i}@inbox.test") for i in range(7)]
        people.append(ContactIn("gone@inbox.test", status="unsubscribed"))
        await upsert_contacts(s, tid, people)
        # The same address at another tenant, suppressed there: not this tenant's.
        await upsert_contacts(s, other_tid, [ContactIn("p0@inbox.test")])
        past = utcnow() - dt.timedelta(days=1)
        s.add_all([
            # In force, though the contact's status was never told (a race).
            Suppression(tenant_id=tid, address="p1@inbox.test", reason="manual"),
            Suppression(tenant_id=tid, address="p2@inbox.test", reason="hard_bounce",
                        expires_at=past),  # expired: no longer counts
            Suppression(tenant_id=other_tid, address="p0@inbox.test", reason="complaint"),
        ])  # fmt: skip
        aud = Audience(tenant_id=tid, name="all",
                       rule='status in ["active", "unsubscribed"]')  # fmt: skip
        tpl = Template(tenant_id=tid, name="t", category="marketing")
        s.add_all([aud, tpl])
        await s.flush()
        camp = Campaign(tenant_id=tid, name="c", audience_id=aud.id, template_id=tpl.id,
                        from_email="news@acme.test", state="sending")  # fmt: skip
        s.add(camp)
        await s.flush()
        snap = await snapshot_audience(s, camp)
        assert await snapshot_audience(s, camp) == snap  # taken once
        await s.commit()
        cid = camp.id
    # Joins after the snapshot: not a recipient.
    async with api.app.control.sessions() as s:
        await upsert_contacts(s, tid, [ContactIn("late@inbox.test")])
        await s.commit()
    written = []
    while True:
        async with api.app.control.sessions() as s:
            camp = await s.get(Campaign, cid)
            n = await write_records(s, camp, batch=3)
            await s.commit()
        written.append(n)
        if n == 0:
            break
    assert written == [3, 3, 2, 0]
    # Written again from scratch (a crash before the cursor moved): nothing doubles.
    async with api.app.control.sessions() as s:
        camp = await s.get(Campaign, cid)
        assert await write_records(s, camp, batch=100) == 0
        rows = (
            await s.execute(
                select(SendRecord.email, SendRecord.state, SendRecord.reason)
                .where(SendRecord.campaign_id == cid)
                .order_by(SendRecord.contact_id)
            )
        ).all()
        counts = await record_counts(s, cid)
    got = {email: (state, reason) for email, state, reason in rows}
    assert len(rows) == 8 and "late@inbox.test" not in got
    assert got["p0@inbox.test"] == ("pending", "")  # the other tenant's suppression
    assert got["p1@inbox.test"] == ("suppressed", "manual")
    assert got["p2@inbox.test"] == ("pending", "")  # expired
    assert got["gone@inbox.test"] == ("suppressed", "unsubscribed")
    assert counts == {"pending": 6, "suppressed": 2}
    async with api.client(key) as c:
        stats = (await c.get(f"/v1/campaigns/{cid}/stats")).json()
    assert (stats["recipients"], stats["suppressed"], stats["pending"]) == (8, 2, 6), stats
    assert stats["queued"] == stats["delivered"] == stats["bounced"] == 0
    async with api.client(other) as c:
        assert (await c.get(f"/v1/campaigns/{cid}/stats")).status_code == 404
