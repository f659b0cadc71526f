"""SMTP submission over real sockets: relay control, AUTH, limits, bare newlines."""

from __future__ import annotations

import asyncio
import smtplib
import ssl
import subprocess
import time
from pathlib import Path

import aiosmtplib
import pytest

from postwarden.appliance import Appliance
from postwarden.lab import Lab
from postwarden.mta.auth import hash_password
from postwarden.queue.admin import QueueAdmin
from tests.conftest import ApplianceFactory
from tests.peers import require_binary

MSG = b"From: a@sender.test\r\nTo: b@inbox.test\r\nSubject: t\r\n\r\nhello\r\n"


def addr(app: Appliance) -> tuple[str, int]:
    return app.smtp_addresses[0]


def no_verify() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


async def raw_session(
    host: str, port: int, lines: list[bytes], *, read_timeout: float = 3.0
) -> list[bytes]:
    """Send raw bytes (one chunk per list item, replies read in between).

    Returns one entry per reply (the lines of a multi-line reply joined), so that
    ``replies[i]`` answers the i-th chunk (``replies[0]`` is the greeting).
    """
    reader, writer = await asyncio.open_connection(host, port)
    replies = [await asyncio.wait_for(reader.readline(), read_timeout)]
    for chunk in lines:
        writer.write(chunk)
        await writer.drain()
        replies.append(await read_reply(reader, read_timeout))
    writer.close()
    return replies


async def read_reply(reader: asyncio.StreamReader, timeout: float = 5.0) -> bytes:
    """One SMTP reply, its lines joined; ``<timeout>`` / ``<closed>`` marks the end."""
    reply = b""
    try:
        while True:
            line = await asyncio.wait_for(reader.readline(), timeout)
            if not line:
                break
            reply += line
            if line[3:4] != b"-":
                break
    except TimeoutError:
        reply += b"<timeout>"
    return reply or b"<closed>"


async def test_trusted_client_relays_and_headers_are_added(
    lab: Lab, appliance: ApplianceFactory
) -> None:
    lab.add_domain("inbox.test")
    app = await appliance()
    host, port = addr(app)
    async with aiosmtplib.SMTP(hostname=host, port=port, start_tls=False) as smtp:
        _, ehlo = await smtp.ehlo()
        for ext in (
            "PIPELINING",
            "8BITMIME",
            "SMTPUTF8",
            "SIZE",
            "ENHANCEDSTATUSCODES",
            "STARTTLS",
        ):
            assert ext in ehlo, ext
        errors, resp = await smtp.sendmail("a@sender.test", ["b@inbox.test"], MSG)
    assert errors == {}
    assert resp.startswith("2.0.0 Ok: queued as ")
    await lab.wait_for_messages(1, timeout=10)
    got = lab.messages[0]
    assert got.mail_from == "a@sender.test" and got.rcpt_tos == ["b@inbox.test"]
    head = got.data.split(b"\r\n\r\n", 1)[0]
    assert head.startswith(b"Received: from ")
    assert b"by postwarden.test (Postwarden)" in head
    assert b"\r\nMessage-ID: <" in head and b"\r\nDate: " in head
    assert got.data.endswith(b"hello\r\n")


async def test_untrusted_client_cannot_relay_without_auth(
    lab: Lab, appliance: ApplianceFactory
) -> None:
    app = await appliance({"smtp": {"trusted_networks": ["10.0.0.0/8"]}})
    host, port = addr(app)
    replies = await raw_session(
        host,
        port,
        [
            b"EHLO client.test\r\n",
            b"MAIL FROM:<a@sender.test>\r\n",
            b"RCPT TO:<b@inbox.test>\r\n",
            b"AUTH PLAIN AHVzZXIAcGFzcw==\r\n",
        ],
    )
    text = b"".join(replies)
    assert b"AUTH" not in b"".join(r for r in replies if r.startswith(b"250-"))
    assert b"530 5.7.0 Authentication required" in text
    assert b"503 5.5.1" in text or b"530 5.7.0" in replies[3]  # no RCPT without MAIL
    assert b"538 5.7.11" in text
    assert app.metrics.rejected.labels("auth_required")._value.get() >= 1


