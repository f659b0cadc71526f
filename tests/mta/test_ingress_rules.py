"""Pure pieces of the ingress: reply codes, bare newline detection, DATA limits."""

from __future__ import annotations

from typing import Any

import pytest

from postwarden.mta.ingress import add_enhanced_code, has_bare_newline, normalize_newlines


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


PATHS = [
    "<>", "<a@b.test>", "<a@b.test> SIZE=100 BODY=8BITMIME", "<first.last+tag@sub.b-c.test>",
    '<"q x"@b.test>', "a@b.test", "<a@[1.2.3.4]>", "<@r.test:a@b.test>", "<a@b.test>(c)",
    "<a..b@b.test>", "<.a@b.test>", "<a@b..test>", "<a@b.test", "<ü@b.test>", " <a@b.test>",
]  # fmt: skip


@pytest.mark.parametrize("arg", PATHS)
def test_fast_path_parsing_agrees_with_aiosmtpd(arg: str) -> None:
    from aiosmtpd.smtp import SMTP

    from postwarden.mta.wire import fast_getaddr

    fast = fast_getaddr(arg)
    if fast is None:
        return  # left to aiosmtpd's parser: nothing to compare
    reference = SMTP.__new__(SMTP)
    reference.local_part_limit = 0
    assert fast == SMTP._getaddr(reference, arg)


async def test_read_data_limits_and_pipelining() -> None:
    import asyncio

    from postwarden.mta.wire import read_data

    async def feed(raw: bytes, size: int | None = 1000, line: int = 1000) -> tuple[Any, bytes]:
        reader = asyncio.StreamReader()
        reader.feed_data(raw)
        reader.feed_eof()
        result = await read_data(reader, size, line)
        return result, await reader.read()

    assert await feed(b".\r\nQUIT\r\n") == ((b"", None), b"QUIT\r\n")
    assert await feed(b"a\r\n..b\r\n.\r\n") == ((b"a\r\n.b\r\n", None), b"")
    # A bare LF before the dot does not end the data; only CRLF.CRLF does.
    assert await feed(b"a\n.\nb\r\n.\r\n") == ((b"a\n.\nb\r\n", None), b"")
    # RFC 5321 4.5.3.1.6: 1000 octets with the CRLF, not one more.
    (data, err), _ = await feed(b"x" * 998 + b"\r\n.\r\n", size=None)
    assert err is None and data == b"x" * 998 + b"\r\n"
    (_, err), _ = await feed(b"x" * 999 + b"\r\n.\r\n", size=None)
    assert err is not None and err.startswith("500")
    (_, err), rest = await feed(b"y\r\n" * 600 + b".\r\nNOOP\r\n")
    assert err is not None and err.startswith("552") and rest == b"NOOP\r\n"


def test_take_meta_ignores_mentions_and_reads_folded_fields() -> None:
    import base64
    import json

    from postwarden.mta.ingress import take_meta

    for msg in (
        b"Subject: about X-Postwarden-Meta\r\n\r\nbody\r\n",
        b"X-Postwarden-Meta-Foo: x\r\n\r\nbody\r\n",
        b"X-Postwarden-Meta : x\r\n\r\nbody\r\n",
    ):
        assert take_meta(msg) == (msg, None)
    value = base64.b64encode(json.dumps({"subject": "s" * 900, "tags": ["a"]}).encode())
    folded = b"\r\n ".join(value[i : i + 76] for i in range(0, len(value), 76))
    msg = b"From: a@b.test\r\nX-Postwarden-Meta: " + folded + b"\r\nSubject: x\r\n\r\nbody\r\n"
    out, meta = take_meta(msg)
    assert out == b"From: a@b.test\r\nSubject: x\r\n\r\nbody\r\n"
    assert meta is not None and meta["tags"] == ["a"] and meta["subject"] == "s" * 300
    # Garbage in the field: removed, and no meta.
    assert take_meta(b"X-Postwarden-Meta: !!!\r\n\r\nb\r\n") == (b"\r\nb\r\n", None)
