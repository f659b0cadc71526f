"""Bounce, complaint and auto-reply messages into per-recipient findings.

What comes back to a return path is read in this order (docs/bounces.md):

1. an RFC 5965 feedback report (ARF) or a provider's JSON notification: complaints;
2. an RFC 3464 delivery status notification: its per-recipient fields, with the
   human-readable part as the diagnostic where the fields carry none;
3. an auto-reply (RFC 3834 ``Auto-Submitted: auto-replied`` and the common vacation
   markers): not a bounce;
4. the non-standard bounces MTAs still send (qmail, Exim, old Postfix and Sendmail,
   Exchange, Domino, webmail providers ...): the addresses the text reports, each with
   the lines that follow it as its diagnostic.

Every failure is judged by the one classifier (:mod:`postwarden.bounces.classify`).
"""

from __future__ import annotations

import dataclasses
import email
import email.message
import email.utils
import functools
import json
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from email.header import decode_header, make_header
from email.message import Message
from email.policy import Compat32
from typing import Any

from postwarden.bounces.classify import (
    Classifier,
    default_classifier,
    find_stage,
    find_status,
)

Kind = str  # bounce | delayed | complaint | auto_reply | delivered


class _Compat32Text(Compat32):
    """compat32, except that a header with undecodable bytes reads as text too (not
    as a Header object): bounces quote whatever they were sent."""

    def header_fetch_parse(self, name: str, value: str) -> Any:
        got = super().header_fetch_parse(name, value)
        return got if isinstance(got, str) else str(got)


_POLICY = _Compat32Text()


