"""The one classifier: SMTP answers seen during delivery and bounce diagnostics."""

from __future__ import annotations

from pathlib import Path

import pytest

from postwarden.bounces.classify import (
    Classifier,
    PatternsError,
    default_classifier,
    find_stage,
    find_status,
)

CASES = [
    # answer, stage, category, hard
    (
        "550-5.1.1 The email account that you tried to reach does not exist.",
        "rcpt",
        "user_unknown",
        True,
    ),
    (
        "550 5.1.1 <a@b.example>: Recipient address rejected: User unknown in virtual mailbox table",
        "rcpt",
        "user_unknown",
        True,
    ),
    ("550 Requested action not taken: mailbox unavailable", "rcpt", "user_unknown", True),
    (
        "550 5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient not found by SMTP address lookup",
        "rcpt",
        "user_unknown",
        True,
    ),
    ("556 5.1.10 Recipient address a@null.example has null MX", "rcpt", "null_mx", True),
    (
        "550 5.1.2 Host unknown (Name server: example.invalid: host not found)",
        "rcpt",
        "domain_not_found",
        True,
    ),
    (
        "452-4.2.2 The email account that you tried to reach is over quota.",
        "rcpt",
        "mailbox_full",
        False,
    ),
    ("552 5.2.2 Mailbox full", "data", "mailbox_full", False),
    (
        "550-5.2.1 The email account that you tried to reach is disabled.",
        "rcpt",
        "mailbox_disabled",
        False,
    ),
    (
        "550 5.7.1 Service unavailable; Client host [192.0.2.1] blocked using zen.spamhaus.org",
        "rcpt",
        "policy_blocked",
        False,
    ),
    ("554 5.7.1 <a@b.example>: Relay access denied", "rcpt", "relay_denied", False),
    (
        "550-5.7.26 This mail is unauthenticated, which poses a security risk to the sender and Gmail users",
        "data",
        "authentication_failed",
        False,
    ),
    (
        "550 5.7.1 This message was not accepted due to domain owner DMARC policy",
        "data",
        "authentication_failed",
        False,
    ),
    (
        "421-4.7.28 Our system has detected an unusual rate of unsolicited mail",
        "data",
        "rate_limited",
        False,
    ),
    (
        "421 4.7.0 [TSS04] Messages from 192.0.2.1 temporarily deferred due to unexpected volume or user complaints",
        "mail",
        "policy_blocked",
        False,
    ),
    ("552 5.3.4 Message size exceeds fixed limit", "data", "message_too_big", False),
    ("554 5.7.1 Message rejected: spam content detected", "data", "spam_content", False),
    ("550 5.7.1 Message contains a virus", "data", "spam_content", False),
    # A 5xx policy answer is soft: the address is good.
    (
        "554 5.7.1 Your access to this mail system has been rejected due to the sending MTA's poor reputation",
        "rcpt",
        "policy_blocked",
        False,
    ),
    # An address-like answer at MAIL FROM is about the sender, not the recipient.
    (
        "553 5.1.8 <s@sender.example>... Domain of sender address does not exist",
        "mail",
        "policy_blocked",
        False,
    ),
    # ... and at the end of DATA it comes from a content filter (soft, "filtered"),
    ("550 5.7.1 User unknown", "data", "filtered", False),
    # ... unless its code says the mailbox does not exist (RFC 3463 X.1.1) or the
    # account is disabled (X.7.13), which no filter needs to say.
    ("550 5.1.1 <a@b.example>... User unknown", "data", "user_unknown", True),
    ("525 5.7.13 Disabled recipient address", "data", "mailbox_disabled", False),
    # A security or policy status (X.7) is never about the address, whatever the
    # basic reply code (550 alone would read as an unknown user).
    ("550 5.7.0 Local Policy Violation", None, "policy_blocked", False),
    # Providers' published labels decide over the enhanced code (Facebook answers
    # 5.1.1 for an address that exists but refuses this mail).
    (
        "550 5.1.1 RCP-P2 http://postmaster.facebook.com/response_codes?ip=192.0.2.1#rcp "
        "Refused due to recipient preferences",
        "rcpt",
        "policy_blocked",
        False,
    ),
    (
        "550 5.1.1 RCP-P1 http://postmaster.facebook.com/response_codes#rcp "
        "Recipient does not exist",
        "rcpt",
        "user_unknown",
        True,
    ),
    ("550 Ip frequency limited [Blocked IP 192.0.2.22]", "rcpt", "rate_limited", False),
    # Google Groups refuses a post in the sender's language; its help centre's address
    # says whose letter it is.
    (
        "Dobrý den, skupina (libsisimai) pravděpodobně neexistuje nebo nemáte oprávnění"
        " ... https://groups.google.com/support/",
        None,
        "policy_blocked",
        False,
    ),
    # ... except where a provider refuses unknown users only there (Yahoo, AOL).
    (
        "554 delivery error: dd This user doesn't have a yahoo.com account (a@yahoo.com) [0]",
        "data",
        "user_unknown",
        True,
    ),
    # Answers from providers' published error lists.
    (
        "450-4.2.1 The user you are trying to contact is receiving mail too quickly.",
        "rcpt",
        "rate_limited",
        False,
    ),
    ("550 5.4.5 Daily user sending quota exceeded.", "mail", "rate_limited", False),
    ("552 5.2.0 Message size exceeds allowable limit", "data", "message_too_big", False),
    ("550 Mail content denied.", "data", "spam_content", False),
    ("554 Message not allowed - Headers are not RFC compliant[291]", "data", "spam_content", False),
    ("550 5.7.1 [CS01] Message rejected due to local policy.", "data", "policy_blocked", False),
    ("550 Rejected by header based Anti-Spoofing policy", "data", "authentication_failed", False),
    ("552 Mailbox size exceeds the allowable quota", "rcpt", "mailbox_full", False),
]


