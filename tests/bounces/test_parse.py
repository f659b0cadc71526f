"""The parser on reports built here: what makes a relayed "user unknown" hard, and
free-text bounces that list several recipients."""

from __future__ import annotations

from email.message import EmailMessage

import pytest

from postwarden.bounces.parse import Parser


def postfix_dsn(diagnostic: str, status: str, human: str) -> bytes:
    """A Postfix-style RFC 3464 report for rcpt@remote.example."""
    return (
        "From: MAILER-DAEMON@relay.example (Mail Delivery System)\n"
        "To: sender@app.example\n"
        "Subject: Undelivered Mail Returned to Sender\n"
        "MIME-Version: 1.0\n"
        'Content-Type: multipart/report; report-type=delivery-status; boundary="B"\n\n'
        "--B\n"
        "Content-Type: text/plain\n\n"
        "This is the mail system at host relay.example.\n\n"
        "I'm sorry to have to inform you that your message could not\n"
        f"be delivered to one or more recipients.\n\n{human}\n\n"
        "--B\n"
        "Content-Type: message/delivery-status\n\n"
        "Reporting-MTA: dns; relay.example\n\n"
        "Final-Recipient: rfc822; rcpt@remote.example\n"
        "Action: failed\n"
        f"Status: {status}\n"
        "Remote-MTA: dns; mx.remote.example\n"
        f"Diagnostic-Code: smtp; {diagnostic}\n\n"
        "--B--\n"
    ).encode()


@pytest.mark.parametrize(
    ("diagnostic", "status", "human", "reason", "hard"),
    [
        # A bare remote answer, relayed with no enhanced code and no command: after
        # DATA it would be a content filter's, so it is not proof ("filtered", soft;
        # it still counts towards the soft-bounce limit).
        (
            "550 <rcpt@remote.example>: User unknown",
            "5.0.0",
            "<rcpt@remote.example>: host mx.remote.example said: 550 User unknown",
            "filtered",
            False,
        ),
        # The same answer to RCPT TO is proof.
        (
            "550 <rcpt@remote.example>: User unknown",
            "5.0.0",
            "<rcpt@remote.example>: host mx.remote.example said: 550 User unknown"
            " (in reply to RCPT TO command)",
            "user_unknown",
            True,
        ),
        # So is a precise enhanced code.
        (
            "550 5.1.1 <rcpt@remote.example>: User unknown",
            "5.1.1",
            "<rcpt@remote.example>: host mx.remote.example said: 550 5.1.1 User unknown",
            "user_unknown",
            True,
        ),
    ],
)
def test_what_makes_a_relayed_user_unknown_hard(
    diagnostic: str, status: str, human: str, reason: str, hard: bool
) -> None:
    [f] = Parser().parse_bytes(postfix_dsn(diagnostic, status, human)).findings
    assert (f.recipient, f.reason, f.hard) == ("rcpt@remote.example", reason, hard)


def test_a_free_text_bounce_keeps_each_recipient_its_own_reason() -> None:
    msg = EmailMessage()
    msg["From"] = "MAILER-DAEMON@yahoo.example"
    msg["To"] = "sender@app.example"
    msg["Subject"] = "Failure Notice"
    msg.set_content(
        "Sorry, we were unable to deliver your message to the following address.\n\n"
        "<gone@yahoo.example>:\n"
        "This user doesn't have a yahoo.example account (gone@yahoo.example) [0]\n\n"
        "<off@yahoo.example>:\n"
        "Sorry your message to off@yahoo.example cannot be delivered. "
        "This account has been disabled or discontinued [#102].\n\n"
        "--- Original message follows.\n"
    )
    findings = Parser().parse_bytes(msg.as_bytes()).findings
    got = {f.recipient: (f.reason, f.hard) for f in findings}
    assert got == {
        "gone@yahoo.example": ("user_unknown", True),
        "off@yahoo.example": ("mailbox_disabled", False),
    }
    # Each diagnostic is its own recipient's block, not the next one's text too.
    gone = next(f for f in findings if f.recipient == "gone@yahoo.example")
    assert "doesn't have" in gone.diagnostic and "off@" not in gone.diagnostic


