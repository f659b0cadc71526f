"""Submission over real sockets through the cleanup stage: NUL, line length, mail loops,
address literals, a From that hides an address, and who is trusted by default."""

from __future__ import annotations

import aiosmtplib
import pytest

from postwarden.config import load_config
from postwarden.lab import Lab
from postwarden.lab.demo import dkim_verdicts
from postwarden.queue.admin import QueueAdmin
from tests.conftest import ApplianceFactory
from tests.mta.test_submission import addr, raw_session


def queued(path: str) -> int:
    admin = QueueAdmin(path)
    try:
        return admin.summary()["messages"]
    finally:
        admin.close()


def transaction(data: bytes, rcpt: bytes = b"<b@inbox.test>") -> list[bytes]:
    return [
        b"EHLO client.test\r\n",
        b"MAIL FROM:<a@sender.test>\r\n",
        b"RCPT TO:" + rcpt + b"\r\n",
        b"DATA\r\n",
        data + b".\r\n",
    ]


async def test_nul_long_lines_and_loops_are_refused_at_data(
    lab: Lab, appliance: ApplianceFactory
) -> None:
    lab.add_domain("inbox.test")
    app = await appliance()
    host, port = addr(app)
    head = b"From: a@sender.test\r\nSubject: t\r\n"
    cases = [
        (head + b"\r\nbefore\r\n\x00.\r\nafter\r\n", b"550 5.6.0"),  # NUL, even as "\0."
        (head + b"\r\n" + b"x" * 999 + b"\r\n", b"500 5.5.2"),  # 1001 octets with CRLF
        (b"Received: from a by b; Thu, 1 Jan 1970 00:00:00 +0000\r\n" * 50 + head + b"\r\nb\r\n",
         b"554 5.4.6"),
        (b"From: a@sender.test, ceo@victim.test\r\n\r\nb\r\n", b"550 5.6.0"),
    ]  # fmt: skip
    for data, want in cases:
        replies = await raw_session(host, port, transaction(data))
        assert replies[5].startswith(want), (data[:40], replies[5])
    assert queued(app.cfg.spool.path) == 0
    # The longest lawful line (998 octets + CRLF) and 49 hops pass.
    ok = [
        head + b"\r\n" + b"y" * 998 + b"\r\n",
        b"Received: from a by b; Thu, 1 Jan 1970 00:00:00 +0000\r\n" * 49 + head + b"\r\nb\r\n",
    ]
    for data in ok:
        replies = await raw_session(host, port, transaction(data))
        assert replies[5].startswith(b"250 2.0.0"), replies[5]
    got = await lab.wait_for_messages(2, timeout=10)
    assert all(b"\x00" not in m.data for m in got)
    hops = sorted((b"\r\n" + m.data).count(b"\r\nReceived: ") for m in got)
    assert hops == [1, 50]


@pytest.mark.parametrize("rcpt", [b"<x@[127.0.0.1]>", b"<x@[IPv6:::1]>", b"<x@[10.0.0.1]>"])
async def test_address_literals_are_refused_unless_allowed(
    lab: Lab, appliance: ApplianceFactory, rcpt: bytes
) -> None:
    app = await appliance()
    host, port = addr(app)
    replies = await raw_session(host, port, transaction(b"Subject: t\r\n\r\nb\r\n", rcpt)[:3])
    assert replies[3].startswith(b"550 5.7.1"), replies[3]
    assert app.metrics.rejected.labels("address_literal")._value.get() == 1
    allowing = await appliance({"smtp": {"allow_address_literals": True}})
    replies = await raw_session(*addr(allowing), transaction(b"Subject: t\r\n\r\nb\r\n", rcpt)[:3])
    assert replies[3].startswith(b"250 2.1.5"), replies[3]


async def test_only_the_host_itself_is_trusted_by_default(
    lab: Lab, appliance: ApplianceFactory
) -> None:
    assert load_config(None, environ={}).smtp.trusted_networks == ["127.0.0.1/32", "::1/128"]
    lab.add_domain("inbox.test")
    app = await appliance({"smtp": {"listen": ["0.0.0.0:0"]}})
    _, port = addr(app)
    msg = b"From: a@sender.test\r\nSubject: t\r\n\r\nb\r\n"
    # Another loopback address is another host as far as relaying goes.
    async with aiosmtplib.SMTP(
        hostname="127.0.0.2", port=port, start_tls=False, source_address=("127.0.0.3", 0)
    ) as smtp:
        with pytest.raises(aiosmtplib.SMTPSenderRefused) as exc:
            await smtp.sendmail("a@sender.test", ["b@inbox.test"], msg)
        assert exc.value.code == 530
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False) as smtp:
        errors, _ = await smtp.sendmail("a@sender.test", ["b@inbox.test"], msg)
        assert errors == {}
    await lab.wait_for_messages(1, timeout=10)


async def test_bcc_is_taken_out_and_the_message_is_signed_as_cleanup_decided(
    lab: Lab, appliance: ApplianceFactory, dkim_keys: list[dict[str, str]]
) -> None:
    lab.add_domain("inbox.test")
    app = await appliance({"dkim": {"keys": dkim_keys}})
    msg = (
        b"From: Shop <news@Sender.test>\r\nTo: b@inbox.test\r\nBcc: secret@inbox.test\r\n"
        b"Subject: t\r\n\r\nhello\r\n"
    )
    async with aiosmtplib.SMTP(hostname=addr(app)[0], port=addr(app)[1], start_tls=False) as s:
        await s.sendmail("a@sender.test", ["b@inbox.test", "secret@inbox.test"], msg)
    got = await lab.wait_for_messages(1, timeout=10)
    assert sorted(r for m in got for r in m.rcpt_tos) == ["b@inbox.test", "secret@inbox.test"]
    for m in got:
        assert b"secret@" not in m.data.split(b"\r\n\r\n", 1)[0].split(b"DKIM-Signature")[-1]
        assert await dkim_verdicts(m.data, app.resolver) == [
            "pass rsa-sha256 d=sender.test",
            "pass ed25519-sha256 d=sender.test",
        ]
