"""The dispatcher: each message read by the steps in order, the first that recognises
it answering, and a report attached to a report read as well."""

from __future__ import annotations

import email
from collections.abc import Callable, Iterable
from email.message import Message

from postwarden.bounces.classify import Classifier, default_classifier
from postwarden.bounces.parse.arf import arf_report
from postwarden.bounces.parse.autoreply import auto_reply_report
from postwarden.bounces.parse.dsn import dsn_report, has_status_part
from postwarden.bounces.parse.headers import bounce_like
from postwarden.bounces.parse.mime import POLICY, original_of, split_mbox
from postwarden.bounces.parse.report import Finding, Report
from postwarden.bounces.parse.ses import ses_report
from postwarden.bounces.parse.text import text_report
from postwarden.bounces.provenance import excluded_families

#: A step: (the message, the original it quotes, the classifier) -> what it reports,
#: or None when the message is not of the step's kind.
Step = Callable[[Message, Message | None, Classifier], Report | None]

# The order of docs/bounces.md: complaints, DSNs, auto-replies, free text.
STEPS: tuple[Step, ...] = (arf_report, ses_report, dsn_report, auto_reply_report, text_report)


class Parser:
    def __init__(
        self, classifier: Classifier | None = None, *, exclude_families: Iterable[str] = ()
    ) -> None:
        """``exclude_families``: read as if no rule had been written from those
        families' reports (provenance.py; the classifier's own exclusion when one is
        given). Empty in production."""
        excluded = excluded_families(exclude_families)
        if classifier is None:
            classifier = Classifier(None, exclude_families=excluded) if excluded else None
        elif excluded and excluded != classifier.exclude_families:
            raise ValueError("exclude_families differs from the classifier's")
        self.classifier = classifier or default_classifier()

    def parse_file(self, data: bytes) -> list[Finding]:
        """Every finding of a file: one message, or an mbox of several."""
        return [f for msg in split_mbox(data) for f in self.parse_bytes(msg).findings]

    def parse_bytes(self, data: bytes) -> Report:
        # Mail comes off the wire with CRLF, files mostly with LF: one line ending, so
        # that no "\r" is left in the texts the patterns read.
        data = data.replace(b"\r\n", b"\n")
        msg = email.message_from_bytes(data, policy=POLICY)
        report = self.parse(msg)
        if not report.raw_text:
            report.raw_text = data.decode("utf-8", "replace")
        return report

    def parse(self, msg: Message, depth: int = 0) -> Report:
        original = original_of(msg)
        nested = depth == 0 and original is not None and bounce_like(original, strict=True)
        report = Report("none", original=original)
        if not nested or has_status_part(msg):
            for step in STEPS:
                got = step(msg, original, self.classifier)
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
            if inner.kind in ("dsn", "arf", "json") or bounce_like(original, strict=False):
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