@dataclass
class Finding:
    """One recipient reported in a message."""

    recipient: str | None
    status: str | None
    action: str | None
    reason: str
    hard: bool | None
    remote_mta: str | None = None
    diagnostic: str = ""
    kind: Kind = "bounce"
    reply_code: int | None = None
    feedback_type: str | None = None

    def as_json(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("kind", "reply_code", "feedback_type"):
            if d[k] is None:
                d.pop(k)
        return d


@dataclass
class Report:
    """What one message says."""

    kind: str  # dsn | arf | auto_reply | text | json | none
    findings: list[Finding] = field(default_factory=list)
    #: Headers of the message the report is about (attached, inlined or as text).
    original: Message | None = None
    #: Every text of the report where a return-path token may appear (headers of the
    #: original, its Return-Path, the body).
    raw_text: str = ""
    #: The recipient is only the attached message's addressee: nothing in the report's
    #: own text named one.
    guessed: bool = False


# ----------------------------------------------------------------------------- helpers

ADDR_RE = re.compile(
    r"(?<![\w.+\-=/%!#$&'*?^`{|}~])"
    r"([\w.+\-=/%!#$&'*?^`{|}~]{1,64}@(?:[A-Za-z0-9](?:[A-Za-z0-9\-]{0,61}[A-Za-z0-9])?\.)+"
    r"[A-Za-z]{2,24})(?![\w\-]|\.[A-Za-z0-9])",
)
# Limits on what one report may cost to read: the recipients of one report (a list
# exploder's bounce rarely names more), and the characters of its text searched.
MAX_RECIPIENTS = 200
MAX_TEXT = 500_000
MAX_DIAGNOSTIC = 4000

SYSTEM_LOCAL = re.compile(
    r"^(mailer-daemon|postmaster|mail-daemon|maildaemon|mailerdaemon|daemon|root|noreply|"
    r"no-reply|bounce|bounces|double-bounce|nobody|abuse|mdaemon)$",
    re.I,
)

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
PERMANENT_RE = re.compile(
    r"permanent(ly)?\b|fatal error|has been rejected|could not be delivered|"
    r"couldn.t be delivered|failed permanently|undeliverable|delivery failed|"
    r"not be delivered|I.ve given up|giving up",
    re.I,
)
DELAYED_RE = re.compile(
    r"temporar(y|ily) (error|failure|problem)|has been delayed|delivery (is )?delayed|"
    r"still (trying|being retried|undelivered)|will (continue|keep) (trying|to try)|"
    r"will be retried|not yet been delivered|will retry|Warning: message|"
    r"delivery attempts will continue|this is (a|only a) warning|not a bounce",
    re.I,
)
BOUNCE_FROM = re.compile(
    r"mailer-daemon|mail-daemon|post_?master|mail delivery|delivery (status|subsystem)|"
    r"mail administrator|maildelivery|mdaemon|mailerdaemon|mail system|"
    r"undeliverable|bounce|daemon@|notification|returned mail|nobody@",
    re.I,
)
BOUNCE_SUBJECT = re.compile(
    r"undeliver|undelivered|delivery (status|failure|failed|notification|problem|report)|"
    r"failure notice|returned mail|returned to sender|mail delivery|could not be delivered|"
    r"non[- ]?remis|nicht zustellbar|unzustellbar|error sending|delivery error|"
    r"failed delivery|mail system error|permanent error|message not delivered|"
    r"no se puede entregar|non recapitabile|bounce|rejected|warning: could not send|"
    r"delayed mail|delivery delayed|delivery has failed|mail failure|unable to deliver|"
    r"message status|nondeliverable|not delivered|mail error|de entrega|kann nicht",
    re.I,
)
AUTO_REPLY_SUBJECT = re.compile(
    r"^\s*(auto(matic)?[ -]?(reply|response|antwort|answer|respuesta|risposta)|"
    r"auto:|autoreply|out of (the )?office|abwesenheit|absence|absent|vacation|"
    r"on vacation|away from|r[ée]ponse automatique|i am (currently )?(away|out)|"
    r"respuesta autom|risposta automatica|automatisch|office closed|out of town|"
    r"\[?auto|away until|ooo\b)",
    re.I,
)


def _decode_header(value: str | None) -> str:
    if not value:
        return ""
    try:
        return str(make_header(decode_header(value)))
    except (UnicodeError, LookupError, ValueError, email.errors.HeaderParseError):
        return str(value)


def _part_text(part: Message) -> str:
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


_EOL_RE = re.compile(r"\r+\n?")


# A tag: never across another "<", so that text full of "<" stays linear to scan.
TAG_RE = re.compile(r"<[^<>]*>")
_HIDDEN_RE = re.compile(r"<(script|style)\b", re.I)
_HIDDEN_END = {t: re.compile(f"</{t}", re.I) for t in ("script", "style")}
_PRE_START = re.compile(r"<pre\b", re.I)
_PRE_END = re.compile(r"</pre", re.I)


def _drop_hidden(html: str) -> str:
    """``html`` without its script and style elements (a linear scan: an opening tag
    without its end drops the rest)."""
    out = []
    pos = 0
    while (m := _HIDDEN_RE.search(html, pos)) is not None:
        out.append(html[pos : m.start()])
        end = _HIDDEN_END[m.group(1).lower()].search(html, m.end())
        if end is None:
            return "".join(out)
        close = html.find(">", end.start())
        pos = len(html) if close < 0 else close + 1
    out.append(html[pos:])
    return "".join(out)


def _split_pre(html: str) -> list[tuple[bool, str]]:
    """``html`` cut into (inside ``<pre>``, chunk) by a linear scan."""
    out = []
    pos = 0
    while (start := _PRE_START.search(html, pos)) and (end := _PRE_END.search(html, start.end())):
        out += [(False, html[pos : start.start()]), (True, html[start.start() : end.start()])]
        pos = end.start()
    out.append((False, html[pos:]))
    return out


_LINE_END_RE = re.compile(r"<br\s*/?>|</(div|tr|li|h[1-6]|table|blockquote|pre)>", re.I)


def _html_text(html: str) -> str:
    """The text a reader sees: whitespace collapsed as a browser does (except in
    ``<pre>``), a line per ``<br>``/block, a blank line per paragraph."""
    import html as html_mod

    out = []
    for pre, chunk in _split_pre(_drop_hidden(html)):
        if not pre:
            chunk = re.sub(r"\s+", " ", chunk)
        chunk = re.sub(r"</p\s*>", "\n\n", chunk, flags=re.I)
        chunk = _LINE_END_RE.sub("\n", chunk)
        chunk = re.sub(r"</t[dh]\s*>", " ", chunk, flags=re.I)
        out.append(TAG_RE.sub("", chunk))
    text = html_mod.unescape("".join(out)).replace("\xa0", " ")
    text = re.sub(r"[ \t]*\n[ \t]*", "\n", text)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


@functools.lru_cache(maxsize=8)
def addresses(text: str) -> tuple[tuple[str, int], ...]:
    """Every address in ``text`` with its position (kept for the few texts of the
    report being read: each recipient's block looks them up again)."""
    return tuple((m.group(1), m.start(1)) for m in ADDR_RE.finditer(text))


def clean_addr(a: str | None) -> str | None:
    if not a:
        return None
    a = a.strip()
    if ";" in a:
        a = a.split(";", 1)[1]
    a = a.strip().strip("<>").strip().strip('"').strip("'").strip()
    m = ADDR_RE.search(a)
    if m:
        return m.group(1).strip(".")
    return a or None


_ATTACHED = ("message/rfc822", "message/global", "message/partial")


def _walk(msg: Message) -> Iterator[tuple[Message, bool]]:
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
                        inside or ctype in _ATTACHED,
                    )

    yield from rec(msg, False)


# ------------------------------------------------------------------------------- parser


