"""The lab itself: real DNS packets to its DNS server, real SMTP sessions to its sinks.

These tests start their own :class:`Lab` (not the shared fixture) so they run even
while the rest of the suite's fixtures are being built.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import struct
import time
from collections.abc import AsyncIterator

import aiosmtplib
import dns.asyncquery
import dns.exception
import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import pytest

from postwarden.lab import Lab
from tests.waiting import eventually

MSG = b"From: a@sender.test\r\nTo: b@inbox.test\r\nSubject: hi\r\n\r\nhello\r\n"


@pytest.fixture
async def lab() -> AsyncIterator[Lab]:
    async with Lab() as the_lab:
        yield the_lab


def ns(lab: Lab) -> tuple[str, int]:
    host, port = lab.nameserver.rsplit(":", 1)
    return host, int(port)


async def udp(lab: Lab, name: str, rtype: str, **kw: object) -> dns.message.Message:
    host, port = ns(lab)
    q = dns.message.make_query(name, rtype, **kw)  # type: ignore[arg-type]
    return await dns.asyncquery.udp(q, host, port=port, timeout=2)


async def tcp(lab: Lab, name: str, rtype: str) -> dns.message.Message:
    host, port = ns(lab)
    return await dns.asyncquery.tcp(dns.message.make_query(name, rtype), host, port=port, timeout=2)


def texts(r: dns.message.Message) -> list[str]:
    return sorted(rd.to_text() for rrset in r.answer for rd in rrset)


async def client(lab: Lab, index: int = 0, **kw: object) -> aiosmtplib.SMTP:
    smtp = aiosmtplib.SMTP(
        hostname=lab.sinks[index].host,
        port=lab.mx_port,
        start_tls=False,
        timeout=5,
        local_hostname="client.test",
        **kw,  # type: ignore[arg-type]
    )
    await smtp.connect()
    await smtp.ehlo()
    return smtp


async def rcpt(smtp: aiosmtplib.SMTP, address: str) -> aiosmtplib.SMTPResponse:
    return await smtp.execute_command(f"RCPT TO:<{address}>".encode())


# -- DNS ------------------------------------------------------------------------------


async def test_dns_answers_over_udp_and_tcp(lab: Lab) -> None:
    lab.add_domain("Inbox.Test.", mx_layout="all")
    long_txt = "v=DKIM1; k=rsa; p=" + "A" * 400  # > 255 bytes, still fits in 512
    lab.dns.add("k._domainkey.inbox.test", "TXT", long_txt, ttl=300)
    for query in (udp, tcp):
        r = await query(lab, "INBOX.test", "MX")
        assert r.rcode() == dns.rcode.NOERROR and r.flags & dns.flags.AA
        assert texts(r) == ["10 mx1.lab.test.", "20 mx2.lab.test.", "30 mx3.lab.test."]
        assert r.question[0].name.to_text() == "INBOX.test."
        r = await query(lab, "mx2.lab.test", "A")
        assert texts(r) == ["127.0.1.2"] and r.answer[0].ttl == 60
        r = await query(lab, "k._domainkey.inbox.test", "TXT")
        (rd,) = r.answer[0]
        assert b"".join(rd.strings).decode() == long_txt
        assert [len(s) for s in rd.strings] == [255, 163]
        assert r.answer[0].ttl == 300


async def test_nodata_nxdomain_and_faults(lab: Lab) -> None:
    lab.add_domain("inbox.test")
    lab.dns.add("a.b.deep.test", "A", "192.0.2.1")
    r = await udp(lab, "inbox.test", "AAAA")  # name exists, type does not: NODATA
    assert r.rcode() == dns.rcode.NOERROR and not r.answer
    assert r.authority and r.authority[0].rdtype == dns.rdatatype.SOA
    r = await udp(lab, "b.deep.test", "A")  # empty non-terminal: NODATA too
    assert r.rcode() == dns.rcode.NOERROR and not r.answer
    r = await udp(lab, "nope.inbox.test", "MX")
    assert r.rcode() == dns.rcode.NXDOMAIN and r.flags & dns.flags.AA

    lab.dns.set_fault("inbox.test", "servfail")
    assert (await udp(lab, "inbox.test", "MX")).rcode() == dns.rcode.SERVFAIL
    assert (await tcp(lab, "inbox.test", "A")).rcode() == dns.rcode.SERVFAIL
    lab.dns.set_fault("INBOX.test.", "refused")
    assert (await udp(lab, "inbox.test", "MX")).rcode() == dns.rcode.REFUSED
    lab.dns.set_fault("inbox.test", "timeout")
    host, port = ns(lab)
    with pytest.raises(dns.exception.Timeout):
        await dns.asyncquery.udp(
            dns.message.make_query("inbox.test", "MX"), host, port=port, timeout=0.3
        )
    lab.dns.set_fault("inbox.test", None)
    assert texts(await udp(lab, "inbox.test", "MX")) == ["10 mx1.lab.test."]
    with pytest.raises(ValueError):
        lab.dns.set_fault("inbox.test", "flaky")


async def test_big_answers_truncate_over_udp_and_complete_over_tcp(lab: Lab) -> None:
    for i in range(40):
        lab.dns.add("big.test", "A", f"192.0.2.{i + 1}")
    lab.dns.add("big.test", "A", "192.0.2.1")  # a duplicate is not added twice
    r = await udp(lab, "big.test", "A")
    assert r.flags & dns.flags.TC and len(r.to_wire()) <= 512
    r = await tcp(lab, "big.test", "A")
    assert not r.flags & dns.flags.TC and len(texts(r)) == 40
    # A larger EDNS payload lets the whole answer through over UDP.
    r = await udp(lab, "big.test", "A", use_edns=0, payload=4096)
    assert not r.flags & dns.flags.TC and len(texts(r)) == 40
    # So it goes for a TXT record too long for 512 bytes (an RSA-4096 DKIM key).
    key = "v=DKIM1; k=rsa; p=" + "B" * 700
    lab.dns.add("big._domainkey.big.test", "TXT", key)
    r = await udp(lab, "big._domainkey.big.test", "TXT")
    assert r.flags & dns.flags.TC and not r.answer
    r = await tcp(lab, "big._domainkey.big.test", "TXT")
    assert [b"".join(rd.strings).decode() for rd in r.answer[0]] == [key]


async def test_several_queries_on_one_tcp_connection(lab: Lab) -> None:
    lab.add_domain("inbox.test")
    before = lab.dns.queries
    host, port = ns(lab)
    reader, writer = await asyncio.open_connection(host, port)
    queries = [dns.message.make_query(n, "MX") for n in ("inbox.test", "nope.test")]
    writer.write(b"".join(q.to_wire(prepend_length=True) for q in queries))
    await writer.drain()
    answers = []
    for _ in queries:
        (length,) = struct.unpack("!H", await reader.readexactly(2))
        answers.append(dns.message.from_wire(await reader.readexactly(length)))
    writer.close()
    await writer.wait_closed()
    assert [a.id for a in answers] == [q.id for q in queries]
    assert [a.rcode() for a in answers] == [dns.rcode.NOERROR, dns.rcode.NXDOMAIN]
    assert lab.dns.queries == before + 2
    assert ("inbox.test", "MX", "tcp") in lab.dns.query_log


async def test_domain_helpers_publish_the_right_records(lab: Lab) -> None:
    lab.add_null_mx("null.test")
    lab.add_implicit_mx("implicit.test", 2)
    lab.add_domain("two.test", hosts=[2, 1])
    lab.dns.add("raw.test", "MX", "5 mx2.lab.test")
    lab.dns.add("raw.test", "AAAA", "::1")
    lab.populate_demo()
    assert texts(await udp(lab, "raw.test", "MX")) == ["5 mx2.lab.test."]
    assert texts(await udp(lab, "raw.test", "AAAA")) == ["::1"]
    lab.dns.remove("raw.test")
    assert (await udp(lab, "raw.test", "MX")).rcode() == dns.rcode.NXDOMAIN
    assert texts(await udp(lab, "null.test", "MX")) == ["0 ."]
    r = await udp(lab, "implicit.test", "MX")
    assert r.rcode() == dns.rcode.NOERROR and not r.answer
    assert texts(await udp(lab, "implicit.test", "A")) == ["127.0.1.3"]
    assert texts(await udp(lab, "two.test", "MX")) == ["10 mx3.lab.test.", "20 mx2.lab.test."]
    assert set(lab.demo_domains) == {
        "inbox.lab.test",
        "greylist.lab.test",
        "full.lab.test",
        "nouser.lab.test",
        "nullmx.lab.test",
    }
    assert texts(await udp(lab, "nullmx.lab.test", "MX")) == ["0 ."]
    demo_hosts = set()
    for domain in sorted(lab.demo_domains)[:4]:
        demo_hosts.update(texts(await udp(lab, domain, "MX")))
    demo_hosts.discard("0 .")
    assert len(demo_hosts) == 3  # spread over the three sinks
    assert texts(await udp(lab, "demo.lab.test", "A")) == ["127.0.0.1"]
    assert all(s.name.endswith("lab.test") for s in lab.sinks)
    assert [s.host for s in lab.sinks] == ["127.0.1.1", "127.0.1.2", "127.0.1.3"]


# -- sinks ----------------------------------------------------------------------------


async def test_accepted_message_is_recorded_with_its_session(lab: Lab) -> None:
    lab.add_domain("inbox.test", hosts=[1])
    ctx = ssl.create_default_context(cadata=lab.cert_pem.decode())
    smtp = await client(lab, 1)
    assert smtp.supports_extension("starttls")
    assert smtp.supports_extension("smtputf8") and smtp.supports_extension("8bitmime")
    assert not smtp.supports_extension("auth")
    await smtp.starttls(server_hostname=lab.sinks[1].name, tls_context=ctx)
    assert not smtp.supports_extension("auth")
    body = MSG + b".starts with a dot\r\n\xc3\xa9t\xc3\xa9\r\n"
    errors, reply = await smtp.sendmail("a@sender.test", ["b@inbox.test", "c@other.test"], body)
    assert errors == {} and reply.startswith("2.0.0")
    # A null sender, plain text this time, on another sink.
    plain = await client(lab, 2)
    await plain.mail("")
    assert (await rcpt(plain, "d@inbox.test")).code == 250
    await plain.data(MSG)
    await plain.quit()
    await smtp.quit()
    got = await lab.wait_for_messages(2, timeout=2)
    first, second = got
    assert first.data == body
    assert first.mail_from == "a@sender.test"
    assert first.rcpt_tos == ["b@inbox.test", "c@other.test"]  # unknown domains accept
    assert (first.peer, first.sink_address, first.sink_name) == (
        "127.0.0.1",
        "127.0.1.2",
        "mx2.lab.test",
    )
    assert first.tls and first.helo == "client.test"
    assert abs(first.received_at - time.time()) < 5
    assert (second.mail_from, second.tls, second.sink_address) == ("", False, "127.0.1.3")
    assert lab.sinks[1].connections == 1 and lab.sinks[2].connections == 1


async def test_recipient_behaviours(lab: Lab) -> None:
    for behaviour in ("reject", "tempfail", "greylist"):
        lab.add_domain(f"{behaviour}.test", behaviour=behaviour)
    lab.add_domain("inbox.test")
    smtp = await client(lab)
    await smtp.mail("a@sender.test")
    assert (await rcpt(smtp, "x@inbox.test")).code == 250
    r = await rcpt(smtp, "x@reject.test")
    assert str(r) == "550 5.1.1 <x@reject.test>: Recipient address rejected: User unknown"
    assert (await rcpt(smtp, "x@tempfail.test")).code == 451
    r = await rcpt(smtp, "x@greylist.test")
    assert (r.code, r.message) == (451, "4.7.1 Greylisted, try again later")
    await smtp.data(MSG)
    # The retry of the greylisted pair is accepted; another sender is greylisted anew.
    await smtp.mail("a@sender.test")
    assert (await rcpt(smtp, "x@greylist.test")).code == 250
    await smtp.data(MSG)
    await smtp.mail("other@sender.test")
    assert (await rcpt(smtp, "x@greylist.test")).code == 451
    await smtp.rset()
    # A transaction where every recipient failed is not recorded.
    await smtp.mail("a@sender.test")
    assert (await rcpt(smtp, "y@reject.test")).code == 550
    assert (await smtp.execute_command(b"DATA")).code == 503
    await smtp.quit()
    assert [m.rcpt_tos for m in lab.messages] == [["x@inbox.test"], ["x@greylist.test"]]
    # A per-address behaviour beats the domain's.
    lab.set_behaviour("vip@reject.test", "accept")
    smtp = await client(lab)
    await smtp.mail("a@sender.test")
    assert (await rcpt(smtp, "VIP@reject.test")).code == 250
    await smtp.quit()


@pytest.mark.parametrize("tls", [False, True])
async def test_disconnect_closes_after_421(lab: Lab, tls: bool) -> None:
    lab.add_domain("flaky.test", behaviour="disconnect")
    smtp = await client(lab)
    if tls:
        await smtp.starttls(validate_certs=False)
        await smtp.ehlo()
    await smtp.mail("a@sender.test")
    r = await rcpt(smtp, "x@flaky.test")
    assert (r.code, r.message) == (421, "4.7.0 Too many connections, closing")
    with pytest.raises(aiosmtplib.SMTPServerDisconnected):
        await smtp.noop()
    assert lab.messages == []


async def test_drop_data_aborts_mid_data(lab: Lab) -> None:
    lab.add_domain("drop.test", behaviour="drop_data")
    smtp = await client(lab)
    await smtp.mail("a@sender.test")
    assert (await rcpt(smtp, "x@drop.test")).code == 250
    with pytest.raises(aiosmtplib.SMTPServerDisconnected):
        await smtp.data(MSG)
    assert lab.messages == []
    assert lab.sinks[0]._sessions == set()


async def test_slow_rcpt_waits_the_configured_delay(lab: Lab) -> None:
    lab.add_domain("slow.test", behaviour="slow")
    lab.set_slow_delay(0.3)
    smtp = await client(lab)
    await smtp.mail("a@sender.test")
    t0 = time.monotonic()
    assert (await rcpt(smtp, "x@slow.test")).code == 250
    assert time.monotonic() - t0 >= 0.29
    # A client that gives up mid-wait just goes away; the sink copes.
    lab.set_slow_delay(5)
    await smtp.rset()
    await smtp.mail("b@sender.test")
    with pytest.raises(aiosmtplib.SMTPTimeoutError):
        await smtp.execute_command(b"RCPT TO:<y@slow.test>", timeout=0.1)
    smtp.close()
    await eventually(lambda: lab.sinks[0]._sessions == set(), 10, "the sink to drop the session")
    assert lab.sinks[0]._sessions == set()


async def test_refuse_and_tls_toggles(lab: Lab) -> None:
    sink = lab.sinks[0]
    sink.refuse = True
    await sink.apply()
    with pytest.raises(aiosmtplib.SMTPConnectError):
        await client(lab, 0)
    # The others still serve on the same port.
    (await client(lab, 1)).close()
    sink.refuse = False
    sink.tls = False
    await sink.apply()
    smtp = await client(lab, 0)
    assert not smtp.supports_extension("starttls")
    await smtp.quit()
    sink.tls = True
    await sink.apply()
    smtp = await client(lab, 0)
    assert smtp.supports_extension("starttls")
    # Refusing cuts sessions that are already open.
    sink.refuse = True
    await sink.apply()
    with pytest.raises(aiosmtplib.SMTPServerDisconnected):
        await smtp.noop()
    assert sink.connections == 2 and lab.sinks[1].connections == 1


async def raw_reply(reader: asyncio.StreamReader) -> bytes:
    lines = [await reader.readline()]
    while lines[-1][3:4] == b"-":
        lines.append(await reader.readline())
    return b"".join(lines)


async def test_data_is_read_exactly_however_it_arrives(lab: Lab) -> None:
    reader, writer = await asyncio.open_connection(lab.sinks[0].host, lab.mx_port)

    async def say(data: bytes, *, dribble: bool = False) -> bytes:
        if dribble:  # one byte per segment: the terminator straddles reads
            for i in range(len(data)):
                writer.write(data[i : i + 1])
                await writer.drain()
                await asyncio.sleep(0)
        else:
            writer.write(data)
        return await raw_reply(reader)

    assert (await raw_reply(reader)).startswith(b"220 mx1.lab.test")
    assert b"250 HELP" in await say(b"EHLO raw.test\r\n")
    bodies = [
        (b".\r\n", b""),  # empty message
        (b"x\r\n.\r\n", b"x\r\n"),
        (b"..\r\n...a\r\n.b\r\nc.\r\n\r\n.\r\n", b".\r\n..a\r\nb\r\nc.\r\n\r\n"),
        (b"bare\nlf\r.\n.\r\n\r\n.\r\n", b"bare\nlf\r.\n.\r\n\r\n"),
    ]
    for dribble in (False, True):
        for wire, _ in bodies:
            assert (await say(b"MAIL FROM:<a@sender.test>\r\n")).startswith(b"250")
            assert (await say(b"RCPT TO:<b@inbox.test>\r\n")).startswith(b"250")
            assert (await say(b"DATA\r\n")).startswith(b"354")
            assert (await say(wire, dribble=dribble)).startswith(b"250 2.0.0")
    assert [m.data for m in lab.messages] == [data for _, data in bodies] * 2
    # A command pipelined right behind the message is not lost.
    await say(b"MAIL FROM:<a@sender.test>\r\n")
    await say(b"RCPT TO:<b@inbox.test>\r\n")
    await say(b"DATA\r\n")
    assert (await say(b"hi\r\n.\r\nNOOP\r\n")).startswith(b"250 2.0.0")
    assert (await raw_reply(reader)).startswith(b"250")
    assert (await say(b"QUIT\r\n")).startswith(b"221")
    writer.close()
    await writer.wait_closed()


async def test_oversized_message_is_refused_after_its_end(lab: Lab) -> None:
    lab.sinks[0].data_size_limit = 1000
    smtp = await client(lab)
    await smtp.mail("a@sender.test")
    await rcpt(smtp, "b@inbox.test")
    with pytest.raises(aiosmtplib.SMTPDataError) as err:
        await smtp.data(MSG + b"x" * 5000 + b"\r\n")
    assert err.value.code == 552
    await smtp.sendmail("a@sender.test", ["b@inbox.test"], MSG)  # the session goes on
    await smtp.quit()
    assert [m.data for m in lab.messages] == [MSG]


async def test_many_messages_on_one_connection(lab: Lab) -> None:
    lab.add_domain("bulk.test", hosts=[2])
    smtp = await client(lab, 2)
    for i in range(120):
        await smtp.sendmail("a@sender.test", [f"u{i}@bulk.test"], MSG)
    await smtp.quit()
    assert len(await lab.wait_for_messages(120, timeout=1)) == 120
    assert lab.sinks[2].connections == 1


async def test_utf8_addresses_and_8bit_content(lab: Lab) -> None:
    lab.add_domain("bücher.test", behaviour="reject")
    smtp = await client(lab)
    body = "Subject: grüße\r\n\r\nçà\r\n".encode()
    errors, _ = await smtp.sendmail(
        "jörg@sender.test",
        ["zoë@inbox.test", "x@bücher.test"],
        body,
        mail_options=["BODY=8BITMIME", "SMTPUTF8"],
    )
    assert list(errors) == ["x@bücher.test"] and errors["x@bücher.test"].code == 550
    await smtp.quit()
    (got,) = lab.messages
    assert (got.mail_from, got.rcpt_tos, got.data) == ("jörg@sender.test", ["zoë@inbox.test"], body)


async def test_wait_for_messages_times_out_saying_how_many(lab: Lab) -> None:
    with pytest.raises(TimeoutError, match="0 of 1"):
        await lab.wait_for_messages(1, timeout=0.1)


async def test_stopping_frees_every_port() -> None:
    lab = Lab()
    async with lab:
        lab.add_domain("inbox.test")
        smtp = await client(lab)  # left open: stopping must cut it
        dns_host, dns_port = ns(lab)
        mx_port = lab.mx_port
    with pytest.raises(aiosmtplib.SMTPServerDisconnected):
        await smtp.noop()
    for host, port in [(s.host, mx_port) for s in lab.sinks] + [(dns_host, dns_port)]:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
            s.listen()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((dns_host, dns_port))
