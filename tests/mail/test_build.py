"""Building API and campaign messages: header values in ASCII are written as given,
folded only at their spaces, never turned into RFC 2047 encoded words (a long URI
in List-Unsubscribe stays a URI); other values keep the email package's encoding."""

from __future__ import annotations

import email
import email.policy
import re

import pytest

from postwarden.mail.build import BuildError, Draft, Mailbox, build

TOKEN = "AQ" + "x7_-" * 12


def built(headers: list[tuple[str, str]]) -> bytes:
    draft = Draft(Mailbox("news@acme.test"), [Mailbox("b@inbox.test")], text="hi", headers=headers)
    return build(draft, message_id="<m@acme.test>", date=0)


def raw_field(message: bytes, name: str) -> bytes:
    head = message.split(b"\r\n\r\n", 1)[0]
    m = re.search(rb"^" + name.encode() + rb":((?:[^\r]*)(?:\r\n[ \t][^\r]*)*)", head, re.M)
    assert m is not None, name
    return m.group(1)


def test_a_long_list_unsubscribe_stays_two_uris() -> None:
    value = (
        f"<https://unsubscribe.mail.example.com/u/{TOKEN}>,"
        f" <mailto:unsubscribe+{TOKEN}@pwb.newsletters.example.com>"
    )
    out = built(
        [("List-Unsubscribe", value), ("List-Unsubscribe-Post", "List-Unsubscribe=One-Click")]
    )
    raw = raw_field(out, "List-Unsubscribe")
    assert b"=?" not in raw
    # Folded once, between the URIs, and the first URI on the field's own line.
    assert (
        raw
        == (
            f" <https://unsubscribe.mail.example.com/u/{TOKEN}>,\r\n"
            f" <mailto:unsubscribe+{TOKEN}@pwb.newsletters.example.com>"
        ).encode()
    )
    assert raw.replace(b"\r\n", b"").strip().decode() == value
    msg = email.message_from_bytes(out, policy=email.policy.SMTP)
    assert re.sub(r"\r?\n", "", str(msg["List-Unsubscribe"])) == value
    assert msg["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"


def test_ascii_values_fold_at_spaces_and_unfold_as_given() -> None:
    long = " ".join(f"w{i}" for i in range(60))
    out = built([("X-Short", "a  b"), ("X-Long", long), ("X-Word", "y" * 120)])
    assert raw_field(out, "X-Short") == b" a  b"
    raw = raw_field(out, "X-Long")
    assert raw.count(b"\r\n") >= 2
    assert all(len(line) <= 78 for line in (b"X-Long:" + raw).split(b"\r\n"))
    assert raw.replace(b"\r\n", b"").strip().decode() == long
    # A word longer than a line: on its own line as it is, not encoded.
    assert raw_field(out, "X-Word") == b" " + b"y" * 120


def test_non_ascii_values_are_still_encoded() -> None:
    raw = raw_field(built([("X-Note", "héllo wörld")]), "X-Note")
    assert b"=?utf-8?" in raw
    with pytest.raises(BuildError):
        built([("X-Bad", "a\r\nBcc: c@d.test")])