class Parser:
    def __init__(self, classifier: Classifier | None = None) -> None:
        self.classifier = classifier or default_classifier()

    def parse_file(self, data: bytes) -> list[Finding]:
        """Every finding of a file: one message, or an mbox of several."""
        return [f for msg in split_mbox(data) for f in self.parse_bytes(msg).findings]

    def parse_bytes(self, data: bytes) -> Report:
        # Mail comes off the wire with CRLF, files mostly with LF: one line ending, so
        # that no "\r" is left in the texts the patterns read.
        data = data.replace(b"\r\n", b"\n")
        msg = email.message_from_bytes(data, policy=_POLICY)
        report = self.parse(msg)
        if not report.raw_text:
            report.raw_text = data.decode("utf-8", "replace")
        return report

    def parse(self, msg: Message, depth: int = 0) -> Report:
        original = self._original(msg)
        nested = depth == 0 and original is not None and _bounce_like(original, strict=True)
        report = Report("none", original=original)
        if not nested or self._dsn_part(msg):
            for step in (self._arf, self._json, self._dsn, self._auto_reply, self._text):
                got = step(msg, original)
                if got is not None:
                    got.original = got.original or original
                    report = got
                    break
        if depth > 0 or original is None or not (report.guessed or nested or not report.findings):
            return report
        inner = self.parse(original, depth + 1)
        if report.guessed and inner.findings:
            # Nothing in the text named a recipient, and the attached message is itself
            # a bounce or a report (forwarded as an attachment): its addressee is the
            # sender of the mail, so what the attached one says is the answer. An
            # attached original that merely reads like one (our own mail) is not.
            if inner.kind in ("dsn", "arf", "json") or _bounce_like(original, strict=False):
                return inner
        if nested or not report.findings:
            # A report attached to this one: a bounce forwarded by a list manager or
            # wrapped by a gateway, or the bounce of a bounce. What both say counts.
            seen = {(f.recipient or "").lower() for f in report.findings}
            extra = [f for f in inner.findings if (f.recipient or "").lower() not in seen]
            if extra:
                if not report.findings:
                    return inner
                report.findings += extra
        return report

    @staticmethod
    def _dsn_part(msg: Message) -> bool:
        return any(
            not inside and part.get_content_type().endswith("delivery-status")
            for part, inside in _walk(msg)
        )

    # ------------------------------------------------------------------ the original

    def _original(self, msg: Message) -> Message | None:
        for part, _inside in _walk(msg):
            ctype = part.get_content_type()
            if ctype in ("message/rfc822", "message/global", "message/rfc822-headers"):
                payload = part.get_payload()
                if isinstance(payload, list) and payload and isinstance(payload[0], Message):
                    return payload[0]
            if ctype in ("text/rfc822-headers", "text/rfc822", "message/rfc822-headers"):
                return email.message_from_string(_part_text(part), policy=_POLICY)
        body = self._body_text(msg, cut=False)
        m = ORIGINAL_MARKERS.search(body)
        if m:
            rest = body[m.end() :].split("\n", 1)[-1].lstrip("\n")
            # Inlined: "Received: ...\nFrom: ...\n" with or without indentation.
            rest = re.sub(r"^[ \t]+(?=[A-Za-z-]+:)", "", rest, flags=re.M)
            orig = email.message_from_string(rest, policy=_POLICY)
            if len(orig.keys()) >= 2:
                return orig
        return None

    # ------------------------------------------------------------------ texts

    def _body_text(self, msg: Message, *, cut: bool = True) -> str:
        """The human-readable text of the report itself (not of the original)."""
        texts: list[str] = []
        html: list[str] = []
        # Text parts that are not the field blocks of a report part (delivery-status,
        # disposition-notification, feedback-report).
        human = 0
        fields = {
            id(block)
            for part, _inside in _walk(msg)
            if part.get_content_maintype() == "message"
            and part.get_content_type() not in _ATTACHED
            and isinstance(part.get_payload(), list)
            for block in part.get_payload()
        }
        for part, inside in _walk(msg):
            if inside or part.is_multipart():
                continue
            ctype = part.get_content_type()
            if part.get_content_maintype() == "multipart":
                # Broken MIME (a boundary that never occurs): the whole body as text.
                texts.append(_part_text(part))
                human += 1
            elif ctype == "text/plain" or ctype == "text/enriched":
                texts.append(_part_text(part))
                human += id(part) not in fields
            elif ctype == "text/html":
                html.append(_html_text(_part_text(part)))
            elif part.get_content_maintype() == "message":
                continue
            elif ctype == "text/delivery-status" or ctype.startswith("text/"):
                texts.append(_part_text(part))
        if not human and html:
            # An HTML-only report (Exchange and others): what it shows, then any fields.
            texts = html + texts
        text = "\n".join(texts)[:MAX_TEXT]
        if cut:
            m = ORIGINAL_MARKERS.search(text)
            if m and m.start() > 0:
                text = text[: m.start()]
        return text

    # ------------------------------------------------------------------ ARF

    def _arf(self, msg: Message, original: Message | None) -> Report | None:
        fields: list[tuple[str, str]] | None = None
        for part, inside in _walk(msg):
            if inside:
                continue
            if part.get_content_type() == "message/feedback-report":
                fields = _fields_of(part)
                break
        if fields is None:
            return self._complaint_without_report(msg, original)
        get = _getter(fields)
        ftype = (get("feedback-type") or "abuse").strip().lower()
        rcpts = [clean_addr(v) for k, v in fields if k == "original-rcpt-to"]
        rcpts += [clean_addr(v) for k, v in fields if k == "removal-recipient"]
        found = [r for r in rcpts if r]
        if not found and original is not None:
            found = [
                clean_addr(a) or ""
                for _n, a in email.utils.getaddresses(original.get_all("to", []))
            ]
            found = [a for a in found if a]
        if not found:
            found = [None]  # type: ignore[list-item]
        seen: set[str | None] = set()
        out = []
        for r in found:
            key = r.lower() if r else None
            if key in seen:
                continue
            seen.add(key)
            out.append(
                Finding(
                    r,
                    None,
                    None,
                    "complaint",
                    None,
                    kind="complaint",
                    feedback_type=ftype,
                    diagnostic=_decode_header(get("user-agent")) or "",
                )
            )
        return Report("arf", out)

    def _complaint_without_report(self, msg: Message, original: Message | None) -> Report | None:
        """Feedback loops that attach the message without an ARF part (Microsoft's
        JMRP, older providers): a complaint subject or the providers' own header."""
        if original is None:
            return None
        subject = _decode_header(msg.get("subject"))
        hm = original.get("x-hmxmroriginalrecipient")
        if not hm and not re.search(
            r"complaint about message|abuse report|spam report|"
            r"feedback report|scomp|fbl",
            subject,
            re.I,
        ):
            return None
        who = clean_addr(hm) if hm else None
        if who is None:
            tos = [clean_addr(a) for _n, a in email.utils.getaddresses(original.get_all("to", []))]
            who = next((a for a in tos if a), None)
        return Report(
            "arf",
            [
                Finding(
                    who,
                    None,
                    None,
                    "complaint",
                    None,
                    kind="complaint",
                    feedback_type="abuse",
                    diagnostic=subject,
                )
            ],
        )

    # ------------------------------------------------------------------ JSON (SES)

    def _json(self, msg: Message, original: Message | None) -> Report | None:
        if msg.is_multipart():
            return None
        text = _part_text(msg)
        if "notificationType" not in text and "eventType" not in text:
            return None
        start = text.find("{")
        data: Any = None
        try:
            if start >= 0:
                data, _end = json.JSONDecoder().raw_decode(text[start:])
        except ValueError:
            data = None
        if not isinstance(data, dict):
            # A notification cut short: its type and addresses are still readable.
            data = _json_salvage(text)
            if data is None:
                return None
        if isinstance(data.get("Message"), str):  # an SNS envelope
            try:
                data = json.loads(data["Message"])
            except ValueError:
                return None
        ntype = str(data.get("notificationType") or data.get("eventType") or "").lower()
        out: list[Finding] = []
        if ntype == "complaint":
            for r in (data.get("complaint") or {}).get("complainedRecipients", []):
                out.append(
                    Finding(
                        clean_addr(r.get("emailAddress")),
                        None,
                        None,
                        "complaint",
                        None,
                        kind="complaint",
                        feedback_type=str(
                            data["complaint"].get("complaintFeedbackType") or "abuse"
                        ),
                    )
                )
        elif ntype == "bounce":
            b = data.get("bounce") or {}
            permanent = str(b.get("bounceType", "")).lower() == "permanent"
            for r in b.get("bouncedRecipients", []):
                diag = str(r.get("diagnosticCode") or "")
                status = r.get("status") or find_status(diag)
                v = self.classifier.classify(status, None, diag, permanent=permanent)
                out.append(
                    Finding(
                        clean_addr(r.get("emailAddress")),
                        v.status,
                        r.get("action") or "failed",
                        v.category,
                        v.hard,
                        remote_mta=b.get("remoteMtaIp") or b.get("reportingMTA"),
                        diagnostic=diag,
                        reply_code=v.reply_code,
                    )
                )
        elif ntype == "delivery":
            d = data.get("delivery") or {}
            for r in d.get("recipients", []):
                out.append(
                    Finding(
                        clean_addr(r),
                        "2.0.0",
                        "delivered",
                        "delivered",
                        None,
                        kind="delivered",
                        diagnostic=str(d.get("smtpResponse", "")),
                    )
                )
        else:
            return None
        return Report("json", out)

    # ------------------------------------------------------------------ DSN

    def _dsn(self, msg: Message, original: Message | None) -> Report | None:
        blocks: list[list[tuple[str, str]]] = []
        for part, inside in _walk(msg):
            if inside:
                continue
            ctype = part.get_content_type()
            if ctype in (
                "message/delivery-status",
                "message/global-delivery-status",
                "text/delivery-status",
            ):
                blocks += _dsn_blocks(part)
        if not blocks:
            # Fields pasted into a plain text body (some gateways do that).
            text = self._body_text(msg, cut=False)
            if re.search(r"^\s*Final-Recipient:", text, re.M | re.I) and re.search(
                r"^\s*(Status|Action):", text, re.M | re.I
            ):
                blocks = _dsn_blocks_from_text(text)
        per_rcpt = [
            b for b in blocks if any(k in ("final-recipient", "original-recipient") for k, _ in b)
        ][:MAX_RECIPIENTS]
        if not per_rcpt:
            return None
        human = self._body_text(msg)
        failed = [
            clean_addr(a)
            for _n, a in email.utils.getaddresses(msg.get_all("x-failed-recipients", []))
        ]
        gateway = _filter_gateway(msg)
        out: list[Finding] = []
        for b in per_rcpt:
            get = _getter(b)
            rcpt = clean_addr(get("final-recipient")) or clean_addr(get("original-recipient"))
            if not _is_address(rcpt):
                # A file, a pipe, a host without a domain: the address the sender used.
                rcpt = next(
                    (a for a in (clean_addr(get("original-recipient")), *failed) if _is_address(a)),
                    rcpt,
                )
            action = (get("action") or "").strip().lower().split()[0] if get("action") else None
            status_field = find_status(get("status") or "")
            diag = _diag_text(get("diagnostic-code") or "")
            bare = not re.search(r"[A-Za-z]{3}", diag)  # no words: the text says them
            block = _block_for(human, rcpt) if bare or len(per_rcpt) > 1 else human
            if bare:
                diag = (diag + " " + block).strip()
            remote = clean_remote(get("remote-mta")) or None
            context = block if len(per_rcpt) > 1 else human
            found = self._judge(rcpt, status_field, action, diag, remote, context, gateway=gateway)
            out.append(found)
            orig = clean_addr(get("original-recipient"))
            if orig and rcpt and orig.lower() != rcpt.lower() and "@" in orig:
                # Forwarded or rewritten: the address the sender used is reported too.
                out.append(dataclasses.replace(found, recipient=orig))
        return Report("dsn", out)

    def _judge(
        self,
        rcpt: str | None,
        status_field: str | None,
        action: str | None,
        diag: str,
        remote: str | None,
        context: str = "",
        *,
        gateway: bool = False,
    ) -> Finding:
        """One recipient's finding. ``context`` is the human-readable text around it
        (a transcript may tell the SMTP stage); ``gateway``: the report was written by
        a content-filtering gateway, which refuses what it has read."""
        diag = diag[:MAX_DIAGNOSTIC]
        diag_status = find_status(diag)
        status = status_field
        if diag_status and (
            status is None or (diag_status[0] == status[0] and not diag_status.endswith(".0.0"))
        ):
            # The remote server's own code says more than the reporting MTA's summary.
            status = diag_status
        if action is None and status:
            action = {"5": "failed", "4": "delayed", "2": "delivered"}[status[0]]
        if action in ("delivered", "relayed", "expanded") or (status and status[0] == "2"):
            return Finding(
                rcpt,
                status,
                action or "delivered",
                "delivered",
                None,
                remote,
                diag,
                kind="delivered",
            )
        permanent = action == "failed" if action else None
        stage = find_stage(diag)
        if stage is None and gateway:
            stage = "data"
        if stage is None and context:
            stage = find_stage(context, transcript_only=True)
            # Pipelining MTAs (Sendmail) print refused recipients after ">>> DATA": a
            # transcript's DATA counts only when no precise code and no RCPT error says
            # otherwise.
            if stage == "data" and (
                (status_field and not status_field.endswith(".0"))
                or re.search(r"\b503\b|precede data|no valid recipients", context, re.I)
            ):
                stage = None
        v = self.classifier.classify(status, None, diag, permanent=permanent, stage=stage)
        category = v.category
        final_status = v.status
        if action in ("failed", "delayed") and category == "timeout":
            # Given up (or still tried) after the destination could not be reached.
            category = "expired"
        elif action == "failed" and final_status and final_status[0] == "4":
            # Gave up after temporary failures: the message expired.
            if category == "other":
                category = "expired"
        hard = v.hard
        if action == "delayed":
            hard = False
        elif (
            hard
            and category == "user_unknown"
            and not v.any_stage
            and stage is None
            and v.reply_code is not None
            and (not status or status.endswith(".0.0"))
            and find_stage(context) != "rcpt"
        ):
            # A remote server's bare "550 user unknown" relayed without an enhanced code
            # and without the command it answered: at the end of DATA that is a content
            # filter's answer. Counted as a soft bounce of the address (the soft limit
            # still suppresses it) instead of suppressing it at once.
            hard = False
        return Finding(
            rcpt,
            final_status,
            action,
            category,
            hard,
            remote,
            diag.strip()[:1000],
            kind="delayed" if action == "delayed" else "bounce",
            reply_code=v.reply_code,
        )

    # ------------------------------------------------------------------ auto-replies

    def _auto_reply(self, msg: Message, original: Message | None) -> Report | None:
        auto = (msg.get("auto-submitted") or "").strip().lower()
        subject = _decode_header(msg.get("subject"))
        sender = _decode_header(msg.get("from"))
        flagged = (
            auto.startswith("auto-replied")
            or msg.get("x-autoreply") is not None
            or msg.get("x-autorespond") is not None
            or (msg.get("precedence") or "").strip().lower() == "auto_reply"
            or AUTO_REPLY_SUBJECT.search(subject) is not None
        )
        if not flagged or BOUNCE_FROM.search(sender) or BOUNCE_SUBJECT.search(subject):
            return None
        addrs = email.utils.getaddresses([msg.get("from", "")])
        who = clean_addr(addrs[0][1]) if addrs else None
        return Report(
            "auto_reply",
            [Finding(who, None, None, "auto_reply", None, kind="auto_reply", diagnostic=subject)],
        )

    # ------------------------------------------------------------------ free text

    def _text(self, msg: Message, original: Message | None) -> Report | None:
        subject = _decode_header(msg.get("subject"))
        sender = _decode_header(msg.get("from"))
        text = self._body_text(msg)
        looks = (
            BOUNCE_FROM.search(sender)
            or BOUNCE_SUBJECT.search(subject)
            or (msg.get("return-path") or "").strip() == "<>"
            or msg.get("x-failed-recipients")
            or re.search(
                r"could not be delivered|undeliverable|delivery.{0,20}failed|"
                r"unable to deliver|permanent error|following address|"
                r"invalid (user|recipient|address)|error message|"
                r"not (a )?member of (this|the) (mailing )?list|"
                r"(?<![\d.])[45]\d\d[ -][45]\.\d{1,3}\.\d{1,3}",
                text,
                re.I,
            )
        )
        if not looks:
            return None
        gateway = _filter_gateway(msg)
        exclude, weak = _sender_side(msg, original)
        failed = [
            clean_addr(a)
            for _n, a in email.utils.getaddresses(msg.get_all("x-failed-recipients", []))
        ]
        rcpts = _candidates(text, exclude | weak) or _candidates(text, exclude)
        # Each recipient's block ends where the next address starts, counted over all.
        positions = sorted(p for _a, p in rcpts)
        rcpts = rcpts[:MAX_RECIPIENTS]
        if failed and any(failed):
            known = {r.lower(): p for r, p in rcpts}
            rcpts = [(a, known.get(a.lower(), -1)) for a in failed if a][:MAX_RECIPIENTS]
        guessed = False
        if not rcpts and original is not None:
            guessed = True
            tos = [
                a
                for _n, raw in email.utils.getaddresses(original.get_all("to", []))
                if (a := clean_addr(raw)) and a.lower() not in exclude
            ]
            if len(tos) == 1:
                rcpts = [(tos[0], -1)]
        if not rcpts:
            return Report("text", [])
        permanent: bool | None = None
        if DELAYED_RE.search(text) and not PERMANENT_RE.search(text):
            permanent = False
        elif PERMANENT_RE.search(text):
            permanent = True
        out: list[Finding] = []
        # "a@x (expanded from: b@y)": the address the sender used is reported too.
        expanded = {}
        for addr, pos in rcpts:
            m = _EXPANDED_RE.match(text, pos + len(addr)) if pos >= 0 else None
            if m and m.group(1).lower() != addr.lower():
                expanded[addr] = m.group(1)
        for addr, pos in rcpts:
            block = _block_at(text, pos, positions) if pos >= 0 else ""
            diag = block if _has_reason(block) else (block + "\n" + _error_lines(text)).strip()
            if not diag:
                diag = text
            action = "delayed" if permanent is False else "failed"
            # A bounce message is final unless it says it is a warning.
            f = self._judge(addr, None, action, _squash(diag), None, gateway=gateway)
            out.append(f)
            if addr in expanded:
                out.append(dataclasses.replace(f, recipient=expanded[addr]))
        return Report("text", out, guessed=guessed)


