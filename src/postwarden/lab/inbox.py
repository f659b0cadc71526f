"""The lab inbox: every message the lab's sink MX hosts accept, kept as a file.

With a state directory (``Lab(state_dir=...)``, which ``postwarden lab`` gives it), the
sinks deliver each accepted message into a maildir, ``<state_dir>/maildir``, before
answering ``250`` to DATA: stdlib :class:`mailbox.Maildir` writes it under ``tmp/``,
fsyncs it and links it into ``new/``, so a reader never sees half a message. Without a
state directory nothing is written and nothing is verified (tests and benchmarks pump
many messages through the lab).

Each file is the message exactly as received, after a block of trace headers the
sink prepends, the way a receiving MX prepends ``Received`` and
``Authentication-Results``::

    X-Lab-Id: 20250601-120301-123456-3f9a1c
    X-Lab-Received-At: 2025-06-01T12:03:01.123456Z
    X-Lab-Mail-From: <hello@demo.lab.test>
    X-Lab-Rcpt-To: <someone@inbox.lab.test>            (one per accepted recipient)
    X-Lab-Sink: mx1.lab.test 127.0.1.1
    X-Lab-Peer: 127.0.0.1 helo=postwarden.test
    X-Lab-TLS: yes TLSv1.3 TLS_AES_256_GCM_SHA384       ("no" without STARTTLS)
    X-Lab-DKIM: pass rsa-sha256 d=demo.lab.test s=lab-rsa   (one per signature)
    X-Lab-Size: 1234

``X-Lab-Size`` comes last: the message as received is the file's last that many octets.
DKIM is verified by the sink against the lab's own DNS table (no network): ``pass``,
``fail`` (a key is published but the signature does not verify, or no key is) or
``permerror`` (the signature cannot be parsed); a message without signatures has no
``X-Lab-DKIM`` line.

A message's id is its maildir key (the file name in ``new/``, or before ``:2,`` in
``cur/``): the UTC time of acceptance to the microsecond and six random hex digits,
so ids are unique, URL-safe and sort by arrival. :class:`LabInbox` reads the maildir
(newest first, filtered by recipient) for ``postwarden lab inbox`` and the lab's
``GET /lab/messages``; it never changes it, so a mail client may open it too.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import mailbox
import os
import re
import secrets
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from postwarden.lab.dkim_check import DkimVerdict, lab_keys, verify_dkim
from postwarden.lab.text import body_text

if TYPE_CHECKING:
    from postwarden.lab.dnsserver import DNSServer
    from postwarden.lab.sink import ReceivedMessage

#: What a message id looks like (and all a lookup accepts: no path can be smuggled in).
ID_RE = re.compile(r"^\d{8}-\d{6}-\d{6}-[0-9a-f]{6}$")
_TRACE = b"X-Lab-"
_HEADER_READ_LIMIT = 1024 * 1024


class _KeyedMaildir(mailbox.Maildir):
    """A :class:`mailbox.Maildir` whose new message takes the key the caller chose.

    Delivery stays the stdlib's (write under ``tmp/``, fsync, link into ``new/``,
    refuse a clash); only the unique name is ours, so that ids sort by arrival.
    """

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)  # Maildir makes the leaf only
        super().__init__(path, factory=None, create=True)
        self._lock = threading.Lock()
        self._next_key: str | None = None

    def add_as(self, key: str, data: bytes) -> None:
        with self._lock:
            self._next_key = key
            try:
                self.add(data)
            finally:
                self._next_key = None

    def _create_tmp(self) -> IO[bytes]:
        if self._next_key is None:
            raise mailbox.Error("lab maildir: add messages with add_as")
        path = os.path.join(self._path, "tmp", self._next_key)
        return open(path, "xb", opener=lambda p, flags: os.open(p, flags, 0o600))


def _clean(value: str) -> str:
    """A header value on one line, whatever the peer sent."""
    return re.sub(r"[\r\n\x00]+", " ", value)


def _iso(ts: float) -> str:
    us = round(ts * 1_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(us // 1_000_000)) + (
        f".{us % 1_000_000:06d}Z"
    )


def _from_iso(text: str) -> float:
    import datetime

    dt = datetime.datetime.strptime(text.strip(), "%Y-%m-%dT%H:%M:%S.%fZ")
    return dt.replace(tzinfo=datetime.UTC).timestamp()


@dataclass(frozen=True)
class StoredMessage:
    """What the lab inbox knows of one message without reading its body."""

    id: str
    received_at: float
    mail_from: str
    rcpt_tos: list[str]
    sink_name: str
    sink_address: str
    peer: str
    helo: str
    tls: bool
    tls_version: str
    tls_cipher: str
    dkim: list[DkimVerdict]
    #: Octets of the message as received.
    size: int
    #: The message's own From, To, Subject and Date headers (decoded; "" when absent).
    header_from: str = ""
    header_to: str = ""
    subject: str = ""
    date: str = ""
    path: Path = field(default=Path(), repr=False, compare=False)

    def summary(self) -> dict[str, Any]:
        """The JSON form of ``GET /lab/messages`` and ``postwarden lab inbox --json``."""
        return {
            "id": self.id,
            "received_at": _iso(self.received_at),
            "mail_from": self.mail_from,
            "rcpt_tos": list(self.rcpt_tos),
            "from": self.header_from,
            "to": self.header_to,
            "subject": self.subject,
            "date": self.date,
            "size": self.size,
            "mx": {"name": self.sink_name, "address": self.sink_address},
            "peer": {"address": self.peer, "helo": self.helo},
            "tls": {"used": self.tls, "version": self.tls_version, "cipher": self.tls_cipher},
            "dkim": [v.as_dict() for v in self.dkim],
        }


def _trace_block(msg: ReceivedMessage, verdicts: list[DkimVerdict], msg_id: str) -> bytes:
    lines = [
        f"X-Lab-Id: {msg_id}",
        f"X-Lab-Received-At: {_iso(msg.received_at)}",
        f"X-Lab-Mail-From: <{_clean(msg.mail_from)}>",
        *(f"X-Lab-Rcpt-To: <{_clean(r)}>" for r in msg.rcpt_tos),
        f"X-Lab-Sink: {msg.sink_name} {msg.sink_address}",
        f"X-Lab-Peer: {_clean(msg.peer)} helo={_clean(msg.helo) or '-'}",
        "X-Lab-TLS: "
        + (" ".join(x for x in ("yes", msg.tls_version, msg.tls_cipher) if x) if msg.tls else "no"),
        *(f"X-Lab-DKIM: {v}" for v in verdicts),
        f"X-Lab-Size: {len(msg.data)}",
    ]
    return "".join(line + "\r\n" for line in lines).encode()


def _decode_header(value: str) -> str:
    try:
        return str(email.policy.default.header_factory("x", value))
    except Exception:  # a header the parser refuses: show it as it came
        return value


class LabInbox:
    """The lab's maildir at ``path``: the sinks deliver into it, readers list and show.

    ``dns`` (the lab's DNS server) is needed only to deliver: DKIM keys are looked up in
    its table. Reading works on a maildir some earlier lab run left (``postwarden lab
    inbox`` in another process).
    """

    def __init__(self, path: str | Path, dns: DNSServer | None = None) -> None:
        self.path = Path(path)
        self.dns = dns
        self._maildir: _KeyedMaildir | None = None
        self._opening = threading.Lock()
        self._last_us = 0

    # -- delivery (the sinks) -------------------------------------------------------

    def new_id(self, ts: float) -> str:
        """A fresh id for a message accepted at ``ts``: later than every id this inbox
        made before, even within one microsecond."""
        us = max(int(ts * 1_000_000), self._last_us + 1)
        self._last_us = us
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(us // 1_000_000))
        return f"{stamp}-{us % 1_000_000:06d}-{secrets.token_hex(3)}"

    async def deliver(self, msg: ReceivedMessage) -> ReceivedMessage:
        """Verify DKIM and write ``msg`` into the maildir; returns it with its id.

        Verification and the write (fsync) run in a thread, off the event loop.
        Raises :class:`OSError` when the message could not be stored.
        """
        keys = lab_keys(self.dns, msg.data) if self.dns is not None else {}
        msg_id = self.new_id(msg.received_at)
        await asyncio.to_thread(self._write, msg, keys, msg_id)
        return replace(msg, id=msg_id)

    def _write(self, msg: ReceivedMessage, keys: dict[str, bytes], msg_id: str) -> None:
        verdicts = verify_dkim(msg.data, keys)
        with self._opening:
            if self._maildir is None:
                self._maildir = _KeyedMaildir(self.path)
        self._maildir.add_as(msg_id, _trace_block(msg, verdicts, msg_id) + msg.data)

    # -- reading --------------------------------------------------------------------

    @property
    def exists(self) -> bool:
        """Whether a maildir is there (a lab with this state directory ran)."""
        return (self.path / "new").is_dir()

    def _files(self) -> dict[str, Path]:
        """Message id → file, for every message in ``new/`` and ``cur/``."""
        out: dict[str, Path] = {}
        for sub in ("new", "cur"):
            try:
                names = os.listdir(self.path / sub)
            except FileNotFoundError:
                continue
            for name in names:
                key = name.split(":", 1)[0]
                if ID_RE.match(key):
                    out[key] = self.path / sub / name
        return out

    def _file(self, msg_id: str) -> Path:
        if not ID_RE.match(msg_id):
            raise KeyError(msg_id)
        for sub in ("new", "cur"):
            plain = self.path / sub / msg_id
            if plain.exists():
                return plain
        found = self._files().get(msg_id)  # in cur/ with flags after ":2,"
        if found is None:
            raise KeyError(msg_id)
        return found

    def list(self, to: str | None = None, limit: int | None = None) -> list[StoredMessage]:
        """The messages, newest first; with ``to``, only those for that recipient
        (an address, case-insensitive) or, without ``@``, for that domain."""
        want = to.strip().strip("<>").lower() if to else None
        out: list[StoredMessage] = []
        files = self._files()
        for msg_id in sorted(files, reverse=True):
            try:
                meta = self._read_meta(msg_id, files[msg_id])
            except (FileNotFoundError, ValueError):
                continue  # removed meanwhile, or not a lab delivery
            if want is not None and not _matches(meta.rcpt_tos, want):
                continue
            out.append(meta)
            if limit is not None and len(out) >= limit:
                break
        return out

    def get(self, msg_id: str) -> StoredMessage:
        """One message's metadata; :class:`KeyError` when there is no such message."""
        path = self._file(msg_id)
        try:
            return self._read_meta(msg_id, path)
        except (FileNotFoundError, ValueError):
            raise KeyError(msg_id) from None

    def file_bytes(self, msg_id: str) -> bytes:
        """The maildir file: the trace headers, then the message as received."""
        try:
            return self._file(msg_id).read_bytes()
        except FileNotFoundError:
            raise KeyError(msg_id) from None

    def raw(self, msg_id: str) -> bytes:
        """The message exactly as the sink received it (after dot-unstuffing)."""
        data = self.file_bytes(msg_id)
        _, size, pos = _trace(data)
        return data[pos : pos + size]

    def detail(self, msg_id: str) -> dict[str, Any]:
        """The JSON form of ``GET /lab/messages/{id}``: the summary, the message's
        headers, its text and the raw message."""
        meta = self.get(msg_id)
        raw = self.raw(msg_id)
        parsed = email.message_from_bytes(raw, policy=email.policy.default)
        return {
            **meta.summary(),
            "headers": [[k, _decode_header(str(v))] for k, v in parsed.raw_items()],
            "text": body_text(parsed),
            "raw": raw.decode("utf-8", errors="replace"),
        }

    def render(self, msg_id: str) -> str:
        """A headers summary and the text of the message, for a terminal."""
        meta = self.get(msg_id)
        parsed = email.message_from_bytes(self.raw(msg_id), policy=email.policy.default)
        tls = " ".join(x for x in ("yes", meta.tls_version, meta.tls_cipher) if x)
        lines = [
            f"Id:          {meta.id}",
            f"Received:    {_iso(meta.received_at)} by {meta.sink_name} ({meta.sink_address})"
            f" from {meta.peer} helo={meta.helo or '-'}",
            f"TLS:         {tls if meta.tls else 'no'}",
            f"DKIM:        {'; '.join(str(v) for v in meta.dkim) or 'none'}",
            f"Envelope:    <{meta.mail_from}> -> {', '.join(meta.rcpt_tos)}",
            f"From:        {meta.header_from}",
            f"To:          {meta.header_to}",
            f"Subject:     {meta.subject}",
            f"Date:        {meta.date}",
            f"Size:        {meta.size} octets",
            "",
            body_text(parsed),
        ]
        return "\n".join(lines).rstrip("\n") + "\n"

    def _read_meta(self, msg_id: str, path: Path) -> StoredMessage:
        head = _read_head(path)
        fields, size, pos = _trace(head)
        if fields["id"][0] != msg_id:
            raise ValueError(f"{path}: not a lab delivery")
        own = head[pos:]
        end = own.find(b"\r\n\r\n")
        parsed = email.message_from_bytes(
            own[: end + 2] if end >= 0 else own, policy=email.policy.compat32
        )
        tls = fields.get("tls", ["no"])[0].split()
        peer, _, helo = fields.get("peer", ["- helo=-"])[0].partition(" helo=")
        sink_name, _, sink_address = fields.get("sink", [""])[0].partition(" ")
        return StoredMessage(
            id=msg_id,
            received_at=_from_iso(fields["received-at"][0]),
            mail_from=fields.get("mail-from", ["<>"])[0].strip()[1:-1],
            rcpt_tos=[r.strip()[1:-1] for r in fields.get("rcpt-to", [])],
            sink_name=sink_name,
            sink_address=sink_address,
            peer=peer,
            helo="" if helo == "-" else helo,
            tls=bool(tls) and tls[0] == "yes",
            tls_version=tls[1] if len(tls) > 1 else "",
            tls_cipher=tls[2] if len(tls) > 2 else "",
            dkim=[DkimVerdict.parse(v) for v in fields.get("dkim", [])],
            size=size,
            header_from=_decode_header(str(parsed.get("From", ""))),
            header_to=_decode_header(str(parsed.get("To", ""))),
            subject=_decode_header(str(parsed.get("Subject", ""))),
            date=str(parsed.get("Date", "")),
            path=path,
        )


def _matches(rcpt_tos: list[str], want: str) -> bool:
    if "@" in want:
        return any(r.lower() == want for r in rcpt_tos)
    return any(r.lower().rpartition("@")[2] == want.lstrip("@") for r in rcpt_tos)


def _read_head(path: Path) -> bytes:
    """The file up to the end of the message's own header section (or a limit)."""
    out = b""
    with open(path, "rb") as f:
        while len(out) < _HEADER_READ_LIMIT:
            chunk = f.read(16384)
            if not chunk:
                break
            out += chunk
            size_at = out.find(b"\r\nX-Lab-Size:")
            if size_at >= 0 and out.find(b"\r\n\r\n", size_at) >= 0:
                break
    return out


def _trace(data: bytes) -> tuple[dict[str, list[str]], int, int]:
    """The trace headers at the start of a lab maildir file (lower-case names without
    ``X-Lab-`` → values), the size of the message after them and where it starts."""
    fields: dict[str, list[str]] = {}
    pos = 0
    while data.startswith(_TRACE, pos):
        end = data.find(b"\r\n", pos)
        if end < 0:
            break
        name, _, value = data[pos + len(_TRACE) : end].decode("utf-8", "replace").partition(":")
        fields.setdefault(name.strip().lower(), []).append(value.strip())
        pos = end + 2
        if name.strip().lower() == "size":
            break
    if "id" not in fields or "size" not in fields or "received-at" not in fields:
        raise ValueError("not a lab delivery")
    return fields, int(fields["size"][0]), pos