async def test_auth_over_tls_then_relay(lab: Lab, appliance: ApplianceFactory) -> None:
    lab.add_domain("inbox.test")
    users = [{"username": "app1", "password_hash": hash_password("s3cret-pass")}]
    app = await appliance({"smtp": {"trusted_networks": ["10.0.0.0/8"], "users": users}})
    host, port = addr(app)
    smtp = aiosmtplib.SMTP(hostname=host, port=port, start_tls=False, tls_context=no_verify())
    await smtp.connect()
    await smtp.ehlo()
    assert not smtp.supports_extension("auth")
    await smtp.starttls()
    await smtp.ehlo()
    assert "PLAIN" in smtp.esmtp_extensions["auth"] and "LOGIN" in smtp.esmtp_extensions["auth"]
    with pytest.raises(aiosmtplib.SMTPAuthenticationError) as bad:
        await smtp.login("app1", "wrong")
    assert bad.value.code == 535 and "5.7.8" in bad.value.message
    await smtp.login("app1", "s3cret-pass")
    errors, _ = await smtp.sendmail("a@sender.test", ["b@inbox.test"], MSG)
    assert errors == {}
    await smtp.quit()
    await lab.wait_for_messages(1, timeout=10)
    # The auth identity travels with the message.
    accepted = next(
        e for e in QueueAdmin(app.cfg.spool.path).events(limit=10) if e["type"] == "accepted"
    )
    assert accepted["detail"]["auth"] == "app1"
    assert b"with ESMTPSA id" in lab.messages[0].data


async def test_auth_login_from_trusted_network_without_tls_and_lockout(
    lab: Lab, appliance: ApplianceFactory
) -> None:
    users = [{"username": "app1", "password_hash": hash_password("pw")}]
    app = await appliance({"smtp": {"users": users}})
    host, port = addr(app)

    def run() -> list[tuple[int, bytes]]:
        out = []
        s = smtplib.SMTP(host, port, timeout=10)
        s.ehlo("client.test")
        assert s.has_extn("auth")
        for _ in range(3):
            out.append(s.docmd("AUTH", "PLAIN AGFwcDEAbm9wZQ=="))  # app1 / nope
        with pytest.raises(smtplib.SMTPServerDisconnected):
            s.noop()
        return out

    replies = await asyncio.to_thread(run)
    assert replies[0][0] == 535 and replies[1][0] == 535
    assert replies[2][0] == 421 and replies[2][1].startswith(b"4.7.0")


async def test_size_recipient_and_line_limits(lab: Lab, appliance: ApplianceFactory) -> None:
    app = await appliance({"smtp": {"max_message_size": 4096, "max_recipients": 2}})
    host, port = addr(app)
    replies = await raw_session(
        host,
        port,
        [
            b"EHLO client.test\r\n",
            b"MAIL FROM:<a@sender.test> SIZE=100000\r\n",
            b"MAIL FROM:<a@sender.test>\r\n",
            b"RCPT TO:<b1@inbox.test>\r\n",
            b"RCPT TO:<b2@inbox.test>\r\n",
            b"RCPT TO:<b3@inbox.test>\r\n",
            b"DATA\r\n",
            b"Subject: big\r\n\r\n" + b"x" * 90 + b"\r\n" + (b"y" * 78 + b"\r\n") * 60 + b".\r\n",
            b"RSET\r\n",
            b"MAIL FROM:<a@sender.test>\r\n",
            b"RCPT TO:<b1@inbox.test>\r\n",
            b"DATA\r\n",
            b"Subject: long\r\n\r\n" + b"z" * 1200 + b"\r\n.\r\n",
        ],
    )
    codes = [r[:9] for r in replies]
    assert b"552 5.3.4" in codes[2]  # SIZE= over the limit, refused at MAIL
    assert codes[5].startswith(b"250") and codes[6].startswith(b"452 4.5.3")
    assert codes[8] == b"552 5.3.4"  # the data itself over the limit
    assert codes[13] == b"500 5.5.2"  # a 1200-octet line
    assert QueueAdmin(app.cfg.spool.path).summary()["messages"] == 0


