"""SMTP submission as a tenant: AUTH with an API key, the verified-domain rule, and
suppressed recipients dropped (at acceptance, and before a retry)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiosmtplib
import pytest

from postwarden.queue.admin import QueueAdmin
from tests.control.conftest import ControlApi, ControlFactory, domain_in_force
from tests.waiting import eventually


def events(api: ControlApi, msg_id: str) -> list[dict[str, Any]]:
    admin = QueueAdmin(api.app.cfg.spool.path)
    try:
        return admin.events(msg_id=msg_id, limit=1000)
    finally:
        admin.close()


async def wait_events(api: ControlApi, msg_id: str, want: list[str], timeout: float = 10) -> list:  # type: ignore[type-arg]
    deadline = time.monotonic() + timeout
    while True:
        evs = events(api, msg_id)
        types = [e["type"] for e in evs]
        if all(types.count(t) >= want.count(t) for t in want):
            return evs
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out; events: {types}")
        await asyncio.sleep(0.05)


async def submit(api: ControlApi, login: str, password: str, sender: str, rcpts: list[str]) -> str:
    host, port = api.app.smtp_addresses[0]
    msg = (
        f"From: Shop <{sender}>\r\nTo: {', '.join(rcpts)}\r\nSubject: order\r\n\r\nthanks\r\n"
    ).encode()
    async with aiosmtplib.SMTP(hostname=host, port=port, start_tls=False) as smtp:
        await smtp.login(login, password)
        _, resp = await smtp.sendmail(sender, rcpts, msg)
    return resp.rsplit(" ", 1)[-1]


# SMTP AUTH and the domain rule: the keys are read as on any database.
@pytest.mark.sqlite_only
async def test_auth_with_api_key_and_verified_domain_rule(control: ControlFactory) -> None:
    api = await control()
    api.lab.add_domain("inbox.test")
    key = await api.tenant("acme")
    reader = await api.tenant("other", scopes=("read",))
    # Wrong tenant name, a key without `send`, a made-up key: all refused.
    for login, password in (("nobody", key), ("other", reader), ("acme", key[:-2] + "zz")):
        with pytest.raises(aiosmtplib.SMTPAuthenticationError):
            await submit(api, login, password, "a@acme.test", ["u@inbox.test"])
    # Right credentials, but acme.test is not (yet) a verified domain of acme.
    with pytest.raises(aiosmtplib.SMTPDataError) as exc:
        await submit(api, "acme", key, "a@acme.test", ["u@inbox.test"])
    assert exc.value.code == 550 and "5.7.1" in exc.value.message
    await api.verified_domain(key, "acme.test")
    await domain_in_force(api, "acme.test")
    msg_id = await submit(api, "acme", key, "a@acme.test", ["u@inbox.test"])
    evs = await wait_events(api, msg_id, ["accepted", "delivered"])
    accepted = evs[0]
    assert accepted["detail"]["auth"] == "acme" and accepted["detail"]["tenant"]
    got = await api.lab.wait_for_messages(1)
    assert b"DKIM-Signature:" in got[0].data and b"d=acme.test" in got[0].data
    # The API follows mail the tenant submitted over SMTP as well.
    async with api.client(key) as c:
        for _ in range(100):
            r = await c.get(f"/v1/messages/{msg_id}")
            if r.status_code == 200 and r.json()["recipients"][0]["state"] == "delivered":
                break
            await asyncio.sleep(0.1)
        m = r.json()
        assert m["source"] == "smtp" and m["mail_from"] == "a@acme.test"
        assert [e["type"] for e in m["events"]] == ["accepted", "delivered"]
        # …and the key's last use is on record.
        assert (await c.get("/v1/keys")).json()["data"][0]["last_used_at"] is not None


async def test_suppressed_recipient_is_dropped_at_acceptance(control: ControlFactory) -> None:
    api = await control({"control": {"require_verified_domains": False}})
    api.lab.add_domain("inbox.test")
    key = await api.tenant("acme")
    async with api.client(key) as c:
        r = await c.post(
            "/v1/suppressions", json={"address": "Gone@Inbox.test", "reason": "hard_bounce"}
        )
        assert r.status_code == 201
        tid = (await c.get("/v1/keys")).json()["data"][0]["tenant_id"]
    # SMTP acceptance asks the process's suppression cache, which follows the change feed.
    check = api.app.control.suppressions.check
    await eventually(lambda: check(tid, "gone@inbox.test"), 10, "gone@ in the cache")
    msg_id = await submit(api, "acme", key, "a@acme.test", ["ok@inbox.test", "gone@inbox.test"])
    evs = await wait_events(api, msg_id, ["accepted", "accepted", "dropped", "delivered"])
    dropped = [e for e in evs if e["type"] == "dropped"]
    assert [e["rcpt"] for e in dropped] == ["gone@inbox.test"]
    assert dropped[0]["detail"] == {"reason": "hard_bounce", "stage": "acceptance"}
    got = await api.lab.wait_for_messages(1)
    await asyncio.sleep(0.3)  # a window for a wrong copy to gone@ to arrive (none should)
    assert len(api.lab.messages) == 1 and got[0].rcpt_tos == ["ok@inbox.test"]
    # Mail from a trusted network without AUTH has no tenant, hence no tenant list.
    host, port = api.app.smtp_addresses[0]
    async with aiosmtplib.SMTP(hostname=host, port=port, start_tls=False) as smtp:
        await smtp.sendmail("a@relay.test", ["gone@inbox.test"], b"Subject: x\r\n\r\nx\r\n")
    await api.lab.wait_for_messages(2)


async def test_address_suppressed_while_queued_is_dropped_before_retry(
    control: ControlFactory,
) -> None:
    api = await control(
        {
            "control": {"require_verified_domains": False},
            "queue": {"retry_initial": "1s", "retry_max": "1s"},
        }
    )
    api.lab.add_domain("slow.test", behaviour="tempfail")
    key = await api.tenant("acme")
    msg_id = await submit(api, "acme", key, "a@acme.test", ["late@slow.test"])
    await wait_events(api, msg_id, ["accepted", "deferred"])
    async with api.client(key) as c:
        r = await c.post(
            "/v1/suppressions", json={"address": "late@slow.test", "reason": "unsubscribe"}
        )
        assert r.status_code == 201
    api.lab.set_behaviour("slow.test", "accept")
    evs = await wait_events(api, msg_id, ["dropped"])
    assert evs[-1]["type"] == "dropped"
    assert evs[-1]["detail"] == {"reason": "unsubscribe", "stage": "delivery"}
    # Nothing should happen, so nothing to wait for: longer than the retry interval
    # (1 s), in which a wrong retry would deliver or be deferred again.
    await asyncio.sleep(1.5)
    assert not api.lab.messages
    # Nothing after the drop. (Before it, a retry that began while the suppression was
    # being added may have been deferred once more: on a loaded machine the POST can
    # take longer than the 1 s retry interval.)
    kinds = [e["type"] for e in events(api, msg_id)]
    assert kinds[-1] == "dropped" and kinds.count("dropped") == 1, kinds
    assert set(kinds) == {"accepted", "deferred", "dropped"}, kinds


@pytest.mark.sqlite_only  # HTTP/SMTP-level: see tests/control/conftest.py
async def test_multi_mailbox_from_and_overlong_paths_are_refused(control: ControlFactory) -> None:
    api = await control()
    api.lab.add_domain("inbox.test")
    key = await api.tenant("acme")
    await api.verified_domain(key, "acme.test")
    await domain_in_force(api, "acme.test")
    host, port = api.app.smtp_addresses[0]
    async with aiosmtplib.SMTP(hostname=host, port=port, start_tls=False) as smtp:
        await smtp.login("acme", key)
        # A From whose first mailbox is someone else's, the tenant's last: refused.
        msg = b"From: ceo@victim.test, me@acme.test\r\nSubject: x\r\n\r\nx\r\n"
        with pytest.raises(aiosmtplib.SMTPDataError) as exc:
            await smtp.sendmail("me@acme.test", ["u@inbox.test"], msg)
        assert exc.value.code == 550
        await smtp.rset()
        # RFC 5321 4.5.3.1.3: a path is at most 256 octets.
        with pytest.raises(aiosmtplib.SMTPRecipientsRefused):
            await smtp.sendmail(
                "me@acme.test", ["u" * 250 + "@inbox.test"], b"Subject: x\r\n\r\nx\r\n"
            )
    await asyncio.sleep(0.3)  # a window for a wrongly accepted message to arrive (none should)
    assert not api.lab.messages
