"""The non-standard bounces MTAs still send (qmail, Exim, old Postfix and Sendmail,
Exchange, Domino, webmail providers ...): the addresses the text reports, each with the
lines that follow it as its diagnostic."""

from __future__ import annotations

import dataclasses
import email.utils
import re
from email.message import Message

from postwarden.bounces.classify import Classifier
from postwarden.bounces.parse.address import ADDR_RE, addresses, clean_addr
from postwarden.bounces.parse.blocks import block_at, error_lines, has_reason, squash
from postwarden.bounces.parse.headers import BOUNCE_FROM, BOUNCE_SUBJECT, filter_gateway
from postwarden.bounces.parse.judge import judge
from postwarden.bounces.parse.mime import body_text, decode_header
from postwarden.bounces.parse.report import MAX_RECIPIENTS, Finding, Report

SYSTEM_LOCAL = re.compile(
    r"^(mailer-daemon|postmaster|mail-daemon|maildaemon|mailerdaemon|daemon|root|noreply|"
    r"no-reply|bounce|bounces|double-bounce|nobody|abuse|mdaemon)$",
    re.I,
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
ANCHORED_RE = re.compile(
    r"^[ \t>*\-]*+(?:[245]\d\d[ -](?:[245]\.\d{1,3}\.\d{1,3}[ ])?)?"
    r"(?:(?:RCPT\s+TO|To|Recipient(?:\s+address)?|Address|Failed\s+recipient|"
    r"Original\s+recipient|Final\s+recipient|Empfänger|Destinataire|Addressee)\s*:?\s*)?"
    r"[\"']?<?(?:mailto:)?([^\s<>\"'(),;:@]+@[^\s<>\"'(),;:]+?)>?[\"']?\s*(?::|\.\.\.|\s|,|;|\(|$)",
    re.M | re.I,
)
_EXPANDED_RE = re.compile(r">?\s*\(expanded from:?\s*<?([^\s<>()@]+@[^\s<>()]+?)>?\)", re.I)
_ID_FIELD_RE = re.compile(
    r"\b(message-id|references|in-reply-to|content-id|resent-message-id)[ \t]*:"
    r"[ \t]*(?:\n[ \t]+)?(?:<[^<>\s]{1,250}>[ \t]*(?:\n[ \t]+)?)*+<?$",
    re.I,
)


def text_report(msg: Message, original: Message | None, classifier: Classifier) -> Report | None:
    """A finding per address the text reports, or None when it reads like no bounce."""
    subject = decode_header(msg.get("subject"))
    sender = decode_header(msg.get("from"))
    text = body_text(msg)
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
    gateway = filter_gateway(msg, classifier.exclude_families)
    exclude, weak = _sender_side(msg, original)
    failed = [
        clean_addr(a) for _n, a in email.utils.getaddresses(msg.get_all("x-failed-recipients", []))
    ]
    rcpts = candidates(text, exclude | weak) or candidates(text, exclude)
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
        block = block_at(text, pos, positions) if pos >= 0 else ""
        diag = block if has_reason(block) else (block + "\n" + error_lines(text)).strip()
        if not diag:
            diag = text
        action = "delayed" if permanent is False else "failed"
        # A bounce message is final unless it says it is a warning.
        f = judge(classifier, addr, None, action, squash(diag), None, gateway=gateway)
        out.append(f)
        if addr in expanded:
            out.append(dataclasses.replace(f, recipient=expanded[addr]))
    return Report("text", out, guessed=guessed)


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


def candidates(text: str, exclude: set[str]) -> list[tuple[str, int]]:
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
