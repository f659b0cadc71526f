"""The cleanup stage: what every message passes before the spool, whatever its path.

Like Postfix's ``cleanup``, this is the one place where a message's header is read and
finished. SMTP submission, the HTTP API and the appliance's own DSNs (and campaigns and
journeys after them) hand their bytes here, and get back a :class:`Cleaned` message or
a :class:`Rejected` answer:

* NUL anywhere is refused (``550 5.6.0``): it has no place in mail and receivers
  truncate or split on it.
* The header is split into fields once. A line that is neither a field nor a folded
  continuation ends the header (as in Postfix): the rest is body, and an empty line is
  put before it so that no receiver reads it as header.
* ``Bcc`` fields are taken out (they would show blind recipients to everyone).
* More ``Received`` fields than ``smtp.hop_limit`` is a mail loop (``554 5.4.6``).
* ``From`` is parsed once, by :func:`parse_mailboxes` (strict RFC 5322: no comments,
  groups, domain literals or obsolete forms that can hide an address; no control
  characters). It must hold exactly one mailbox unless a ``Sender`` field names one.
  The domains found are what the tenant check reads, and the signing domain is decided
  here, once, and carried to the DKIM signer with the parsed fields.
* ``Received`` (our trace line) is prepended; ``Message-ID`` and ``Date`` are added when
  missing.

Pure functions over bytes: no I/O, so every rule is tested directly.
"""

from __future__ import annotations

import email.utils
import re
from dataclasses import dataclass

Header = list[bytes]  # [name, value]: the value keeps its leading space and CRLFs


class Rejected(ValueError):
    """The message cannot pass cleanup: the SMTP reply, the API field it concerns and
    a short reason (the label of the refusal counter)."""

    def __init__(
        self, code: int, status: str, text: str, *, field: str = "body", reason: str
    ) -> None:
        super().__init__(text)
        self.code, self.status, self.text = code, status, text
        self.field, self.reason = field, reason

    @property
    def reply(self) -> str:
        return f"{self.code} {self.status} {self.text}"


@dataclass(frozen=True)
class Origin:
    """Who handed the message in, for the ``Received`` line."""

    protocol: str  # "ESMTPSA", "SMTP", "HTTP", "local" ...
    client_ip: str = ""
    helo: str = ""
    tls: str | None = None  # "using TLSv1.3 with cipher ..."


@dataclass(frozen=True)
class Cleaned:
    """A message ready for the spool, with what cleanup found in it."""

    message: bytes
    headers: list[Header]  # the message's header fields, ours included, in order
    body_offset: int  # where the body starts in ``message``
    authors: tuple[str, ...]  # the From mailboxes' addresses (empty: no From)
    sender: str | None  # the Sender mailbox, when given
    signing_domain: str | None  # the DKIM d= domain: the author's (or Sender's) domain

    @property
    def body(self) -> bytes:
        return self.message[self.body_offset :]

    @property
    def domains(self) -> tuple[str, ...]:
        """Every domain the message claims to come from (From mailboxes and Sender)."""
        found = [domain_of(a) for a in (*self.authors, *((self.sender,) if self.sender else ()))]
        return tuple(dict.fromkeys(found))


def domain_of(address: str) -> str:
    return address.rpartition("@")[2].lower()


# ---------------------------------------------------------------- From and Sender

# RFC 5322 3.2.3 and 3.4, with RFC 6532's UTF-8 (no C1 controls, no line or paragraph
# separators). Quantifiers are possessive: adjacent atoms cannot be re-split, so a
# hostile value fails in linear time.
_UTF8 = "\u00a0-\u2027\u202a-\U0010ffff"
_ATEXT = rf"[A-Za-z0-9!#$%&'*+/=?^_`{{|}}~\-{_UTF8}]"
_ATOM = rf"{_ATEXT}++"
_DOT_ATOM = rf"{_ATOM}(?:\.{_ATOM})*+"
_QTEXT = rf"[\x21\x23-\x5b\x5d-\x7e{_UTF8}]"
_QUOTED = rf'"(?:[ \t]*+(?:{_QTEXT}|\\[\x20-\x7e\t]))*+[ \t]*+"'
_WORD = rf"(?:{_ATOM}|{_QUOTED})"
# A display name is words; a "." between them (obs-phrase: "John Q. Public") is kept,
# since it hides nothing.
_PHRASE = rf"{_WORD}(?:[ \t]*+(?:{_WORD}|\.))*+"
_ADDR = rf"(?:{_DOT_ATOM}|{_QUOTED})@{_DOT_ATOM}"
_MAILBOX = re.compile(rf"[ \t]*+(?:(?:{_PHRASE})?+[ \t]*+<({_ADDR})>|({_ADDR}))[ \t]*+")
_FOLD = re.compile(r"\r\n(?=[ \t])")
_CONTROL = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029]")
MAX_ADDRESS_FIELD = 4000  # characters of an unfolded From or Sender value


def parse_mailboxes(value: bytes, *, many: bool) -> tuple[str, ...]:
    """The addresses of a From (``many``: a mailbox list) or Sender (one mailbox) value.

    Raises :class:`Rejected` for anything that is not plain RFC 5322 mailbox syntax:
    control characters, comments, groups, domain literals, source routes, a second
    address after the first without a comma, an empty list."""
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError:
        raise _bad_from("is not UTF-8") from None
    text = _FOLD.sub("", text).rstrip("\r\n")
    if len(text) > MAX_ADDRESS_FIELD:
        raise _bad_from("is too long")
    if _CONTROL.search(text):
        raise _bad_from("contains control characters")
    found = []
    pos = 0
    while True:
        m = _MAILBOX.match(text, pos)
        if m is None:
            raise _bad_from("is not a list of mailboxes (name <local@domain>)")
        found.append(m.group(1) or m.group(2))
        pos = m.end()
        if pos == len(text):
            break
        if text[pos] != "," or not many:
            raise _bad_from("holds something after an address")
        pos += 1
    return tuple(found)