# Content-filtering gateways that write their own delivery reports, by the header
# fields they add: McAfee (NAI) Email Gateway, SurfControl, m-FILTER, MailFoundry.
_GATEWAY_RE = re.compile(
    r"^(x-nai-header:|x-sef-|x-mailer: *(surfcontrol|m-filter)|received:.*\(mailfoundry\))",
    re.I | re.M,
)


def _filter_gateway(msg: Message) -> bool:
    heads = "\n".join(f"{k}: {v}" for k, v in msg.items())
    return _GATEWAY_RE.search(heads) is not None


def _is_address(a: str | None) -> bool:
    return bool(a) and ADDR_RE.fullmatch(a or "") is not None


_DAEMON_RE = re.compile(r"mailer-daemon|mail delivery (system|subsystem)|postmaster@", re.I)


def _bounce_like(msg: Message, *, strict: bool) -> bool:
    """Whether an attached message is itself a bounce or a report, not the original.
    ``strict``: a report, or from a mailer daemon with a bounce's subject (always read
    beside the wrapper); else any sign of one (a bounce header, a bounce-like sender or
    subject), used only when the wrapper names nobody."""
    if msg.get_content_type() == "multipart/report":
        return True
    sender = _decode_header(msg.get("from"))
    subject = _decode_header(msg.get("subject"))
    if strict:
        return bool(_DAEMON_RE.search(sender) and BOUNCE_SUBJECT.search(subject))
    return bool(
        msg.get("x-failed-recipients")
        or (msg.get("return-path") or "").strip() == "<>"
        or BOUNCE_FROM.search(sender)
        or BOUNCE_SUBJECT.search(subject)
    )