async def test_sessions_per_ip_commands_per_session_and_idle_timeout(
    lab: Lab, appliance: ApplianceFactory
) -> None:
    app = await appliance(
        {"smtp": {"max_sessions_per_ip": 2, "max_commands_per_session": 4, "idle_timeout": "0.5s"}}
    )
    host, port = addr(app)
    held = [await asyncio.open_connection(host, port) for _ in range(2)]
    for r, _ in held:
        assert (await r.readline()).startswith(b"220")
    r3, w3 = await asyncio.open_connection(host, port)
    assert (await asyncio.wait_for(r3.readline(), 3)).startswith(b"421 4.7.0")
    w3.close()
    for _, w in held:
        w.close()
    await asyncio.sleep(0.1)
    replies = await raw_session(host, port, [b"NOOP\r\n"] * 5)
    assert replies[4].startswith(b"250") and replies[5].startswith(b"421 4.7.0")
    # Idle: the server hangs up on a silent client.
    r, w = await asyncio.open_connection(host, port)
    await r.readline()
    started = time.monotonic()
    rest = await asyncio.wait_for(r.read(), 5)
    assert time.monotonic() - started < 4
    assert rest == b"" or rest.startswith(b"421")
    w.close()


@pytest.mark.parametrize(
    "payload",
    [
        b"Subject: s\r\n\r\nfirst\n.\nMAIL FROM:<evil@x.test>\r\n",  # LF.LF smuggling
        b"Subject: s\r\n\r\nfirst\r\n.\nRCPT TO:<evil@x.test>\r\n",  # CRLF.LF
        b"Subject: s\r\n\r\nfirst\r.\rsecond\r\n",  # CR.CR
        b"Subject: s\nX: y\r\n\r\nbody\r\n",  # bare LF in the header
    ],
)
async def test_bare_newlines_never_end_data_and_are_rejected(
    lab: Lab, appliance: ApplianceFactory, payload: bytes
) -> None:
    lab.add_domain("inbox.test")
    app = await appliance()
    host, port = addr(app)
    replies = await raw_session(
        host,
        port,
        [
            b"EHLO client.test\r\n",
            b"MAIL FROM:<a@sender.test>\r\n",
            b"RCPT TO:<b@inbox.test>\r\n",
            b"DATA\r\n",
            payload,
            b".\r\n",
            b"QUIT\r\n",
        ],
        read_timeout=1.0,
    )
    # The payload alone never ends DATA: the only reply comes after <CRLF>.<CRLF>.
    assert replies[5] == b"<timeout>"
    assert replies[6].startswith(b"550 5.6.0")
    assert replies[7].startswith(b"221")
    assert QueueAdmin(app.cfg.spool.path).summary()["messages"] == 0
    await asyncio.sleep(0.3)
    assert lab.messages == []


async def test_bare_newlines_normalized_when_configured(
    lab: Lab, appliance: ApplianceFactory
) -> None:
    lab.add_domain("inbox.test")
    app = await appliance({"smtp": {"bare_newlines": "normalize"}})
    host, port = addr(app)
    replies = await raw_session(
        host,
        port,
        [
            b"EHLO client.test\r\n",
            b"MAIL FROM:<a@sender.test>\r\n",
            b"RCPT TO:<b@inbox.test>\r\n",
            b"DATA\r\n",
            b"Subject: s\n\nline1\nline2\rline3\r\n.\r\n",
        ],
    )
    assert replies[-1].startswith(b"250 2.0.0")
    await lab.wait_for_messages(1, timeout=10)
    data = lab.messages[0].data
    assert data.endswith(b"Subject: s\r\n\r\nline1\r\nline2\r\nline3\r\n")
    assert data.count(b"\n") == data.count(b"\r\n") == data.count(b"\r")


