"""The inbound MX over real sockets: what it accepts is in the inbox before the 250;
it never relays; size, recipient and session limits; the accepted domains follow the
control plane's change feed; the appliance and the supervisor's workers serve it."""

from __future__ import annotations

import asyncio
import json
import os
import re
import smtplib
import ssl
from collections.abc import Callable
from pathlib import Path

import aiosmtplib
import pytest

from postwarden.bounces import inbox as inbox_mod
from postwarden.bounces.inbox import Inbox
from postwarden.lab import Lab
from postwarden.queue.gauges import update_gauges
from postwarden.store.feed import record_change
from postwarden.store.models import Domain
from tests.conftest import ApplianceFactory, free_port
from tests.inbound.conftest import InboundFactory, InboundMx
from tests.mta.test_submission import raw_session

DSN = (
    b"From: Mail Delivery System <MAILER-DAEMON@mx.example>\r\n"
    b"To: b-abc@pwb.shop.test\r\n"
    b"Subject: Undelivered Mail Returned to Sender\r\n"
    b"\r\n"
    b"This is the mail system at host mx.example.\r\n"
)


def queued_id(reply: str) -> str:
    m = re.search(r"queued as (\S+)", reply)
    assert m, reply
    return m.group(1)


def refused(mx: InboundMx, reason: str) -> float:
    value = mx.app.metrics.inbound_refused.labels(reason)._value.get()
    return float(value)


async def rcpt_reply(mx: InboundMx, address: str, mail_from: str = "") -> tuple[int, str]:
    host, port = mx.address
    async with aiosmtplib.SMTP(hostname=host, port=port, start_tls=False) as smtp:
        await smtp.mail(mail_from)
        code, msg = await smtp.execute_command(b"RCPT", f"TO:<{address}>".encode())
        return code, msg


async def test_a_bounce_to_a_return_path_is_in_the_inbox_when_250_comes(
    inbound_mx: InboundFactory,
) -> None:
    mx = await inbound_mx()
    await mx.register("shop.test")
    await mx.wait_accepts("pwb.shop.test")
    seen_at_notify: list[list[str]] = []
    assert mx.app.inbound is not None
    mx.app.inbound.on_delivered = lambda: seen_at_notify.append(sorted(os.listdir(mx.inbox.new)))

    host, port = mx.address
    async with aiosmtplib.SMTP(
        hostname=host, port=port, start_tls=False, local_hostname="mx.example"
    ) as smtp:
        _, ehlo = await smtp.ehlo()
        assert "SIZE" in ehlo and "AUTH" not in ehlo
        await smtp.mail("")  # MAIL FROM:<>
        for rcpt in ("b-abc@pwb.shop.test", "postmaster@PWB.Shop.Test", "postmaster"):
            code, _ = await smtp.rcpt(rcpt)
            assert code == 250, rcpt
        code, reply = await smtp.data(DSN)
        # Durable by now: the 250 came after the fsync.
        files = sorted(os.listdir(mx.inbox.new))
    assert code == 250 and reply.startswith("2.0.0 Ok: queued as ")
    item_id = queued_id(reply)
    assert files == [item_id]
    assert seen_at_notify == [[item_id]]  # stored before the processor is told
    header_line, _, data = (mx.inbox.new / item_id).read_bytes().partition(b"\n")
    header = json.loads(header_line)
    assert header["mail_from"] == "" and header["helo"] == "mx.example"
    assert header["rcpt_tos"] == ["b-abc@pwb.shop.test", "postmaster@PWB.Shop.Test", "postmaster"]
    assert header["peer"] == "127.0.0.1"
    assert data == DSN  # exactly as received
    assert mx.app.metrics.inbound_accepted._value.get() == 1
    (item,) = mx.inbox.claim(10)
    assert item.id == item_id and item.data == DSN