def _json_salvage(text: str) -> dict[str, Any] | None:
    m = re.search(r'"notificationType"\s*:\s*"(\w+)"', text)
    if not m:
        return None
    kind = m.group(1)
    addrs = re.findall(r'"emailAddress"\s*:\s*"([^"]+)"', text)
    if kind.lower() == "complaint":
        ft = re.search(r'"complaintFeedbackType"\s*:\s*"([^"]+)"', text)
        return {
            "notificationType": kind,
            "complaint": {
                "complainedRecipients": [{"emailAddress": a} for a in addrs],
                "complaintFeedbackType": ft.group(1) if ft else "abuse",
            },
        }
    if kind.lower() == "bounce":
        bt = re.search(r'"bounceType"\s*:\s*"([^"]+)"', text)
        diags = re.findall(r'"diagnosticCode"\s*:\s*"((?:[^"\\]|\\.)*)"', text)
        rcpts = [
            {"emailAddress": a, "diagnosticCode": diags[i] if i < len(diags) else ""}
            for i, a in enumerate(addrs)
        ]
        return {
            "notificationType": kind,
            "bounce": {"bounceType": bt.group(1) if bt else "", "bouncedRecipients": rcpts},
        }
    return None


# ----------------------------------------------------------------------------- fields


def _fields_of(part: Message) -> list[tuple[str, str]]:
    payload = part.get_payload()
    if isinstance(payload, list):
        out: list[tuple[str, str]] = []
        for sub in payload:
            if isinstance(sub, Message):
                out += [(k.lower(), _unfold(v)) for k, v in sub.items()]
        return out
    return [kv for block in _dsn_blocks_from_text(_part_text(part)) for kv in block]