def _bad_from(why: str) -> Rejected:
    return Rejected(550, "5.6.0", f"From or Sender {why}", field="from", reason="bad_from")


# ---------------------------------------------------------------- the header

_FIELD = re.compile(rb"([\x21-\x39\x3b-\x7e]+):([^\r\n]*+\r\n(?:[ \t][^\r\n]*+\r\n)*+)")


def split_header(data: bytes) -> tuple[list[Header], int, bool]:
    """(fields, where the body starts, whether an empty line must be put before it).

    The header ends at the first empty line, or at the first line that is no field
    (then the body starts at that line and needs the empty line)."""
    fields: list[Header] = []
    pos, end = 0, len(data)
    match = _FIELD.match
    while pos < end:
        m = match(data, pos)
        if m is None:
            if data.startswith(b"\r\n", pos):
                return fields, pos + 2, False
            return fields, pos, True
        fields.append([m.group(1), m.group(2)])
        pos = m.end()
    return fields, end, True


def received_header(
    origin: Origin, *, hostname: str, msg_id: str, rcpt: str | None, now: float | None = None
) -> bytes:
    """An RFC 5321 section 4.4 trace field, folded with CRLF + tab."""
    date = email.utils.formatdate(now, localtime=True)
    helo = re.sub(r"[^A-Za-z0-9.\-\[\]:_]", "", origin.helo)[:200] or "unknown"
    ip = re.sub(r"[^0-9A-Fa-f.:]", "", origin.client_ip)[:64]
    lines = [f"Received: from {helo}" + (f" ([{ip}])" if ip else ""), f"by {hostname} (Postwarden)"]
    if origin.tls:
        lines.append(f"({origin.tls})")
    lines.append(f"with {origin.protocol} id {msg_id}")
    if rcpt:
        lines.append(f"for <{rcpt}>")
    lines[-1] += f"; {date}"
    return ("\r\n\t".join(lines) + "\r\n").encode("utf-8", "surrogateescape")


def _field(line: bytes) -> Header:
    name, _, value = line.partition(b":")
    return [name, value]


@dataclass(frozen=True)
class Cleanup:
    """The stage, with the settings it needs (rebuilt on reload)."""

    hostname: str
    hop_limit: int = 50

    def clean(
        self,
        data: bytes,
        *,
        msg_id: str,
        origin: Origin,
        rcpt: str | None = None,
        now: float | None = None,
    ) -> Cleaned:
        """Check and finish ``data`` (CRLF line ends, as every path delivers it here);
        raises :class:`Rejected`. ``rcpt`` is named in ``Received`` (one-recipient
        messages only: the trace must not tell one recipient of the others)."""
        if b"\x00" in data:
            raise Rejected(550, "5.6.0", "Message contains NUL characters", reason="nul")
        fields, body_at, needs_gap = split_header(data)
        have: dict[bytes, int] = {}
        for name, _ in fields:
            key = name.lower()
            have[key] = have.get(key, 0) + 1
        if have.get(b"received", 0) >= self.hop_limit:
            n = have[b"received"]
            raise Rejected(554, "5.4.6", f"Too many hops ({n} Received fields)", reason="hops")
        if have.get(b"from", 0) > 1 or have.get(b"sender", 0) > 1:
            raise _bad_from("appears more than once")
        authors: tuple[str, ...] = ()
        sender = None
        if b"sender" in have:
            sender = parse_mailboxes(_value(fields, b"sender"), many=False)[0]
        if b"from" in have:
            authors = parse_mailboxes(_value(fields, b"from"), many=True)
            if len(authors) > 1 and sender is None:
                raise _bad_from("names several mailboxes and there is no Sender")
        if b"bcc" in have:
            fields = [f for f in fields if f[0].lower() != b"bcc"]
        ours = [received_header(origin, hostname=self.hostname, msg_id=msg_id, rcpt=rcpt, now=now)]
        if b"message-id" not in have:
            ours.append(f"Message-ID: <{msg_id}@{self.hostname}>\r\n".encode())
        if b"date" not in have:
            ours.append(f"Date: {email.utils.formatdate(now, localtime=True)}\r\n".encode())
        if b"bcc" in have:
            kept = b"".join(name + b":" + value for name, value in fields)
            message = b"".join([*ours, kept, b"\r\n", data[body_at:]])
        elif needs_gap:
            message = b"".join([*ours, data[:body_at], b"\r\n", data[body_at:]])
        else:  # the common case: one copy of the message
            message = b"".join([*ours, data])
        body_offset = len(message) - (len(data) - body_at)
        signing = None
        if authors:
            signing = domain_of(sender if len(authors) > 1 and sender else authors[0])
        return Cleaned(
            message=message,
            headers=[_field(line) for line in ours] + fields,
            body_offset=body_offset,
            authors=authors,
            sender=sender,
            signing_domain=signing,
        )


def _value(fields: list[Header], name: bytes) -> bytes:
    return next(v for n, v in fields if n.lower() == name)