async def test_it_never_relays_not_even_for_loopback(inbound_mx: InboundFactory) -> None:
    mx = await inbound_mx({"smtp": {"trusted_networks": ["127.0.0.0/8"]}})
    await mx.register("shop.test")
    await mx.wait_accepts("pwb.shop.test")
    host, port = mx.address
    for rcpt in (
        "someone@gmail.com",
        "ceo@shop.test",  # the sending domain itself is not ours to receive for
        "x@unknown.test",
        "x@pwb.unknown.test",  # a return path of a domain nobody registered
        "x@deeper.pwb.shop.test",
        "x@[127.0.0.1]",
    ):
        code, msg = await rcpt_reply(mx, rcpt, "sender@example.com")
        assert (code, msg) == (550, f"5.7.1 <{rcpt}>: relay access denied"), rcpt
    # Through a whole transaction attempt: nothing is stored.
    replies = await raw_session(host, port, [
        b"EHLO relay.example\r\n",
        b"MAIL FROM:<spam@example.com>\r\n",
        b"RCPT TO:<victim@gmail.com>\r\n",
        b"DATA\r\n",
    ])  # fmt: skip
    assert replies[3].startswith(b"550 5.7.1 <victim@gmail.com>: relay access denied")
    assert replies[4].startswith(b"503")
    assert refused(mx, "relay_denied") == 7
    assert mx.inbox.pending() == 0 and os.listdir(mx.inbox.tmp) == []
    assert mx.app.metrics.inbound_accepted._value.get() == 0


async def test_bad_addresses_and_too_many_recipients(inbound_mx: InboundFactory) -> None:
    mx = await inbound_mx({"inbound": {"max_recipients": 2}})
    await mx.register("shop.test")
    await mx.wait_accepts("pwb.shop.test")
    host, port = mx.address
    replies = await raw_session(host, port, [
        b"EHLO relay.example\r\n",
        b"MAIL FROM:<>\r\n",
        b"RCPT TO:<noat>\r\n",
        b"RCPT TO:<a@b@c>\r\n",  # aiosmtpd cannot parse it at all
        b"RCPT TO:<1@pwb.shop.test>\r\n",
        b"RCPT TO:<2@pwb.shop.test>\r\n",
        b"RCPT TO:<3@pwb.shop.test>\r\n",
        b"AUTH PLAIN AGFAYg==\r\n",
    ])  # fmt: skip
    assert replies[3].startswith(b"501 5.1.3 ")
    assert replies[4].startswith(b"501 5.1.3 ")
    assert replies[5].startswith(b"250 ") and replies[6].startswith(b"250 ")
    assert replies[7].startswith(b"452 4.5.3 ")
    assert replies[8].startswith(b"502 5.5.1 ")
    assert refused(mx, "bad_recipient") == 2
    assert refused(mx, "too_many_recipients") == 1
    assert refused(mx, "auth") == 1


async def test_inbound_domains_are_accepted_too(inbound_mx: InboundFactory) -> None:
    mx = await inbound_mx({"inbound": {"domains": ["FBL.Example.net"]}})
    assert (await rcpt_reply(mx, "fbl@fbl.example.NET"))[0] == 250
    assert (await rcpt_reply(mx, "fbl@other.example.net"))[0] == 550
    host, port = mx.address
    async with aiosmtplib.SMTP(hostname=host, port=port, start_tls=False) as smtp:
        errors, reply = await smtp.sendmail("feedback@isp.example", ["fbl@fbl.example.net"], DSN)
    assert errors == {}
    # Wherever the bounce processor has put it by now (it is no report of ours: unparsed).
    item = mx.inbox.read(queued_id(reply))
    assert item is not None
    assert item.mail_from == "feedback@isp.example" and item.rcpt_tos == ["fbl@fbl.example.net"]


