"""The cleanup stage's rules, directly: From parsed once and strictly, the header
finished, NUL and loops refused (the paths that use it are tested over sockets in
tests/mta/test_cleanup_smtp.py and tests/control/test_cleanup_api.py)."""

from __future__ import annotations

import dkim
import pytest

from postwarden.mail.cleanup import Cleanup, Origin, Rejected, parse_mailboxes, split_header

ORIGIN = Origin("ESMTPSA", "127.0.0.1", "client.test")


def clean(data: bytes, **kw: object) -> bytes:
    return Cleanup("mx.test").clean(data, msg_id="abc", origin=ORIGIN, **kw).message  # type: ignore[arg-type]


# What review found passing the tenant check as tenant.test while another domain was
# shown or signed, and the other ways an address hides in a From value.
HIDDEN = [
    b' a@tenant.test, "b" <@victim.test>',
    b" a@tenant.test(@victim.test",
    b" ceo@other.test x@tenant.test",
    b" ceo@other.test\x00x@tenant.test",
    b" a@tenant.test (comment)",
    b" (x@victim.test) a@tenant.test",
    b" undisclosed-recipients:;",
    b" group: a@tenant.test;",
    b" <@route.test:a@tenant.test>",
    b" a@[127.0.0.1]",
    b" a@tenant.test\x0bx",
    " Bob\u2028<a@tenant.test>".encode(),
    " Bob\u0085<a@tenant.test>".encode(),
    b" a@tenant.test\xff",
    b" <a@tenant.test",
    b" a@",
    b" ",
    b' "unterminated <a@tenant.test>',
    # Hostile: must fail fast (possessive quantifiers), not backtrack.
    b" " + b"a" * 3900 + b" <",
    b" " + b"a." * 1900 + b"(",
    b' "' + b"a " * 1900,
    b" " + b"a" * 5000 + b"@tenant.test",
]


@pytest.mark.parametrize("value", HIDDEN)
def test_from_values_that_hide_an_address_are_refused(value: bytes) -> None:
    with pytest.raises(Rejected) as exc:
        parse_mailboxes(value + b"\r\n", many=True)
    assert exc.value.reply.startswith("550 5.6.0 ") and exc.value.field == "from"


@pytest.mark.parametrize(
    ("value", "addresses"),
    [
        (b" a@tenant.test", ("a@tenant.test",)),
        (b" <a@tenant.test>", ("a@tenant.test",)),
        (b' "Doe, Jane" <jane@tenant.test>', ("jane@tenant.test",)),
        (b" John Q. Public <jqp@tenant.test>", ("jqp@tenant.test",)),
        (b" =?utf-8?q?J=C3=B6rg?= <j@tenant.test>", ("j@tenant.test",)),
        (" Jörg <jörg@bücher.test>".encode(), ("jörg@bücher.test",)),
        (b' "a@victim.test" <x@tenant.test>', ("x@tenant.test",)),
        (b' "q\\"x"@tenant.test', ('"q\\"x"@tenant.test',)),
        (b" Shop\r\n <shop@tenant.test>", ("shop@tenant.test",)),
        (b" A <a@t.test>,\r\n\tB <b@u.test>", ("a@t.test", "b@u.test")),
    ],
)
def test_plain_mailboxes_are_read(value: bytes, addresses: tuple[str, ...]) -> None:
    assert parse_mailboxes(value + b"\r\n", many=True) == addresses


def test_one_from_mailbox_unless_sender_and_the_signing_domain() -> None:
    stage = Cleanup("mx.test")

    def run(head: bytes) -> tuple[tuple[str, ...], str | None, tuple[str, ...]]:
        c = stage.clean(head + b"\r\n\r\nbody\r\n", msg_id="abc", origin=ORIGIN)
        return c.authors, c.signing_domain, c.domains

    assert run(b"From: Me <me@Acme.Test>") == (("me@Acme.Test",), "acme.test", ("acme.test",))
    assert run(b"Subject: no from") == ((), None, ())
    for head in (
        b"From: a@acme.test, b@acme.test",  # two authors and no Sender
        b"From: a@acme.test\r\nFrom: b@acme.test",  # two From fields
        b"From: a@acme.test\r\nSender: s@acme.test\r\nSender: t@acme.test",
        b"From: a@acme.test\r\nSender: s@acme.test, t@acme.test",  # Sender is one mailbox
    ):
        with pytest.raises(Rejected) as exc:
            run(head)
        assert exc.value.reply.startswith("550 5.6.0"), head
    # Several authors with a Sender: signed as the Sender's domain, every domain checked.
    authors, signing, domains = run(b"From: a@one.test, b@two.test\r\nSender: s@sender.test")
    assert authors == ("a@one.test", "b@two.test") and signing == "sender.test"
    assert domains == ("one.test", "two.test", "sender.test")


