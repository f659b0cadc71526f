"""Auto-replies (RFC 3834 ``Auto-Submitted: auto-replied`` and the common vacation
markers): counted, never taken for a bounce."""

from __future__ import annotations

import email.utils
from email.message import Message

from postwarden.bounces.classify import Classifier
from postwarden.bounces.parse.address import clean_addr
from postwarden.bounces.parse.headers import AUTO_REPLY_SUBJECT, BOUNCE_FROM, BOUNCE_SUBJECT
from postwarden.bounces.parse.mime import decode_header
from postwarden.bounces.parse.report import Finding, Report


def auto_reply_report(
    msg: Message, original: Message | None, classifier: Classifier
) -> Report | None:
    """The auto-reply's sender, or None when the message is no auto-reply (nothing to
    classify: ``classifier`` is unused)."""
    auto = (msg.get("auto-submitted") or "").strip().lower()
    subject = decode_header(msg.get("subject"))
    sender = decode_header(msg.get("from"))
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
