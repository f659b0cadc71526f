"""A report's MIME structure: its parts decoded to text, the report's own
human-readable text, the original message it quotes, and the messages of an mbox."""

from __future__ import annotations

import email
import email.errors
import functools
import re
from collections.abc import Iterator
from email.header import decode_header as _decode_words
from email.header import make_header
from email.message import Message
from email.policy import Compat32
from typing import Any

from postwarden.bounces.parse.htmltext import html_to_text
from postwarden.bounces.parse.report import MAX_HTML, MAX_TEXT


class _Compat32Text(Compat32):
    """compat32, except that a header with undecodable bytes reads as text too (not
    as a Header object): bounces quote whatever they were sent."""

    def header_fetch_parse(self, name: str, value: str) -> Any:
        got = super().header_fetch_parse(name, value)
        return got if isinstance(got, str) else str(got)


POLICY = _Compat32Text()

# Where the copy of the original message starts in a bounce's text.
ORIGINAL_MARKERS = re.compile(
    r"^[ \t>]*+(?:"
    r"-+ ?(?:This is a copy of|Below this line is a copy|The header of the original|"
    r"Original message|Original Message|Returned message|Message text follows|"
    r"Undelivered message headers|Unsent message below|The original message|"
    r"Headers of the original|original message headers|Forwarded message|"
    r"Copy of the original)"
    r"|--- ?Original message follows"
    r"|------ ?original message"
    r"|Original message follows"
    r"|Original message headers:"
    r"|\*\*\* Original message"
    r"|Below this line is a copy of the message"
    r"|Your message reads \(in part\)"
    r"|-+ ?Original-Message"
    r"|Message headers follow"
    r"|Content-Type: *(?:message/rfc822|text/rfc822-headers|message/global)"
    r"|[-=*_ ]*(?:the |your )?(?:original|returned|undelivered|unsent|rejected) message"
    r"(?: headers)?(?: text)?(?: follows| below| is attached| was)?[-=*_ :.]*$"
    r")",
    re.I | re.M,
)

ATTACHED = ("message/rfc822", "message/global", "message/partial")

_EOL_RE = re.compile(r"\r+\n?")

# The parser reads a report's text several times (for the original, the fields, the
# recipients): each HTML part is read once.
_shown = functools.lru_cache(maxsize=8)(html_to_text)


def decode_header(value: str | None) -> str:
    """A header value with its RFC 2047 encoded words decoded ("" when absent)."""
    if not value:
        return ""
    try:
        return str(make_header(_decode_words(value)))
    except (UnicodeError, LookupError, ValueError, email.errors.HeaderParseError):
        return str(value)


def part_text(part: Message) -> str:
    """A part's text, decoded, with LF line endings (base64 and quoted-printable parts
    carry their own CRLF)."""
    payload = part.get_payload(decode=True)
    if not isinstance(payload, bytes):
        p = part.get_payload()
        text = p if isinstance(p, str) else ""
    else:
        charset = part.get_content_charset() or "utf-8"
        for cs in (charset, "utf-8", "latin-1"):
            try:
                text = payload.decode(cs)
                break
            except (LookupError, UnicodeDecodeError):
                continue
        else:
            text = payload.decode("latin-1")
    return _EOL_RE.sub("\n", text)


def walk(msg: Message) -> Iterator[tuple[Message, bool]]:
    """Every part, and whether it lies inside an attached message."""

    def rec(part: Message, inside: bool) -> Iterator[tuple[Message, bool]]:
        yield part, inside
        ctype = part.get_content_type()
        payload = part.get_payload()
        if isinstance(payload, list):
            for sub in payload:
                if isinstance(sub, Message):
                    yield from rec(
                        sub,
                        inside or ctype in ATTACHED,
                    )

    yield from rec(msg, False)


def body_text(msg: Message, *, cut: bool = True) -> str:
    """The human-readable text of the report itself (not of the original); ``cut``: up
    to where a copy of the original starts."""
    texts: list[str] = []
    html: list[Message] = []
    # Text parts that are not the field blocks of a report part (delivery-status,
    # disposition-notification, feedback-report).
    human = 0
    fields = {
        id(block)
        for part, _inside in walk(msg)
        if part.get_content_maintype() == "message"
        and part.get_content_type() not in ATTACHED
        and isinstance(part.get_payload(), list)
        for block in part.get_payload()
    }
    for part, inside in walk(msg):
        if inside or part.is_multipart():
            continue
        ctype = part.get_content_type()
        if part.get_content_maintype() == "multipart":
            # Broken MIME (a boundary that never occurs): the whole body as text.
            texts.append(part_text(part))
            human += 1
        elif ctype == "text/plain" or ctype == "text/enriched":
            texts.append(part_text(part))
            human += id(part) not in fields
        elif ctype == "text/html":
            html.append(part)
        elif part.get_content_maintype() == "message":
            continue
        elif ctype == "text/delivery-status" or ctype.startswith("text/"):
            texts.append(part_text(part))
    if not human and html:
        # An HTML-only report (Exchange and others): what it shows, then any fields.
        shown: list[str] = []
        budget = MAX_HTML
        for part in html:
            if budget <= 0:
                break
            markup = part_text(part)[:budget]
            budget -= len(markup)
            shown.append(_shown(markup))
        texts = shown + texts
    text = "\n".join(texts)[:MAX_TEXT]
    if cut:
        m = ORIGINAL_MARKERS.search(text)
        if m and m.start() > 0:
            text = text[: m.start()]
    return text


def original_of(msg: Message) -> Message | None:
    """The message a report is about: attached, attached as headers, or inlined in its
    text after a marker ("----- Original message -----")."""
    for part, _inside in walk(msg):
        ctype = part.get_content_type()
        if ctype in ("message/rfc822", "message/global", "message/rfc822-headers"):
            payload = part.get_payload()
            if isinstance(payload, list) and payload and isinstance(payload[0], Message):
                return payload[0]
        if ctype in ("text/rfc822-headers", "text/rfc822", "message/rfc822-headers"):
            return email.message_from_string(part_text(part), policy=POLICY)
    body = body_text(msg, cut=False)
    m = ORIGINAL_MARKERS.search(body)
    if m:
        rest = body[m.end() :].split("\n", 1)[-1].lstrip("\n")
        # Inlined: "Received: ...\nFrom: ...\n" with or without indentation.
        rest = re.sub(r"^[ \t]+(?=[A-Za-z-]+:)", "", rest, flags=re.M)
        orig = email.message_from_string(rest, policy=POLICY)
        if len(orig.keys()) >= 2:
            return orig
    return None


_MBOX_FROM = re.compile(rb"^From \S+ +\w{3} \w{3} +\d+ \d\d:\d\d(:\d\d)? .*\d{4}\s*$", re.M)


def split_mbox(data: bytes) -> list[bytes]:
    """The messages of an mbox file (``From `` lines between them); a plain message is
    one. Saved mailboxes of bounces come this way."""
    if not data.startswith(b"From "):
        return [data]
    starts = [m.start() for m in _MBOX_FROM.finditer(data)]
    if not starts or starts[0] != 0:
        return [data]
    out = []
    for i, start in enumerate(starts):
        end = starts[i + 1] if i + 1 < len(starts) else len(data)
        chunk = data[start:end]
        chunk = chunk.split(b"\n", 1)[1] if b"\n" in chunk else b""
        out.append(re.sub(rb"(?m)^>(>*From )", rb"\1", chunk))
    return out
