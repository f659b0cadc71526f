"""What the parser hands on: one :class:`Report` per message, a :class:`Finding` per
recipient it names."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from email.message import Message
from typing import Any

Kind = str  # bounce | delayed | complaint | auto_reply | delivered

# Limits on what one report may cost to read: the recipients of one report (a list
# exploder's bounce rarely names more), the characters of its text searched, those of
# its HTML read (HTMLParser takes some microseconds a tag), and those of one diagnostic
# classified.
MAX_RECIPIENTS = 200
MAX_TEXT = 500_000
MAX_HTML = 500_000
MAX_DIAGNOSTIC = 4000


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
    #: For a failure: ``strong``, or ``weak`` when nothing but a basic reply code or
    #: nothing at all decided its reason, or the answer is an unconfirmed address
    #: refusal (``filtered``): "we could not tell", never a hard bounce.
    evidence: str | None = None

    def as_json(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("kind", "reply_code", "feedback_type", "evidence"):
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
