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
    ("diagnostic", "status", "human", "hard"),
    [
        # A bare remote answer, relayed with no enhanced code and no command: after
        # DATA it would be a content filter's, so it is not proof.
        (
            "550 <rcpt@remote.example>: User unknown",
            "5.0.0",
            "<rcpt@remote.example>: host mx.remote.example said: 550 User unknown",
            False,
        ),
        # The same answer to RCPT TO is proof.
        (
            "550 <rcpt@remote.example>: User unknown",
            "5.0.0",
            "<rcpt@remote.example>: host mx.remote.example said: 550 User unknown"
            " (in reply to RCPT TO command)",
            True,
        ),
        # So is a precise enhanced code.
        (
            "550 5.1.1 <rcpt@remote.example>: User unknown",
            "5.1.1",
            "<rcpt@remote.example>: host mx.remote.example said: 550 5.1.1 User unknown",
            True,
        ),
    ],
)
def test_what_makes_a_relayed_user_unknown_hard(
    diagnostic: str, status: str, human: str, hard: bool
) -> None:
    [f] = Parser().parse_bytes(postfix_dsn(diagnostic, status, human)).findings
    assert (f.recipient, f.reason, f.hard) == ("rcpt@remote.example", "user_unknown", hard)


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