def _unfold(v: str) -> str:
    return re.sub(r"\r?\n[ \t]+", " ", str(v)).strip()


def _dsn_blocks(part: Message) -> list[list[tuple[str, str]]]:
    payload = part.get_payload()
    if isinstance(payload, list) and payload:
        blocks = [
            [(k.lower(), _unfold(v)) for k, v in sub.items()]
            for sub in payload
            if isinstance(sub, Message)
        ]
        blocks = [b for b in blocks if b]
        # A parser that met no blank line between blocks leaves them in one: split it.
        split: list[list[tuple[str, str]]] = []
        for b in blocks:
            split += _split_recipients(b)
        if split:
            return split
    return _dsn_blocks_from_text(_part_text(part))


def _split_recipients(block: list[tuple[str, str]]) -> list[list[tuple[str, str]]]:
    out: list[list[tuple[str, str]]] = [[]]
    seen_rcpt = False
    for k, v in block:
        starts = k in ("final-recipient", "original-recipient")
        if starts and seen_rcpt and any(kk == k for kk, _ in out[-1]):
            out.append([])
        if (
            k == "final-recipient"
            and not seen_rcpt
            and out[-1]
            and any(
                kk in ("reporting-mta", "arrival-date", "received-from-mta") for kk, _ in out[-1]
            )
            and not any(kk == "original-recipient" for kk, _ in out[-1])
        ):
            out.append([])
        seen_rcpt = seen_rcpt or starts
        out[-1].append((k, v))
    return [b for b in out if b]


