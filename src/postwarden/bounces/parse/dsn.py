"""RFC 3464 delivery status notifications: a finding per recipient block, with the
human-readable part as the diagnostic where the fields carry none."""

from __future__ import annotations

import dataclasses
import email.utils
import re
from email.message import Message

from postwarden.bounces.classify import Classifier, find_status
from postwarden.bounces.parse.address import clean_addr, clean_remote, is_address
from postwarden.bounces.parse.blocks import block_for
from postwarden.bounces.parse.fields import Fields, blocks_from_text, blocks_of, diag_text, getter
from postwarden.bounces.parse.headers import filter_gateway
from postwarden.bounces.parse.judge import judge
from postwarden.bounces.parse.mime import body_text, walk
from postwarden.bounces.parse.report import MAX_RECIPIENTS, Finding, Report

_STATUS_PARTS = (
    "message/delivery-status",
    "message/global-delivery-status",
    "text/delivery-status",
)


def has_status_part(msg: Message) -> bool:
    """Whether the message itself (not an attachment) carries delivery-status fields."""
    return any(
        not inside and part.get_content_type().endswith("delivery-status")
        for part, inside in walk(msg)
    )


def dsn_report(msg: Message, original: Message | None, classifier: Classifier) -> Report | None:
    """A finding per recipient block, or None when the message has none."""
    blocks: list[Fields] = []
    for part, inside in walk(msg):
        if not inside and part.get_content_type() in _STATUS_PARTS:
            blocks += blocks_of(part)
    if not blocks:
        # Fields pasted into a plain text body (some gateways do that).
        text = body_text(msg, cut=False)
        if re.search(r"^\s*Final-Recipient:", text, re.M | re.I) and re.search(
            r"^\s*(Status|Action):", text, re.M | re.I
        ):
            blocks = blocks_from_text(text)
    per_rcpt = [
        b for b in blocks if any(k in ("final-recipient", "original-recipient") for k, _ in b)
    ][:MAX_RECIPIENTS]
    if not per_rcpt:
        return None
    human = body_text(msg)
    failed = [
        clean_addr(a) for _n, a in email.utils.getaddresses(msg.get_all("x-failed-recipients", []))
    ]
    gateway = filter_gateway(msg, classifier.exclude_families)
    out: list[Finding] = []
    for b in per_rcpt:
        get = getter(b)
        rcpt = clean_addr(get("final-recipient")) or clean_addr(get("original-recipient"))
        if not is_address(rcpt):
            # A file, a pipe, a host without a domain: the address the sender used.
            rcpt = next(
                (a for a in (clean_addr(get("original-recipient")), *failed) if is_address(a)),
                rcpt,
            )
        action = (get("action") or "").strip().lower().split()[0] if get("action") else None
        status_field = find_status(get("status") or "")
        diag = diag_text(get("diagnostic-code") or "")
        bare = not re.search(r"[A-Za-z]{3}", diag)  # no words: the text says them
        block = block_for(human, rcpt) if bare or len(per_rcpt) > 1 else human
        if bare:
            diag = (diag + " " + block).strip()
        remote = clean_remote(get("remote-mta")) or None
        context = block if len(per_rcpt) > 1 else human
        found = judge(
            classifier, rcpt, status_field, action, diag, remote, context, gateway=gateway
        )
        out.append(found)
        orig = clean_addr(get("original-recipient"))
        if orig and rcpt and orig.lower() != rcpt.lower() and "@" in orig:
            # Forwarded or rewritten: the address the sender used is reported too.
            out.append(dataclasses.replace(found, recipient=orig))
    return Report("dsn", out)
