"""Bounces and complaints end to end in the lab (issue 8's "done when").

One message from a tenant's verified domain goes to three recipients:

* ``gone@nouser.test`` is refused with ``550 5.1.1`` during delivery;
* ``later@inbox.test`` is accepted, and later a DSN comes back to its return path;
* ``fbl@inbox.test`` is accepted, and later an ARF complaint comes back.

Each ends with the right event, category and suppression; a DSN with a forged token is
believed for nothing and kept as unparsed; the inbound MX refuses to relay; and the
suppressed addresses are never sent to again.
"""

from __future__ import annotations

import asyncio
import time
from email.utils import formatdate
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest

from postwarden.bounces.verp import ReturnPaths
from tests.conftest import config_cli, free_port
from tests.control.conftest import ControlApi, ControlFactory
from tests.control.test_messages import ready_tenant
from tests.waiting import eventually


def postfix_dsn(rcpt: str, return_path: str, original: bytes) -> bytes:
    """A DSN as Debian's Postfix writes one when a remote MX refuses after accepting."""
    headers = original.split(b"\r\n\r\n", 1)[0].decode()
    return (
        "From: MAILER-DAEMON@mx.inbox.test (Mail Delivery System)\r\n"
        f"To: {return_path}\r\n"
        "Subject: Undelivered Mail Returned to Sender\r\n"
        f"Date: {formatdate()}\r\n"
        "Auto-Submitted: auto-replied\r\n"
        "MIME-Version: 1.0\r\n"
        'Content-Type: multipart/report; report-type=delivery-status;\r\n\tboundary="B1"\r\n'
        "\r\n--B1\r\nContent-Description: Notification\r\nContent-Type: text/plain\r\n\r\n"
        "This is the mail system at host mx.inbox.test.\r\n\r\n"
        "I'm sorry to have to inform you that your message could not\r\n"
        "be delivered to one or more recipients. It's attached below.\r\n\r\n"
        f"<{rcpt}>: host store.inbox.test[192.0.2.9] said: 550 5.1.1\r\n"
        f"    <{rcpt}>: Recipient address rejected: User unknown in virtual mailbox\r\n"
        "    table (in reply to RCPT TO command)\r\n"
        "\r\n--B1\r\nContent-Description: Delivery report\r\n"
        "Content-Type: message/delivery-status\r\n\r\n"
        "Reporting-MTA: dns; mx.inbox.test\r\nArrival-Date: " + formatdate() + "\r\n\r\n"
        f"Final-Recipient: rfc822; {rcpt}\r\nOriginal-Recipient: rfc822;{rcpt}\r\n"
        "Action: failed\r\nStatus: 5.1.1\r\nRemote-MTA: dns; store.inbox.test\r\n"
        f"Diagnostic-Code: smtp; 550 5.1.1 <{rcpt}>: Recipient address rejected: User\r\n"
        "    unknown in virtual mailbox table\r\n"
        "\r\n--B1\r\nContent-Description: Undelivered Message Headers\r\n"
        "Content-Type: text/rfc822-headers\r\n\r\n" + headers + "\r\n\r\n--B1--\r\n"
    ).encode()


def arf_report(return_path: str, original: bytes) -> bytes:
    """An RFC 5965 abuse report as a mailbox provider's feedback loop sends one."""
    return (
        (
            "From: staff@fbl.inbox.test\r\nTo: fbl@pwb.acme.test\r\n"
            "Subject: FW: your message\r\nMIME-Version: 1.0\r\n"
            f"Date: {formatdate()}\r\n"
            'Content-Type: multipart/report; report-type=feedback-report;\r\n\tboundary="F1"\r\n'
            "\r\n--F1\r\nContent-Type: text/plain\r\n\r\n"
            "This is an email abuse report for an email message received from IP 127.0.2.1\r\n"
            "\r\n--F1\r\nContent-Type: message/feedback-report\r\n\r\n"
            "Feedback-Type: abuse\r\nUser-Agent: InboxFBL/1.0\r\nVersion: 1\r\n"
            f"Original-Mail-From: <{return_path}>\r\n"
            "Source-IP: 127.0.2.1\r\nReported-Domain: acme.test\r\n"
            "\r\n--F1\r\nContent-Type: message/rfc822\r\nContent-Disposition: inline\r\n\r\n"
        ).encode()
        + original
        + b"\r\n--F1--\r\n"
    )


async def settled(api: ControlApi, key: str, msg_id: str, n: int) -> dict[str, Any]:
    async with api.client(key) as c:
        for _ in range(200):
            m = (await c.get(f"/v1/messages/{msg_id}")).json()
            done = [r for r in m["recipients"] if r["state"] not in ("queued", "deferred")]
            if len(done) == n:
                return dict(m)
            await asyncio.sleep(0.1)
    raise AssertionError(f"message {msg_id} did not settle: {m}")