FIELD_RE = re.compile(r"^([A-Za-z][A-Za-z0-9-]*):[ \t]*(.*)$")


def _dsn_blocks_from_text(text: str) -> list[list[tuple[str, str]]]:
    blocks: list[list[tuple[str, str]]] = []
    current: list[tuple[str, str]] = []
    for line in text.splitlines():
        if not line.strip():
            if current:
                blocks.append(current)
                current = []
            continue
        if line[0] in " \t" and current:
            k, v = current[-1]
            current[-1] = (k, (v + " " + line.strip()).strip())
            continue
        m = FIELD_RE.match(line.strip())
        if m:
            current.append((m.group(1).lower(), m.group(2).strip()))
    if current:
        blocks.append(current)
    out: list[list[tuple[str, str]]] = []
    for b in blocks:
        out += _split_recipients(b)
    return out


def _getter(fields: list[tuple[str, str]]) -> Any:
    def get(name: str) -> str | None:
        for k, v in fields:
            if k == name and v:
                return v
        return None

    return get


def _diag_text(value: str) -> str:
    v = value.strip()
    m = re.match(r"^(smtp|x-[\w.-]+|x400|unix|mail|local)\s*;\s*", v, re.I)
    if m:
        v = v[m.end() :]
    return v


def clean_remote(value: str | None) -> str | None:
    if not value:
        return None
    v = value.split(";", 1)[-1].strip()
    return v or None


def _sender_side(msg: Message, original: Message | None) -> tuple[set[str], set[str]]:
    """Addresses of the sender's side of the exchange: those the bounce itself went to
    or came from (never the failed recipient), and those of the original's sender
    (rarely the recipient: a message sent to oneself)."""

    def collect(m: Message, names: tuple[str, ...]) -> set[str]:
        out: set[str] = set()
        for h in names:
            for _n, a in email.utils.getaddresses([str(v) for v in m.get_all(h, [])]):
                c = clean_addr(a)
                if c:
                    out.add(c.lower())
        return out

    strong = collect(
        msg, ("to", "cc", "from", "reply-to", "return-path", "sender", "delivered-to", "errors-to")
    )
    weak = set()
    if original is not None:
        weak = collect(original, ("from", "reply-to", "return-path", "sender", "errors-to"))
    return strong, weak


_EXPANDED_RE = re.compile(r">?\s*\(expanded from:?\s*<?([^\s<>()@]+@[^\s<>()]+?)>?\)", re.I)

ANCHORED_RE = re.compile(
    r"^[ \t>*\-]*+(?:[245]\d\d[ -](?:[245]\.\d{1,3}\.\d{1,3}[ ])?)?"
    r"(?:(?:RCPT\s+TO|To|Recipient(?:\s+address)?|Address|Failed\s+recipient|"
    r"Original\s+recipient|Final\s+recipient|Empfänger|Destinataire|Addressee)\s*:?\s*)?"
    r"[\"']?<?(?:mailto:)?([^\s<>\"'(),;:@]+@[^\s<>\"'(),;:]+?)>?[\"']?\s*(?::|\.\.\.|\s|,|;|\(|$)",
    re.M | re.I,
)


_ID_FIELD_RE = re.compile(
    r"\b(message-id|references|in-reply-to|content-id|resent-message-id)[ \t]*:"
    r"[ \t]*(?:\n[ \t]+)?(?:<[^<>\s]{1,250}>[ \t]*(?:\n[ \t]+)?)*+<?$",
    re.I,
)