async def test_swaks_submits_with_starttls_and_auth(
    lab: Lab, appliance: ApplianceFactory, tmp_path: Path
) -> None:
    swaks = require_binary("swaks")
    lab.add_domain("inbox.test")
    users = [{"username": "swaks-user", "password_hash": hash_password("pw-for-swaks")}]
    app = await appliance({"smtp": {"trusted_networks": ["10.0.0.0/8"], "users": users}})
    host, port = addr(app)
    proc = await asyncio.create_subprocess_exec(
        swaks,
        "--server",
        f"{host}:{port}",
        "--from",
        "a@sender.test",
        "--to",
        "b@inbox.test",
        "--tls",
        "--auth",
        "PLAIN",
        "--auth-user",
        "swaks-user",
        "--auth-password",
        "pw-for-swaks",
        "--header",
        "Subject: via swaks",
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, out.decode()
    assert b"250 2.0.0 Ok: queued as" in out
    await lab.wait_for_messages(1, timeout=10)
    assert b"Subject: via swaks" in lab.messages[0].data
    assert b"with ESMTPSA id" in lab.messages[0].data


async def test_pipelined_commands_after_data_and_dot_unstuffing(
    lab: Lab, appliance: ApplianceFactory
) -> None:
    lab.add_domain("inbox.test")
    app = await appliance()
    host, port = addr(app)
    reader, writer = await asyncio.open_connection(host, port)

    async def reply() -> bytes:
        return await read_reply(reader)

    await reply()
    writer.write(b"EHLO c.test\r\nMAIL FROM:<a@sender.test>\r\nRCPT TO:<b@inbox.test>\r\nDATA\r\n")
    for _ in range(3):
        assert (await reply()).startswith(b"250")
    assert (await reply()).startswith(b"354")
    # The message, its end, and the next transaction's commands in one write.
    writer.write(
        b"Subject: one\r\n\r\n..leading dot\r\n.\r\n"
        b"MAIL FROM:<a@sender.test>\r\nRCPT TO:<c@inbox.test>\r\nDATA\r\n"
    )
    assert (await reply()).startswith(b"250 2.0.0 Ok: queued as")
    assert (await reply()).startswith(b"250")
    assert (await reply()).startswith(b"250")
    assert (await reply()).startswith(b"354")
    # An empty message is a message too: a lone dot ends it.
    writer.write(b".\r\nQUIT\r\n")
    assert (await reply()).startswith(b"250 2.0.0 Ok: queued as")
    assert (await reply()).startswith(b"221")
    writer.close()
    await lab.wait_for_messages(2, timeout=10)
    by_rcpt = {m.rcpt_tos[0]: m.data for m in lab.messages}
    assert by_rcpt["b@inbox.test"].endswith(b"\r\n\r\n.leading dot\r\n")
    assert b"Received: from c.test" in by_rcpt["c@inbox.test"]


async def test_null_reverse_path_is_accepted_and_relayed(
    lab: Lab, appliance: ApplianceFactory
) -> None:
    lab.add_domain("inbox.test")
    app = await appliance()
    host, port = addr(app)
    async with aiosmtplib.SMTP(hostname=host, port=port, start_tls=False) as smtp:
        errors, resp = await smtp.sendmail("", ["b@inbox.test"], MSG)  # MAIL FROM:<>
    assert errors == {} and resp.startswith("2.0.0 Ok: queued as")
    await lab.wait_for_messages(1, timeout=10)
    assert lab.messages[0].mail_from == ""