async def suppression(api: ControlApi, key: str, address: str, wait: float = 15.0) -> Any:
    async with api.client(key) as c:
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            r = await c.get(f"/v1/suppressions/{address}")
            if r.status_code == 200:
                return r.json()
            await asyncio.sleep(0.1)
    return None


async def send_report(port: int, rcpt: str, data: bytes) -> None:
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False) as smtp:
        await smtp.sendmail("", [rcpt], data)


async def test_sync_dsn_and_arf_end_with_events_and_suppressions(
    control: ControlFactory, tmp_path: Path
) -> None:
    port = free_port()
    api = await control({"inbound": {"listen": [f"127.0.0.1:{port}"]}})
    api.lab.add_domain("inbox.test")
    api.lab.add_domain("nouser.test", behaviour="reject")
    key = await ready_tenant(api)
    async with api.client(key) as c:
        r = await c.post(
            "/v1/messages",
            json={
                "from": "news@acme.test",
                "to": ["gone@nouser.test", "later@inbox.test", "fbl@inbox.test"],
                "subject": "Spring sale",
                "text": "Hello",
            },
        )
        assert r.status_code in (200, 201, 202), r.text
        msg_id = r.json()["id"]
    await settled(api, key, msg_id, 3)
    copies = {x.rcpt_tos[0]: x for x in api.lab.messages if x.rcpt_tos[0].endswith("@inbox.test")}
    assert set(copies) == {"later@inbox.test", "fbl@inbox.test"}
    paths = ReturnPaths.from_config(api.app.cfg)
    for addr, copy in copies.items():
        token = paths.decode(copy.mail_from)
        assert token is not None and token.msg_id == msg_id and token.domain == "acme.test", addr

    # 1. Refused during delivery: the event carries the classifier's verdict.
    hard = await suppression(api, key, "gone@nouser.test")
    assert hard is not None and hard["reason"] == "hard_bounce"

    # 2. Accepted, then a DSN to the return path.
    later = copies["later@inbox.test"]
    await send_report(
        port, later.mail_from, postfix_dsn("later@inbox.test", later.mail_from, later.data)
    )
    got = await suppression(api, key, "later@inbox.test")
    assert got is not None and got["reason"] == "hard_bounce" and got["source"] == "bounces"

    # 3. A complaint through ARF.
    fbl = copies["fbl@inbox.test"]
    await send_report(port, "fbl@pwb.acme.test", arf_report(fbl.mail_from, fbl.data))
    got = await suppression(api, key, "fbl@inbox.test")
    assert got is not None and got["reason"] == "complaint"

    async with api.client(key) as c:
        m = (await c.get(f"/v1/messages/{msg_id}")).json()
    state = {r["email"]: r["state"] for r in m["recipients"]}
    assert state == {
        "gone@nouser.test": "bounced",
        "later@inbox.test": "bounced",
        "fbl@inbox.test": "delivered",
    }
    events = [(e["type"], e.get("recipient"), e["detail"]) for e in m["events"]]
    sync = [d for t, r, d in events if t == "bounced" and r == "gone@nouser.test"]
    assert sync and sync[0]["category"] == "user_unknown" and sync[0]["hard"] is True
    assert sync[0]["response"].startswith("550 5.1.1")
    late = [d for t, r, d in events if t == "bounced" and r == "later@inbox.test"]
    assert len(late) == 1 and late[0]["async"] is True
    assert (late[0]["category"], late[0]["hard"], late[0]["status"]) == (
        "user_unknown",
        True,
        "5.1.1",
    )
    assert late[0]["remote_mta"] == "store.inbox.test"
    complaint = [d for t, r, d in events if t == "complained" and r == "fbl@inbox.test"]
    assert len(complaint) == 1 and complaint[0]["feedback_type"] == "abuse"

    # Both reports counted for the warming health of the source and sending domain that
    # sent the message (the broker's health windows, as deliveries are).
    shaping = api.app.shaping
    assert shaping is not None
    for health_key in ("domain:acme.test", "source:default"):
        totals = shaping.book.windows[health_key].totals(shaping.book.wall())
        assert totals["bounced"] >= 2 and totals["complained"] == 1, (health_key, totals)

    # A report with a forged token is believed for nothing and kept for inspection.
    before = api.app.metrics.return_path_tokens.labels("forged")._value.get()
    forged = later.mail_from.replace(later.mail_from.split("-")[3][:10], "aaaaaaaaaa")
    assert paths.decode(forged) is None
    unparsed = api.app.inbox.unparsed_count() if api.app.inbox else -1
    await send_report(port, forged, postfix_dsn("ann@inbox.test", forged, later.data))
    for _ in range(100):
        if api.app.inbox and api.app.inbox.unparsed_count() == unparsed + 1:
            break
        await asyncio.sleep(0.1)
    assert api.app.inbox is not None and api.app.inbox.unparsed_count() == unparsed + 1
    assert api.app.metrics.return_path_tokens.labels("forged")._value.get() > before
    assert await suppression(api, key, "ann@inbox.test", wait=0.5) is None

    # The operator sees it, reads it, and can queue it again.
    cfg_file = tmp_path / "postwarden.toml"
    cfg_file.write_text(f'[inbound]\npath = "{api.app.cfg.inbound_path}"\n')
    rc, out = await config_cli(cfg_file, "bounces", "unparsed")
    assert rc == 0 and "forged return-path token" in out, out
    rid = out.split()[0]
    rc, out = await config_cli(cfg_file, "bounces", "show", rid)
    assert rc == 0 and "Undelivered Mail Returned to Sender" in out
    rc, out = await config_cli(cfg_file, "bounces", "retry", rid)
    assert rc == 0 and "1 report(s) queued again" in out
    for _ in range(100):  # processed again: still forged, so unparsed again
        if api.app.inbox.unparsed_count() == unparsed + 1 and api.app.inbox.pending() == 0:
            break
        await asyncio.sleep(0.1)
    assert [i.id for i in api.app.inbox.list_unparsed()][-1] == rid

    # No relay: the inbound MX refuses any other domain, whoever asks.
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False) as smtp:
        await smtp.mail("")
        with pytest.raises(aiosmtplib.SMTPRecipientRefused) as exc:
            await smtp.rcpt("someone@gmail.com")
        assert exc.value.code == 550 and "5.7.1" in exc.value.message

    # The suppressed addresses are never sent to again.
    n = len(api.lab.messages)
    async with api.client(key) as c:
        r = await c.post(
            "/v1/messages",
            json={
                "from": "news@acme.test",
                "to": ["later@inbox.test", "fbl@inbox.test"],
                "subject": "again",
                "text": "x",
            },
        )
        assert r.status_code in (200, 201, 202), r.text
    again = await settled(api, key, r.json()["id"], 2)
    states = {x["email"]: (x["state"], x.get("last_response")) for x in again["recipients"]}
    assert states == {
        "later@inbox.test": ("dropped", "hard_bounce"),
        "fbl@inbox.test": ("dropped", "complaint"),
    }, states
    await asyncio.sleep(0.5)  # a window for a wrongly sent copy to arrive (none should)
    assert len(api.lab.messages) == n