@pytest.mark.parametrize(("answer", "stage", "category", "hard"), CASES)
def test_answers(answer: str, stage: str, category: str, hard: bool) -> None:
    v = default_classifier().classify(text=answer, stage=stage)
    assert (v.category, v.hard) == (category, hard), answer


def test_codes_found_and_implied() -> None:
    c = default_classifier()
    assert find_status("host said: 550 5.1.1 <x@y>... User unknown") == "5.1.1"
    assert find_status("remote host 192.0.2.32 said: 550 no (#5.5.0)") == "5.5.0"
    assert find_status("connect to 192.0.2.5.25 failed") is None  # an address, not a code
    v = c.classify(text="550 Unknown user")
    # The code is what the server said (5.0.0 for a bare 550), never made up.
    assert (v.status, v.reply_code, v.category, v.hard) == ("5.0.0", 550, "user_unknown", True)
    # A temporary failure is never hard, whatever its text.
    assert c.classify(text="450 4.1.1 user unknown (try later)").hard is False
    # No code anywhere: the caller says whether the failure was final.
    assert c.classify(text="mailbox is full", permanent=False).status == "4.2.2"


def test_stage_from_texts() -> None:
    assert find_stage("(in reply to RCPT TO command)") == "rcpt"
    assert find_stage("(in reply to end of DATA command)") == "data"
    assert find_stage("SMTP error from remote mail server after MAIL FROM:<a@b> SIZE=10:") == "mail"
    assert (
        find_stage(">>> RCPT To:<a@b>\n<<< 550 5.1.1 unknown\n>>> DATA\n<<< 503 no rcpt") == "rcpt"
    )
    assert find_stage("Your message could not be delivered") is None
    # Wrapped anywhere; qmail's own words.
    assert find_stage("(in reply to\n    RCPT TO command)") == "rcpt"
    assert (
        find_stage("Remote host said: 550 no such user\ngiving up; does not like recipient.")
        == "rcpt"
    )
    assert find_stage("Connected to 192.0.2.1 but my name was rejected.") == "connect"
    assert find_stage("Connected to 192.0.2.1 but sender was rejected.") == "mail"
    assert find_stage("I connected but it failed after I sent the message.") == "data"


