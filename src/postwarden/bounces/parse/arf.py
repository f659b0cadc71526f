"""Complaints: RFC 5965 feedback reports (ARF), and the feedback loops that attach
the message without one (Microsoft's JMRP, older providers)."""

from __future__ import annotations

import email.utils
import re
from email.message import Message

from postwarden.bounces.classify import Classifier
from postwarden.bounces.parse.address import clean_addr
from postwarden.bounces.parse.fields import Fields, fields_of, getter
from postwarden.bounces.parse.mime import decode_header, walk
from postwarden.bounces.parse.report import Finding, Report


def arf_report(msg: Message, original: Message | None, classifier: Classifier) -> Report | None:
    """The complaint a message reports, or None when it is no complaint (a complaint
    is not classified: ``classifier`` is unused)."""
    fields: Fields | None = None
    for part, inside in walk(msg):
        if inside:
            continue
        if part.get_content_type() == "message/feedback-report":
            fields = fields_of(part)
            break
    if fields is None:
        return _complaint_without_report(msg, original)
    get = getter(fields)
    ftype = (get("feedback-type") or "abuse").strip().lower()
    rcpts = [clean_addr(v) for k, v in fields if k == "original-rcpt-to"]
    rcpts += [clean_addr(v) for k, v in fields if k == "removal-recipient"]
    found = [r for r in rcpts if r]
    if not found and original is not None:
        found = [
            clean_addr(a) or "" for _n, a in email.utils.getaddresses(original.get_all("to", []))
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
                diagnostic=decode_header(get("user-agent")) or "",
            )
        )
    return Report("arf", out)


def _complaint_without_report(msg: Message, original: Message | None) -> Report | None:
    """Feedback loops that attach the message without an ARF part (Microsoft's
    JMRP, older providers): a complaint subject or the providers' own header."""
    if original is None:
        return None
    subject = decode_header(msg.get("subject"))
    hm = original.get("x-hmxmroriginalrecipient")
    if not hm and not re.search(
        r"complaint about message|abuse report|spam report|feedback report|scomp|fbl",
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