async def test_dsn_to_the_sender_when_the_tenant_wants_one(control: ControlFactory) -> None:
    """settings.bounce_notifications: an RFC 3464 DSN from the null sender reaches the
    application's envelope sender, and says what happened to whom."""
    from postwarden.bounces.parse import Parser

    api = await control()
    api.lab.add_domain("nouser.test", behaviour="reject")
    key = await ready_tenant(api)
    api.lab.add_domain("acme.test")  # where the sender's own mail (the DSN) goes
    async with api.client(api.admin_key) as c:
        tenants = (await c.get("/v1/tenants")).json()["data"]
        tid = next(t["id"] for t in tenants if t["name"] == "acme")
        r = await c.patch(f"/v1/tenants/{tid}", json={"settings": {"bounce_notifications": True}})
        assert r.status_code == 200, r.text
    # The process's set of tenants that want DSNs follows the change feed.
    await eventually(
        lambda: tid in api.app.control.pool_cache.notify_tenants, 10, "the tenant's setting"
    )
    async with api.client(key) as c:
        r = await c.post(
            "/v1/messages",
            json={"from": "app@acme.test", "to": ["gone@nouser.test"], "subject": "Receipt",
                  "text": "x"},
        )  # fmt: skip
        assert r.status_code in (200, 201, 202), r.text
        msg_id = r.json()["id"]
    dsn = None
    for _ in range(150):
        dsn = next((x for x in api.lab.messages if x.rcpt_tos == ["app@acme.test"]), None)
        if dsn is not None:
            break
        await asyncio.sleep(0.1)
    assert dsn is not None and dsn.mail_from == ""
    report = Parser().parse_bytes(dsn.data)
    assert report.kind == "dsn"
    [f] = report.findings
    assert (f.recipient, f.status, f.action, f.reason, f.hard) == (
        "gone@nouser.test", "5.1.1", "failed", "user_unknown", True,
    )  # fmt: skip
    assert b"Subject: Receipt" in dsn.data  # the original headers ride along
    assert msg_id.encode() in dsn.data