def _report(body: str, subject: str = "Undelivered Mail Returned to Sender") -> bytes:
    return (
        f"From: MAILER-DAEMON@mx.example.net\nTo: sender@app.example\nSubject: {subject}\n"
        "MIME-Version: 1.0\n" + body
    ).encode()


def _verdicts(data: bytes) -> list[tuple[object, ...]]:
    return [(f.recipient, f.reason, f.hard) for f in Parser().parse_bytes(data).findings]


def test_an_attached_original_that_reads_like_a_bounce_is_still_the_original() -> None:
    """Only a bounce forwarded as an attachment is read inside it: our own mail quoted
    by a bounce that names nobody stays the mail the bounce is about."""
    data = _report(
        'Content-Type: multipart/mixed; boundary="B"\n\n--B\nContent-Type: text/plain\n\n'
        "Your message could not be delivered.\n"
        "The recipient's mailbox is full (552 quota exceeded).\n\n"
        "--B\nContent-Type: message/rfc822\n\n"
        "From: Shop <orders@shop.example>\nTo: alice@example.net\nSubject: Shipped\n\n"
        "Your parcel could not be delivered yesterday. Questions? help@support.example\n"
        "\n--B--\n",
        subject="Undeliverable: Shipped",
    )
    assert _verdicts(data) == [("alice@example.net", "mailbox_full", False)]


def test_a_message_id_line_does_not_hide_the_recipient_after_it() -> None:
    data = _report(
        "Content-Type: text/plain\n\nYour message\n  Message-ID: <20240101.abc@shop.example>\n\n"
        "<alice@example.org>: host mx.example.org said: 550 5.1.1 user unknown"
        " (in reply to RCPT TO command)\n"
    )
    assert _verdicts(data) == [("alice@example.org", "user_unknown", True)]


def test_boilerplate_about_viruses_and_policies_is_no_reason() -> None:
    """The remote answer (a line with a reply code) decides, not the notice around it."""
    data = _report(
        'Content-Type: multipart/report; report-type=delivery-status; boundary="B"\n\n'
        "--B\nContent-Type: text/plain\n\n"
        "Your message could not be delivered to one or more recipients.\n"
        "For our acceptable use policy see http://example.net/aup . Messages are\n"
        "scanned for viruses and may be held for review. Large messages may be refused.\n"
        "Recipient: alice (at) example.org\n"
        "Result: 550 5.1.1 mailbox unavailable: user unknown\n\n"
        "--B\nContent-Type: message/delivery-status\n\nReporting-MTA: dns; mx.example.net\n\n"
        "Final-Recipient: rfc822; alice@example.org\nAction: failed\nStatus: 5.0.0\n\n--B--\n"
    )
    assert _verdicts(data) == [("alice@example.org", "user_unknown", True)]


def test_html_with_characters_that_grow_when_lowercased() -> None:
    html = "<p>İİİ</p><style>p{}</style>alice@example.org: 550 5.1.1 user unknown<br>Bye"
    data = _report(f"Content-Type: text/html; charset=utf-8\n\n{html}\n")
    assert _verdicts(data) == [("alice@example.org", "user_unknown", True)]


@pytest.mark.parametrize(
    ("answer", "verdict"),
    [
        # Yahoo's unknown user holds whatever the stage, even unnamed.
        (
            "554 delivery error: dd This user doesn't have a yahoo.com account",
            ("user_unknown", True),
        ),
        # A refusal of the sender is no unknown recipient.
        (
            "550 Sender doesn't have a valid account (in reply to MAIL FROM command)",
            ("policy_blocked", False),
        ),
    ],
)
def test_which_account_is_missing(answer: str, verdict: tuple[str, bool]) -> None:
    data = _report(f"Content-Type: text/plain\n\n<gone@yahoo.com>:\n{answer}\n")
    assert _verdicts(data) == [("gone@yahoo.com", *verdict)]
