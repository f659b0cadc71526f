"""Delivery status notifications Postwarden writes itself (RFC 3464, RFC 6522).

When a tenant wants them (``bounce_notifications``), an application's message that
failed for good, or expired, is reported to its envelope sender the way an MTA does:
a ``multipart/report`` with a human-readable part, a ``message/delivery-status`` part
with one block per failed recipient, and the original headers. It is sent from the
null sender, so that it can never bounce back in a loop, and never for a message that
itself came from the null sender.
"""

from __future__ import annotations

import email.utils
import time
from collections.abc import Sequence
from dataclasses import dataclass
from email.message import Message
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from email.policy import SMTP


@dataclass(frozen=True)
class Failed:
    """One recipient the notification reports."""

    recipient: str
    status: str  # RFC 3463 code, e.g. 5.1.1
    diagnostic: str = ""  # the remote answer, e.g. "550 5.1.1 user unknown"
    remote_mta: str = ""
    expired: bool = False
    last_attempt: float | None = None


def _field_text(value: str) -> str:
    # Header-style fields: one line, printable ASCII (RFC 3464 section 2.1.1).
    text = " ".join(value.split())
    return text.encode("ascii", "replace").decode("ascii")[:900]


def build_dsn(
    *,
    reporting_mta: str,
    sender: str,
    recipients: Sequence[Failed],
    original_headers: bytes,
    arrival: float,
    queue_id: str,
    now: float | None = None,
) -> bytes:
    """The notification's bytes (CRLF line ends), addressed to ``sender``."""
    now = time.time() if now is None else now
    expired = all(r.expired for r in recipients)
    human = [
        f"This is the mail system at host {reporting_mta}.",
        "",
        "Your message could not be delivered to one or more recipients."
        + (" It could not be delivered before it expired." if expired else ""),
        "",
    ]
    for r in recipients:
        human.append(f"<{r.recipient}>: {r.diagnostic or r.status}")
    human += ["", "The headers of your message are attached."]

    report = MIMEMultipart("report", report_type="delivery-status")
    report["From"] = f"Mail Delivery System <MAILER-DAEMON@{reporting_mta}>"
    report["To"] = sender
    report["Subject"] = (
        "Delayed mail expired: returned to sender"
        if expired
        else "Undelivered Mail Returned to Sender"
    )
    report["Date"] = email.utils.formatdate(now, localtime=False)
    report["Message-ID"] = email.utils.make_msgid(domain=reporting_mta)
    report["Auto-Submitted"] = "auto-replied"
    text = "\n".join(human) + "\n"
    report.attach(MIMEText(text, "plain", "us-ascii" if text.isascii() else "utf-8"))

    per_message = Message()
    per_message["Reporting-MTA"] = f"dns; {reporting_mta}"
    per_message["X-Postwarden-Queue-ID"] = queue_id
    per_message["Arrival-Date"] = email.utils.formatdate(arrival, localtime=False)
    blocks = [per_message]
    for r in recipients:
        block = Message()
        block["Final-Recipient"] = f"rfc822; {r.recipient}"
        block["Action"] = "failed"
        block["Status"] = r.status
        if r.remote_mta:
            block["Remote-MTA"] = f"dns; {_field_text(r.remote_mta)}"
        if r.diagnostic:
            block["Diagnostic-Code"] = f"smtp; {_field_text(r.diagnostic)}"
        if r.last_attempt:
            block["Last-Attempt-Date"] = email.utils.formatdate(r.last_attempt, localtime=False)
        blocks.append(block)
    status = Message()
    status.set_type("message/delivery-status")
    status.set_payload(blocks)  # type: ignore[arg-type]
    report.attach(status)

    headers = MIMEText("", "rfc822-headers")
    headers.set_payload(original_headers.decode("utf-8", "replace").rstrip("\r\n") + "\n")
    del headers["Content-Transfer-Encoding"]
    report.attach(headers)
    return report.as_bytes(policy=SMTP)


def header_block(message: bytes) -> bytes:
    """The header section of a message (up to the first empty line)."""
    for sep in (b"\r\n\r\n", b"\n\n"):
        i = message.find(sep)
        if i >= 0:
            return message[: i + len(sep) // 2]
    return message