async def test_oversize_is_refused_and_nothing_is_stored(inbound_mx: InboundFactory) -> None:
    mx = await inbound_mx({"inbound": {"domains": ["fbl.test"], "max_message_size": 2048}})
    host, port = mx.address
    big = b"Subject: big\r\n\r\n" + b"x" * 76 + b"\r\n" + (b"y" * 76 + b"\r\n") * 60
    replies = await raw_session(host, port, [
        b"EHLO relay.example\r\n",
        b"MAIL FROM:<> SIZE=5000\r\n",
        b"MAIL FROM:<> SIZE=1000\r\n",
        b"RCPT TO:<a@fbl.test>\r\n",
        b"DATA\r\n",
        big + b".\r\n",
        b"MAIL FROM:<>\r\n",
        b"RCPT TO:<a@fbl.test>\r\n",
        b"DATA\r\n",
        b"Subject: small\r\n\r\nok\r\n.\r\n",
    ])  # fmt: skip
    assert b"250-SIZE 2048" in replies[1]
    assert replies[2].startswith(b"552 5.3.4 "), replies[2]
    assert replies[3].startswith(b"250 ")
    assert replies[6].startswith(b"552 5.3.4 "), replies[6]
    assert replies[10].startswith(b"250 2.0.0 Ok: queued as "), replies[10]
    assert refused(mx, "too_large") == 2
    # Only the small one was stored (the processor has moved it aside by now, or will).
    item = mx.inbox.read(queued_id(replies[10].decode()))
    assert item is not None and item.data == b"Subject: small\r\n\r\nok\r\n"
    assert mx.inbox.pending() + mx.inbox.unparsed_count() == 1
    assert os.listdir(mx.inbox.tmp) == []


async def test_a_storage_failure_answers_451_and_keeps_nothing(
    inbound_mx: InboundFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    mx = await inbound_mx({"inbound": {"domains": ["fbl.test"]}})

    def broken(path: Path) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(inbox_mod, "_fsync_dir", broken)
    host, port = mx.address
    replies = await raw_session(host, port, [
        b"EHLO relay.example\r\n",
        b"MAIL FROM:<>\r\n",
        b"RCPT TO:<a@fbl.test>\r\n",
        b"DATA\r\n",
        DSN + b".\r\n",
    ])  # fmt: skip
    assert replies[5].startswith(b"451 4.3.0 "), replies[5]
    assert os.listdir(mx.inbox.new) == [] and os.listdir(mx.inbox.tmp) == []
    assert refused(mx, "local_error") == 1


async def test_a_domain_registered_after_start_is_accepted_after_the_feed_poll(
    inbound_mx: InboundFactory,
) -> None:
    mx = await inbound_mx()
    assert (await rcpt_reply(mx, "b-1@pwb.late.test"))[0] == 550
    # Through the API of this process.
    domain_id = await mx.register("late.test")
    await mx.wait_accepts("pwb.late.test")
    assert (await rcpt_reply(mx, "b-1@pwb.late.test"))[0] == 250
    # As another process would: a row and a change-feed entry, read by the poll.
    async with mx.app.control.sessions() as s:
        s.add(Domain(tenant_id=1, name="other.test"))
        await record_change(s, "domain", 1, "other.test")
        await s.commit()
    await mx.app.control.poll_once()
    assert (await rcpt_reply(mx, "b-1@pwb.other.test"))[0] == 250
    # Removed: refused again.
    await mx.unregister(domain_id)
    await mx.wait_accepts("pwb.late.test", want=False)
    assert (await rcpt_reply(mx, "b-1@pwb.late.test"))[0] == 550


async def test_starttls_is_offered_not_required(inbound_mx: InboundFactory) -> None:
    mx = await inbound_mx({"inbound": {"domains": ["fbl.test"]}})
    host, port = mx.address
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE

    def send() -> str:
        with smtplib.SMTP(host, port, timeout=10) as smtp:
            smtp.ehlo("mx.example")
            assert smtp.has_extn("starttls") and not smtp.has_extn("auth")
            smtp.starttls(context=ctx)
            smtp.ehlo("mx.example")
            smtp.mail("<>")
            assert smtp.rcpt("a@fbl.test")[0] == 250
            code, reply = smtp.data(DSN)
            assert code == 250
            return reply.decode()

    item_id = queued_id(await asyncio.to_thread(send))
    item = mx.inbox.read(item_id)
    assert item is not None and b"Undelivered Mail" in item.data


async def test_sessions_per_ip_are_limited(inbound_mx: InboundFactory) -> None:
    mx = await inbound_mx({"inbound": {"max_sessions_per_ip": 1}})
    host, port = mx.address
    first = await asyncio.open_connection(host, port)
    assert (await first[0].readline()).startswith(b"220 ")
    second = await raw_session(host, port, [])
    assert second[0].startswith(b"421 4.7.0 ")
    assert refused(mx, "too_many_sessions") == 1
    first[1].close()


async def test_no_inbound_listener_without_inbound_listen(appliance: ApplianceFactory) -> None:
    app = await appliance()
    assert app.inbound is None and app.inbox is None and app.inbound_addresses == []


async def test_the_appliance_answers_on_its_inbound_port(
    appliance: ApplianceFactory, tmp_path: Path
) -> None:
    port = free_port()
    app = await appliance({"inbound": {"listen": [f"127.0.0.1:{port}"], "domains": ["fbl.test"]}})
    assert app.inbound_addresses == [("127.0.0.1", port)]
    assert app.smtp_addresses[0][1] != port
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False) as smtp:
        errors, _ = await smtp.sendmail("", ["x@fbl.test"], DSN)
    assert errors == {}
    assert Path(app.cfg.inbound_path) == tmp_path / "spool" / "inbound"
    # Stored; the bounce processor then finds nothing of ours in it and keeps it aside.
    inbox = Inbox(app.cfg.inbound_path)
    for _ in range(100):
        if inbox.unparsed_count() == 1:
            break
        await asyncio.sleep(0.05)
    assert (inbox.pending(), inbox.unparsed_count()) == (0, 1)
    # The gauges see it (what the appliance's gauge loop runs every 5 s).
    assert app.inbox is not None
    await update_gauges(app.spool, app.metrics, app.inbox)
    assert app.metrics.inbound_pending._value.get() == 0
    assert app.metrics.inbound_unparsed._value.get() == 1