async def test_a_report_without_a_token_counts_only_for_a_one_recipient_message(
    control: ControlFactory,
) -> None:
    """A feedback loop that strips the return path leaves only our Message-ID (or, for
    mail submitted over SMTP, our Received line). That names the message, not whose copy
    it was: every recipient holds such a copy and sees
    the others, so only a message with a single recipient is believed."""
    port = free_port()
    api = await control({"inbound": {"listen": [f"127.0.0.1:{port}"]}})
    api.lab.add_domain("inbox.test")
    key = await ready_tenant(api)
    ids = {}
    async with api.client(key) as c:
        for name, to in (("solo", ["solo@inbox.test"]), ("pair", ["a@inbox.test", "b@inbox.test"])):
            r = await c.post(
                "/v1/messages",
                json={"from": "news@acme.test", "to": to, "subject": name, "text": "x"},
            )
            assert r.status_code in (200, 201, 202), r.text
            ids[name] = r.json()["id"]
    await settled(api, key, ids["solo"], 1)
    await settled(api, key, ids["pair"], 2)
    copies = {x.rcpt_tos[0]: x.data for x in api.lab.messages}
    for name, data in copies.items():  # no return path in what a feedback loop passes on
        assert b"b-" + ids["solo"].encode() not in data, name
        assert b"b-" + ids["pair"].encode() not in data, name

    await send_report(port, "fbl@pwb.acme.test", arf_report("", copies["solo@inbox.test"]))
    got = await suppression(api, key, "solo@inbox.test")
    assert got is not None and got["reason"] == "complaint"

    # b's copy cannot complain for a (nor for b): it is set aside with the reason.
    assert api.app.inbox is not None
    unparsed = api.app.inbox.unparsed_count()
    await send_report(port, "fbl@pwb.acme.test", arf_report("", copies["b@inbox.test"]))
    for _ in range(100):
        if api.app.inbox.unparsed_count() == unparsed + 1:
            break
        await asyncio.sleep(0.1)
    assert api.app.inbox.unparsed_count() == unparsed + 1
    [why] = [i.reason for i in api.app.inbox.list_unparsed() if ids["pair"] in (i.reason or "")]
    assert "2 recipients" in why
    for addr in ("a@inbox.test", "b@inbox.test"):
        assert await suppression(api, key, addr, wait=0.3) is None


async def test_reports_that_must_change_nothing(control: ControlFactory) -> None:
    """A not-spam ARF is no complaint; a forged return path poisons the whole report,
    even with a good token quoted inside; a quoted original whose headers do not decode
    is still read, not retried for ever."""
    port = free_port()
    api = await control({"inbound": {"listen": [f"127.0.0.1:{port}"]}})
    api.lab.add_domain("inbox.test")
    key = await ready_tenant(api)
    async with api.client(key) as c:
        r = await c.post(
            "/v1/messages",
            json={"from": "news@acme.test", "to": ["kept@inbox.test"], "subject": "s", "text": "x"},
        )
        assert r.status_code in (200, 201, 202), r.text
        msg_id = r.json()["id"]
    await settled(api, key, msg_id, 1)
    [copy] = [x for x in api.lab.messages if x.rcpt_tos == ["kept@inbox.test"]]
    inbox = api.app.inbox
    assert inbox is not None
    reports = api.app.metrics.inbound_reports

    async def processed(outcome: str, before: float) -> None:
        for _ in range(100):
            if reports.labels(outcome)._value.get() > before and inbox.pending() == 0:
                return
            await asyncio.sleep(0.1)
        raise AssertionError(f"no {outcome} report processed")

    # 1. Feedback that is not a complaint.
    before = reports.labels("feedback")._value.get()
    not_spam = arf_report(copy.mail_from, copy.data).replace(
        b"Feedback-Type: abuse", b"Feedback-Type: not-spam"
    )
    await send_report(port, "fbl@pwb.acme.test", not_spam)
    await processed("feedback", before)

    # 2. Sent to a forged return path, quoting the good one: believed for nothing.
    before = reports.labels("unparsed")._value.get()
    forged = copy.mail_from.replace(copy.mail_from.split("-")[3][:10], "aaaaaaaaaa")
    await send_report(port, forged, arf_report(copy.mail_from, copy.data))
    await processed("unparsed", before)
    assert "forged" in inbox.list_unparsed()[-1].reason

    # 3. A quoted original with a charset no codec knows: read all the same.
    before = reports.labels("complaint")._value.get()
    odd = (
        b"From: news@acme.test\r\nTo: kept@inbox.test\r\n"
        b"Content-Type: text/plain; charset=\xff\r\nContent-Transfer-Encoding: base64\r\n"
        b"\r\n!!!!\xff\r\n"
    )
    await send_report(port, "fbl@pwb.acme.test", arf_report(copy.mail_from, odd))
    await processed("complaint", before)

    async with api.client(key) as c:
        m = (await c.get(f"/v1/messages/{msg_id}")).json()
    assert [e["detail"]["feedback_type"] for e in m["events"] if e["type"] == "complained"] == [
        "abuse"
    ]
    got = await suppression(api, key, "kept@inbox.test")
    assert got is not None and got["reason"] == "complaint"
