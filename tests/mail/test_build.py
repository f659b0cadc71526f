"""Building API and campaign messages: header values in ASCII are written as given,
folded only at their spaces, never turned into RFC 2047 encoded words (a long URI
in List-Unsubscribe stays a URI); other values keep the email package's encoding."""

from __future__ import annotations

import email
import email.message
import email.policy
import re

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

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


# ---------------------------------------------------------------- build_alternative

BODIES = [
    ("Hi Zoë,\nyour order = 42 is ready.  \n" + "long line " * 30 + "\n", None),
    (None, "<html><body><p>Hi Zoë</p>" + "<td>cell</td>" * 200 + "</body></html>"),
    ("plain\r\nwith CRLF\rand CR", "<p>=3D is not an escape here; neither is =_x</p>\n\n"),
    ("no newline at the end ", "<p>trailing space </p>"),
]


@pytest.mark.parametrize(("text", "html"), BODIES)
@pytest.mark.parametrize("name", ["Ann", "Zoë Ünïcode", ""])
def test_build_alternative_says_what_build_says(text: str | None, html: str | None,
                                                name: str) -> None:  # fmt: skip
    from postwarden.mail.build import build_alternative

    draft = Draft(
        Mailbox("news@acme.test", "Acme Nëws"),
        [Mailbox("b@inbox.test", name)],
        reply_to=Mailbox("help@acme.test"),
        subject="Ünïcode subject " + "word " * 30,
        text=text,
        html=html,
        headers=[("List-Unsubscribe", f"<https://pw.test/u/{TOKEN}>"), ("Feedback-ID", "c1:t1")],
    )
    fast = build_alternative(draft, message_id="<m@acme.test>", date=1_700_000_000)
    slow = build(draft, message_id="<m@acme.test>", date=1_700_000_000)
    # CRLF only, and lines within SMTP's limit.
    assert b"\r\n" in fast and not fast.replace(b"\r\n", b"").count(b"\n")
    assert not fast.replace(b"\r\n", b"").count(b"\r")
    assert max(len(line) for line in fast.split(b"\r\n")) <= 998
    a = email.message_from_bytes(fast, policy=email.policy.default)
    b = email.message_from_bytes(slow, policy=email.policy.default)
    for field in ("From", "To", "Reply-To", "Subject", "Date", "Message-ID", "List-Unsubscribe",
                  "Feedback-ID", "MIME-Version"):  # fmt: skip
        assert str(a[field]) == str(b[field]), field
    assert a.get_content_type() == b.get_content_type()
    for kind in ("plain", "html"):
        pa, pb = a.get_body((kind,)), b.get_body((kind,))
        assert (pa is None) == (pb is None), kind
        if pa is not None and pb is not None:
            assert pa.get_content() == pb.get_content(), kind
    assert not a.defects and all(not p.defects for p in a.walk())


def test_build_alternative_leaves_the_rest_to_build() -> None:
    from postwarden.mail.build import Part, build_alternative

    with_file = Draft(Mailbox("n@acme.test"), [Mailbox("b@inbox.test")], text="x",
                      attachments=[Part("a.txt", "text/plain", b"data")])  # fmt: skip
    parsed = email.message_from_bytes(
        build_alternative(with_file, message_id="<m@a.test>", date=0), policy=email.policy.default
    )
    assert parsed.get_content_type() == "multipart/mixed"
    utf8 = Draft(Mailbox("n@acme.test"), [Mailbox("zoë@inbox.test")], text="x")
    assert b"zo\xc3\xab@inbox.test" in build_alternative(utf8, message_id="<m@a.test>", date=0)
    with pytest.raises(BuildError):
        build_alternative(Draft(Mailbox("n@acme.test"), [Mailbox("b@inbox.test")]),
                          message_id="<m@a.test>", date=0)  # fmt: skip


# ---------------------------------------------------------------- plain header lines

_NAME = st.text(alphabet="Ab z'.!=?\"()<>@,;:\\[]é -", max_size=30)
_LOCAL = st.from_regex(r"[a-z0-9!#$%&'*+/=?^_`{|}~-]{1,8}(\.[a-z0-9_-]{1,5}){0,2}", fullmatch=True)
_MAILBOX = st.builds(
    Mailbox, st.builds("{}@{}".format, _LOCAL, st.sampled_from(["acme.test", "a-b.c1.test"])), _NAME
)
_PIECES = [*'ab =?_-\\"é\t<>:;', "x" * 30]
_VALUE = st.lists(st.sampled_from(_PIECES), max_size=20).map("".join)


@settings(max_examples=300, deadline=None)
@given(sender=_MAILBOX, to=st.lists(_MAILBOX, min_size=1, max_size=3),
       reply_to=st.none() | _MAILBOX, subject=_VALUE,
       extra=st.lists(st.tuples(st.sampled_from(["X-A", "Feedback-ID", "List-Id"]), _VALUE),
                      max_size=3),
       date=st.integers(0, 4_000_000_000))  # fmt: skip
@example(Mailbox("n@acme.test", "Acme News"), [Mailbox("b@acme.test", "Bo")], None,
         "word " * 16 + "end", [("X-A", "x " * 40 + "y")], 0)  # fmt: skip
@example(Mailbox("n@acme.test", "J. Smith"), [Mailbox("b@acme.test", "Zoë"),
         Mailbox("c@acme.test", 'say "hi"')], Mailbox("r@acme.test", "(x) <y>"),
         "=?utf-8?q?x?=", [("X-A", "tab\there")], 0)  # fmt: skip
def test_plain_lines_are_what_the_email_package_writes(
    sender: Mailbox, to: list[Mailbox], reply_to: Mailbox | None, subject: str,
    extra: list[tuple[str, str]], date: int,
) -> None:  # fmt: skip
    """The header fields written without the ``email`` package are byte for byte
    what it writes; values it must encode, quote or fold still go through it."""
    from postwarden.mail.build import _head, _header_fields

    draft = Draft(sender, to, reply_to=reply_to, subject=subject, text="x", headers=extra)
    try:
        msg = email.message.EmailMessage(policy=email.policy.SMTP)
        _header_fields(msg, draft, "<m@acme.test>", date)
        want = b"".join(email.policy.SMTP.fold_binary(k, v) for k, v in msg.raw_items())
    except BuildError:
        with pytest.raises(BuildError):
            _head(draft, "<m@acme.test>", date)
        return
    assert _head(draft, "<m@acme.test>", date) == want
