"""Amazon SES notifications (bounce, complaint, delivery), as JSON in a message body or
in an SNS envelope."""

from __future__ import annotations

import json
import re
from email.message import Message
from typing import Any

from postwarden.bounces.classify import Classifier, find_status
from postwarden.bounces.parse.address import clean_addr
from postwarden.bounces.parse.mime import part_text
from postwarden.bounces.parse.report import Finding, Report


def ses_report(msg: Message, original: Message | None, classifier: Classifier) -> Report | None:
    """What a notification reports, or None when the message is none."""
    if msg.is_multipart():
        return None
    text = part_text(msg)
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
        data = _salvage(text)
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
                    feedback_type=str(data["complaint"].get("complaintFeedbackType") or "abuse"),
                )
            )
    elif ntype == "bounce":
        b = data.get("bounce") or {}
        permanent = str(b.get("bounceType", "")).lower() == "permanent"
        for r in b.get("bouncedRecipients", []):
            diag = str(r.get("diagnosticCode") or "")
            status = r.get("status") or find_status(diag)
            v = classifier.classify(status, None, diag, permanent=permanent)
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
                    evidence="weak" if v.weak else "strong",
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


def _salvage(text: str) -> dict[str, Any] | None:
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