def test_header_finished_and_parsed_fields_match_the_message() -> None:
    stage = Cleanup("mx.test")
    c = stage.clean(
        b"From: a@x.test\r\nSubject: s\r\n\r\nDate: in the body\r\n",
        msg_id="abc",
        origin=Origin("ESMTPS", "127.0.0.1", "cli ent\r\n.test", tls="using TLSv1.3"),
        rcpt="r@inbox.test",
        now=0,
    )
    head, body = c.message.split(b"\r\n\r\n", 1)
    assert head.startswith(b"Received: from client.test ([127.0.0.1])\r\n\tby mx.test (Postwarden)")
    assert b"\r\n\t(using TLSv1.3)\r\n\twith ESMTPS id abc\r\n\tfor <r@inbox.test>; " in head
    assert b"\r\nMessage-ID: <abc@mx.test>\r\nDate: " in head
    assert body == b"Date: in the body\r\n" == c.body
    # What the signer is handed is exactly what a verifier parses from the message.
    assert dkim.rfc822_parse(c.message)[0] == c.headers
    kept = stage.clean(
        b"message-id: <m@x>\r\nDATE: Thu, 1 Jan 1970 00:00:00 +0000\r\n\r\nb\r\n",
        msg_id="abc",
        origin=ORIGIN,
    ).message
    assert kept.lower().count(b"message-id:") == 1 and kept.lower().count(b"\ndate:") == 1


def test_bcc_goes_and_a_line_that_is_no_field_starts_the_body() -> None:
    out = clean(b"From: a@x.test\r\nBcc: hidden@y.test\r\nSubject: s\r\n\r\nb\r\n")
    assert b"hidden" not in out and out.endswith(b"Subject: s\r\n\r\nb\r\n")
    # A line that is neither a field nor a continuation ends the header (Postfix's
    # rule): an empty line is put before it, so a From after it is body, not header.
    out = clean(b"From: a@x.test\r\nnot a field\r\nFrom: ceo@victim.test\r\n\r\nb\r\n")
    head, body = out.split(b"\r\n\r\n", 1)
    assert b"victim" not in head and body.startswith(b"not a field\r\nFrom: ceo@victim.test")
    assert split_header(b"Subject: only a header\r\n") == (
        [[b"Subject", b" only a header\r\n"]],
        24,
        True,
    )
    assert clean(b"Subject: x\r\n").endswith(b"Subject: x\r\n\r\n")
    assert clean(b"").endswith(b"\r\n\r\n") and clean(b"\r\nbody\r\n").endswith(b"\r\n\r\nbody\r\n")


def test_nul_and_mail_loops_are_refused() -> None:
    with pytest.raises(Rejected) as exc:
        clean(b"From: a@x.test\r\n\r\nbody\x00\r\n")
    assert exc.value.reply == "550 5.6.0 Message contains NUL characters"
    hops = b"Received: from a by b; Thu, 1 Jan 1970 00:00:00 +0000\r\n"
    assert clean(hops * 49 + b"From: a@x.test\r\n\r\nb\r\n").count(b"Received:") == 50
    with pytest.raises(Rejected) as exc:
        clean(hops * 50 + b"From: a@x.test\r\n\r\nb\r\n")
    assert exc.value.reply.startswith("554 5.4.6 Too many hops")
    # A lower limit is the operator's (smtp.hop_limit).
    with pytest.raises(Rejected):
        Cleanup("mx.test", hop_limit=3).clean(hops * 3, msg_id="a", origin=ORIGIN)