async def test_the_workers_of_serve_share_the_inbound_listener_and_inbox(
    tmp_path: Path, lab: Lab, subprocess_config: Callable[..., tuple[Path, int]]
) -> None:
    from tests.queue.test_durability import serve
    from tests.test_appliance import wait_log

    inbound_port = free_port()
    config, _ = subprocess_config(
        {
            "server": {"workers": 2},
            "inbound": {"listen": [f"127.0.0.1:{inbound_port}"], "domains": ["fbl.test"]},
        }
    )
    log = tmp_path / "serve.log"
    async with serve([], config, inbound_port, log):
        # The second worker may start seconds after the port answers on a loaded
        # machine (the suite's other workers): a generous wait, not a fixed sleep.
        await wait_log(
            log, rf"worker=1 event=started .*inbound=127\.0\.0\.1:{inbound_port}", timeout=30
        )
        await wait_log(log, rf"worker=0 event=started .*inbound=127\.0\.0\.1:{inbound_port}")

        async def send(n: int) -> None:
            async with aiosmtplib.SMTP(
                hostname="127.0.0.1", port=inbound_port, start_tls=False
            ) as smtp:
                await smtp.sendmail("", [f"r{n}@fbl.test"], b"Subject: %d\r\n\r\nx\r\n" % n)
                code, _ = await smtp.execute_command(b"RCPT", b"TO:<x@gmail.com>")
                assert code == 503  # no MAIL in progress after the transaction
                await smtp.mail("")
                code, msg = await smtp.execute_command(b"RCPT", b"TO:<x@gmail.com>")
                assert code == 550 and "relay access denied" in msg

        for wave in range(3):
            await asyncio.gather(*(send(wave * 4 + n) for n in range(4)))
    text = log.read_text()
    assert "event=inbound_accepted" in text
    workers = set(re.findall(r"worker=(\d) event=inbound_accepted", text))
    assert workers <= {"0", "1"} and workers
    inbox = Inbox(tmp_path / "spool" / "inbound", create=False)
    # All 12 stored; the workers' bounce processors found nothing of ours in them.
    assert inbox.pending() + inbox.unparsed_count() == 12