def _candidates(text: str, exclude: set[str]) -> list[tuple[str, int]]:
    """The addresses a bounce's text reports as failed, with where each is."""

    def ok(a: str) -> bool:
        lo = a.lower()
        if lo in exclude:
            return False
        local = lo.split("@")[0]
        return not (SYSTEM_LOCAL.match(local) and len(all_addrs) > 1)

    all_addrs = addresses(text)
    anchored: list[tuple[str, int]] = []
    # Exchange's X.400 form: "c=US;a= ;p=Org;o=Site;dda:SMTP=user@example.com;"
    for m in re.finditer(r"\bSMTP[:=]([^\s;<>\"]+@[^\s;<>\"]+)", text):
        c = clean_addr(m.group(1))
        if c and ADDR_RE.fullmatch(c) and ok(c):
            anchored.append((c, m.start(1)))
    for m in ANCHORED_RE.finditer(text):
        c = clean_addr(m.group(1))
        if c and "@" in c and ADDR_RE.fullmatch(c) and ok(c):
            anchored.append((c, m.start(1)))
    pool = anchored or [(a, p) for a, p in all_addrs if ok(a)]
    # A message id is no address, even folded onto a line of its own.
    pool = [(a, p) for a, p in pool if not _ID_FIELD_RE.search(text[max(0, p - 80) : p])]
    if not anchored:
        # Prefer addresses after words that name a recipient.
        near = [
            (a, p)
            for a, p in pool
            if re.search(
                r"(recipient|rcpt|to|address|user|mailbox|for|delivery to|deliver to)\W{0,6}$",
                text[max(0, p - 40) : p],
                re.I,
            )
        ]
        if near:
            pool = near
    seen: dict[str, int] = {}
    for a, p in pool:
        seen.setdefault(a.lower().strip("."), p)
    # Keep the spelling from the text.
    out: list[tuple[str, int]] = []
    for a, p in pool:
        if seen.get(a.lower().strip(".")) == p:
            out.append((a.strip("."), p))
    return out


def _block_at(text: str, pos: int, positions: list[int]) -> str:
    start = text.rfind("\n", 0, pos) + 1
    later = [p for p in positions if p > pos]
    end = len(text)
    if later:
        end = text.rfind("\n", 0, later[0]) + 1 or later[0]
        if end <= start:
            end = later[0]
    block = text[start:end]
    lines = block.split("\n")
    if re.search(r"^\W*[245]\d\d[ -]", lines[0]):
        # "554 <a@b>... Remote protocol error": the line says it all; what follows
        # belongs to it only when indented (a wrapped line).
        kept_lines = [lines[0]]
        for ln in lines[1:]:
            if not ln[:1].isspace() or not ln.strip():
                break
            kept_lines.append(ln)
        return "\n".join(kept_lines)
    # A block ends at a blank line followed by unrelated prose, unless it has no reason yet.
    parts = re.split(r"\n\s*\n", block)
    kept = parts[0]
    for p in parts[1:]:
        if _has_reason(kept):
            break
        kept += "\n" + p
    return kept


def _block_for(text: str, rcpt: str | None) -> str:
    if not rcpt or not text:
        return _error_lines(text)
    idx = text.lower().find(rcpt.lower())
    if idx < 0:
        return _error_lines(text)
    others = [p for a, p in addresses(text) if a.lower() != rcpt.lower() and p > idx]
    block = _block_at(text, idx, others[:1])
    return block if _has_reason(block) else (block + "\n" + _error_lines(text)).strip()


REASON_HINT = re.compile(
    r"(?<![\d.])[245]\d\d(?![\d.])|(?<![\d.])[245]\.\d{1,3}\.\d{1,3}(?!\d|\.\d)|"
    r"unknown|not exist|no such|full|quota|reject|denied|refused|block|"
    r"spam|invalid|disabled|timed out|expired|unreachable|too (big|large)|"
    r"relay|policy|not found|doesn.t have|does not have",
    re.I,
)


def _has_reason(block: str) -> bool:
    return bool(REASON_HINT.search(block))


# A line with an SMTP reply or an enhanced status code: the remote answer itself.
ANSWER_HINT = re.compile(r"(?<![\d.])[45]\d\d(?![\d.])|(?<![\d.])[45]\.\d{1,3}\.\d{1,3}(?!\d|\.\d)")


@functools.lru_cache(maxsize=8)
def _error_lines(text: str) -> str:
    """The lines that give a reason, each with the indented lines around it that wrap
    the same answer (it may start before its code: "  SMTP error ... after MAIL\n
    FROM:<...>:\n    550 ..."), at most 12 lines. Lines with the remote answer (a reply
    or status code) when there are any: boilerplate about policies and viruses is no
    reason."""
    hint = ANSWER_HINT if ANSWER_HINT.search(text) else REASON_HINT
    keep: list[str] = []
    for para in re.split(r"\n[ \t]*\n", text):
        lines = para.strip("\n").splitlines()
        taken = -1
        for i, line in enumerate(lines):
            if not hint.search(line):
                continue
            first = i
            while first > max(i - 2, taken + 1) and lines[first - 1][:1].isspace():
                first -= 1  # the indented lines this wrapped answer starts on
            last = i + 1 if i + 1 < len(lines) and lines[i + 1][:1].isspace() else i
            for j in range(max(first, taken + 1), last + 1):
                keep.append(lines[j])
                taken = j
            if len(keep) >= 12:
                return "\n".join(keep[:12])
    return "\n".join(keep)


def _squash(text: str) -> str:
    return re.sub(r"[ \t]*\n[ \t]*", "\n", text).strip()


# ------------------------------------------------------------------------------- entry


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
