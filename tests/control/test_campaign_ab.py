"""A campaign's A/B test end to end: the test portion gets its variants (a subject
line tried against the template's), the rest waits; conversions reported through
the API decide it once its time comes, and the rest then gets the winner. A test with
no clear result declares no winner: the remainder waits until a key with the approve
scope chooses, and the history says it was the key's choice, not the test's."""

from __future__ import annotations

import collections
import datetime as dt
import email
import email.policy
from typing import Any

import httpx
import pytest
from sqlalchemy import update

from postwarden.store.campaign_models import Campaign
from tests.control.conftest import ControlApi, ControlFactory
from tests.control.test_campaign_send import FAST, approved_campaign, runner, stats_when
from tests.control.test_campaigns import act, operator_made_key, tenant_id
from tests.control.test_messages import ready_tenant
from tests.waiting import eventually

PEOPLE = [{"email": f"ab{i}@inbox.test", "name": f"N{i}"} for i in range(60)]


def ab(winner_by: str) -> dict[str, Any]:
    return {
        "variants": [{"name": "A"}, {"name": "B", "subject": "Last chance, {{ contact.name }}"}],
        "portion": 0.5, "metric": "conversions", "min_sample": 5, "winner_by": winner_by,
        "wait_hours": 1,
    }  # fmt: skip


async def records(c: httpx.AsyncClient, cid: int, **params: Any) -> list[dict[str, Any]]:
    r = await c.get(f"/v1/campaigns/{cid}/records", params={"limit": 1000, **params})
    assert r.status_code == 200, r.text
    return list(r.json()["data"])


async def launch_the_test(api: ControlApi, c: httpx.AsyncClient, cid: int) -> dict[str, Any]:
    """Launch and wait until the test portion is delivered and the rest waits; then
    let the test's hour pass (in the store) so that the next look decides it."""
    assert (await act(c, cid, "schedule")).status_code == 200

    def portion_done(s: dict[str, Any]) -> bool:
        return s["waiting"] > 0 and s["delivered"] + s["waiting"] == len(PEOPLE)

    stats = await stats_when(c, cid, portion_done)
    r = await c.get(f"/v1/campaigns/{cid}")
    assert r.json()["ab"].get("winner") is None
    return stats


async def let_the_hour_pass(api: ControlApi, cid: int) -> None:
    async def decide_at() -> bool:
        async with api.app.control.sessions() as s:
            row = await s.get(Campaign, cid)
            return bool(row and "decide_at" in (row.ab or {}))

    runner(api).wake()

    await eventually(decide_at, 15, "the test's decision time set")
    async with api.app.control.sessions() as s:
        row = await s.get(Campaign, cid)
        passed = (dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)).isoformat()
        await s.execute(
            update(Campaign).where(Campaign.id == cid).values(ab={**row.ab, "decide_at": passed})
        )
        await s.commit()
    runner(api).wake()


async def test_the_winner_goes_to_the_rest(control: ControlFactory) -> None:
    api = await control(FAST)
    api.lab.add_domain("inbox.test")
    key = await ready_tenant(api)
    async with api.client(key) as c:
        cid = await approved_campaign(api, c, PEOPLE, ab=ab("auto"))
        stats = await launch_the_test(api, c, cid)
        sent = await records(c, cid, state="delivered")
        arms = collections.Counter(r["variant"] for r in sent)
        assert set(arms) == {"A", "B"} and min(arms.values()) >= 5, arms
        # Everyone who got B converts (by contact or by message id), nobody with A.
        for i, r in enumerate(x for x in sent if x["variant"] == "B"):
            body = {"contact_id": r["contact_id"]} if i % 2 else {"message_id": r["message_id"]}
            got = await c.post(f"/v1/campaigns/{cid}/conversions", json=body)
            assert got.status_code == 200 and got.json()["variant"] == "B", got.text
        r = await c.post(f"/v1/campaigns/{cid}/conversions", json={"contact_id": 999999})
        assert r.status_code == 404, r.text
        r = (await c.get(f"/v1/campaigns/{cid}/ab")).json()
        assert r["verdict"]["winner"] == "B" and r["waiting_for_winner"] == stats["waiting"], r
        await let_the_hour_pass(api, cid)
        final = await stats_when(c, cid, lambda s: s["state"] == "sent")
        assert final["delivered"] == len(PEOPLE), final
        camp = (await c.get(f"/v1/campaigns/{cid}")).json()
        assert (camp["ab"]["winner"], camp["ab"]["decided_by"]) == ("B", "test"), camp
        history = (await c.get(f"/v1/campaigns/{cid}/history")).json()["data"]
        step = next(h for h in history if h["action"] == "ab_winner")
        assert step["key_prefix"] is None and step["reason"].startswith("the test: winner"), step
    test_ids = {r["email"] for r in sent}
    for m in api.lab.messages:
        rcpt = m.rcpt_tos[0]
        subject = email.message_from_bytes(m.data, policy=email.policy.default)["Subject"]
        if rcpt not in test_ids:  # the rest: the winner's subject line
            assert subject.startswith("Last chance"), (rcpt, subject)


@pytest.mark.sqlite_only
async def test_no_clear_result_waits_for_a_key(control: ControlFactory) -> None:
    api = await control(FAST)
    api.lab.add_domain("inbox.test")
    key = await ready_tenant(api)
    async with api.client(key) as c:
        cid = await approved_campaign(api, c, PEOPLE, ab=ab("approval"))
        await launch_the_test(api, c, cid)
        await let_the_hour_pass(api, cid)

        async def verdict_stored() -> bool:
            camp = (await c.get(f"/v1/campaigns/{cid}")).json()
            return "verdict" in camp["ab"]

        await eventually(verdict_stored, 15, "the test's verdict")
        camp = (await c.get(f"/v1/campaigns/{cid}")).json()
        assert camp["ab"]["verdict"]["winner"] is None and "winner" not in camp["ab"], camp
        approver = await operator_made_key(api, await tenant_id(c), ["approve", "read"])
        async with api.client(approver) as a:
            r = await a.post(f"/v1/campaigns/{cid}/ab/winner", json={})
            assert r.status_code == 409 and "no winner" in r.text, r.text
            r = await a.post(f"/v1/campaigns/{cid}/ab/winner", json={"variant": "C"})
            assert r.status_code == 422, r.text
            r = await a.post(f"/v1/campaigns/{cid}/ab/winner",
                             json={"variant": "A", "reason": "keep the usual subject"})  # fmt: skip
            assert r.status_code == 200, r.text
            r = await a.post(f"/v1/campaigns/{cid}/ab/winner", json={"variant": "B"})
            assert r.status_code == 409, r.text
        final = await stats_when(c, cid, lambda s: s["state"] == "sent")
        assert final["delivered"] == len(PEOPLE), final
        history = (await c.get(f"/v1/campaigns/{cid}/history")).json()["data"]
        step = next(h for h in history if h["action"] == "ab_winner")
        assert step["key_prefix"] is not None and "chosen by the key" in step["reason"], step
