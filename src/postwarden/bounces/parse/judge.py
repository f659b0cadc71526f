"""One recipient's finding from what a report says about it: status, action,
diagnostic and the text around them, judged by the one classifier."""

from __future__ import annotations

import re

from postwarden.bounces.classify import Classifier, find_stage, find_status
from postwarden.bounces.parse.report import MAX_DIAGNOSTIC, Finding
from postwarden.bounces.provenance import switch_on


def judge(
    classifier: Classifier,
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
        if (
            stage == "data"
            and switch_on("sendmail-pipelining", classifier.exclude_families)
            and (
                (status_field and not status_field.endswith(".0"))
                or re.search(r"\b503\b|precede data|no valid recipients", context, re.I)
            )
        ):
            stage = None
    v = classifier.classify(status, None, diag, permanent=permanent, stage=stage)
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
        # and without the command it answered says nothing sure about the address:
        # content-filtering gateways answer so at the end of DATA (RFC 5321 accepts
        # or refuses a recipient at RCPT; Sisimai calls it "filtered"). Soft; it
        # still counts towards the soft-bounce limit (bounces.feedback).
        hard = False
        category = "filtered"
    # Weak: the classifier's own verdict stood on a basic reply code or on nothing, or
    # the answer is an unconfirmed address refusal. An expiry read from the report's
    # action and status is not weak.
    weak = (v.weak and category == v.category) or category == "filtered"
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
        evidence="weak" if weak else "strong",
    )