def test_operator_patterns_come_first(tmp_path: Path) -> None:
    f = tmp_path / "patterns.toml"
    f.write_text(
        '[[texts]]\ncategory = "mailbox_full"\npatterns = ["frobnicated"]\n\n'
        '[[codes]]\ncategory = "policy_blocked"\ncodes = ["5.1.1"]\n'
    )
    c = Classifier(f)
    assert c.classify(text="550 5.7.0 your mail was frobnicated").category == "mailbox_full"
    assert c.classify(text="550 5.1.1 go away").category == "policy_blocked"
    # The shipped rules still apply after the operator's.
    assert c.classify(text="552 5.3.4 message too big").category == "message_too_big"


def test_an_operator_rule_can_hold_at_any_stage(tmp_path: Path) -> None:
    f = tmp_path / "patterns.toml"
    f.write_text(
        '[[texts]]\ncategory = "user_unknown"\nany_stage = true\n'
        'patterns = ["no such customer here"]\n'
    )
    answer = "554 no such customer here"
    assert Classifier(f).classify(text=answer, stage="data").hard
    # Without the flag the end of DATA makes it a filter's refusal.
    f.write_text('[[texts]]\ncategory = "user_unknown"\npatterns = ["no such customer here"]\n')
    v = Classifier(f).classify(text=answer, stage="data")
    assert (v.category, v.hard) == ("filtered", False)


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ('[[texts]]\ncategory = "nope"\npatterns = ["x"]\n', "texts[0].category"),
        ('[[texts]]\ncategory = "other"\npatterns = ["("]\n', "texts[0].patterns[0]"),
        ('[[codes]]\ncategory = "other"\ncodes = ["5.1"]\n', "codes[0].codes[0]"),
        ('[[texts]]\ncategory = "other"\npattern = ["x"]\n', "texts[0]: unknown key"),
        ("[[texts]\n", "line 1"),
    ],
)
def test_bad_patterns_file(tmp_path: Path, text: str, where: str) -> None:
    f = tmp_path / "patterns.toml"
    f.write_text(text)
    with pytest.raises(PatternsError) as exc:
        Classifier(f)
    assert str(exc.value).startswith(f"{f}: ")
    assert where in str(exc.value)


def test_an_edited_patterns_file_is_read_again(tmp_path: Path) -> None:
    """A reload (SIGHUP) builds the classifier again: the file's new rules apply."""
    f = tmp_path / "patterns.toml"
    f.write_text('[[texts]]\ncategory = "mailbox_full"\npatterns = ["frobnicated"]\n')
    assert default_classifier(str(f)).classify(text="550 frobnicated").category == "mailbox_full"
    f.write_text('[[texts]]\ncategory = "rate_limited"\npatterns = ["frobnicated"]\n')
    assert default_classifier(str(f)).classify(text="550 frobnicated").category == "rate_limited"
    assert default_classifier() is default_classifier()  # the shipped rules, built once


@pytest.mark.parametrize(
    ("answer", "stage", "category", "hard", "basis", "weak"),
    [
        ("550 5.1.1 <a@b.example>: Recipient address rejected: User unknown", "rcpt",
         "user_unknown", True, "text", False),
        ("550 5.2.2 over the limit", "rcpt", "mailbox_full", False, "code", False),
        ("550 5.7.0 frobnicated", "rcpt", "policy_blocked", False, "subject", False),
        # A basic reply code alone: RFC 5321's 550 is also a refusal "for policy
        # reasons", so an unknown user read from it alone is never hard.
        ("550 go away", "rcpt", "user_unknown", False, "reply", True),
        ("it did not work", None, "other", False, "none", True),
        ("550 5.7.1 User unknown", "data", "filtered", False, "text", True),
    ],
)  # fmt: skip
def test_what_decided_and_whether_it_is_weak(
    answer: str, stage: str | None, category: str, hard: bool, basis: str, weak: bool
) -> None:
    v = default_classifier().classify(text=answer, stage=stage)
    assert (v.category, v.hard, v.basis, v.weak) == (category, hard, basis, weak)
