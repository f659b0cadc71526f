"""Pure pieces of the ingress: reply codes, bare newline detection, header fix-ups."""

from __future__ import annotations

from postwarden.mta.ingress import (
    add_enhanced_code,
    finalize_headers,
    has_bare_newline,
    normalize_newlines,
    received_header,
)


def test_enhanced_codes_added_only_where_missing() -> None:
    assert add_enhanced_code(b"250 OK") == b"250 2.0.0 OK"
    assert (
        add_enhanced_code(b"552 Error: Too much mail data")
        == b"552 5.3.4 Error: Too much mail data"
    )
    assert add_enhanced_code(b"500 Line too long") == b"500 5.5.2 Line too long"
    assert add_enhanced_code(b"250 2.1.5 Recipient OK") == b"250 2.1.5 Recipient OK"
    assert add_enhanced_code(b"354 End data with <CR><LF>.<CR><LF>").startswith(b"354 End")
    assert add_enhanced_code(b"220 host ESMTP") == b"220 host ESMTP"


def test_bare_newline_detection() -> None:
    assert not has_bare_newline(b"a\r\nb\r\n")
    assert has_bare_newline(b"a\nb\r\n")
    assert has_bare_newline(b"a\r\nb\r.\r\n")
    assert has_bare_newline(b"a\r\n.\nb\r\n")
    assert normalize_newlines(b"a\nb\rc\r\nd") == b"a\r\nb\r\nc\r\nd"


def test_headers_added_when_missing_and_kept_when_present() -> None:
    rcv = received_header(
        helo="client.test",
        client_ip="127.0.0.1",
        hostname="mx.test",
        protocol="ESMTPS",
        msg_id="abc",
        rcpt="r@x.test",
        now=0,
    )
    assert rcv.startswith(b"Received: from client.test ([127.0.0.1])\r\n\tby mx.test")
    assert b"\r\n\r\n" not in rcv and rcv.endswith(b"\r\n")
    assert all(line.endswith(b"\r") or not line for line in rcv.split(b"\n")[:-1])
    bare = finalize_headers(
        b"Subject: x\r\n\r\nbody\r\n", received=rcv, msg_id="abc", hostname="mx.test", now=0
    )
    assert b"\r\nMessage-ID: <abc@mx.test>\r\n" in bare
    assert b"\r\nDate: " in bare
    assert bare.endswith(b"Subject: x\r\n\r\nbody\r\n")
    full = finalize_headers(
        b"message-id: <m@x>\r\nDATE: Thu, 1 Jan 1970 00:00:00 +0000\r\n\r\nbody\r\n",
        received=rcv,
        msg_id="abc",
        hostname="mx.test",
    )
    assert b"Message-ID: <abc@mx.test>" not in full
    assert full.lower().count(b"message-id:") == 1 and full.lower().count(b"\ndate:") == 1
    # "Date:" inside the body is not a header.
    body_only = finalize_headers(
        b"Subject: x\r\n\r\nDate: nope\r\n", received=rcv, msg_id="abc", hostname="mx.test"
    )
    assert body_only.lower().count(b"date:") == 2
