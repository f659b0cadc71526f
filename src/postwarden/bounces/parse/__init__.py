"""Bounce, complaint and auto-reply messages into per-recipient findings.

What comes back to a return path is read in this order (docs/bounces.md), one module
per kind, :class:`Parser` dispatching:

1. an RFC 5965 feedback report (ARF) or a provider's JSON notification: complaints
   (:mod:`.arf`, :mod:`.ses`);
2. an RFC 3464 delivery status notification: its per-recipient fields, with the
   human-readable part as the diagnostic where the fields carry none (:mod:`.dsn`);
3. an auto-reply (RFC 3834 ``Auto-Submitted: auto-replied`` and the common vacation
   markers): not a bounce (:mod:`.autoreply`);
4. the non-standard bounces MTAs still send (qmail, Exim, old Postfix and Sendmail,
   Exchange, Domino, webmail providers ...): the addresses the text reports, each with
   the lines that follow it as its diagnostic (:mod:`.text`).

Beneath them: the MIME structure and texts (:mod:`.mime`, HTML by :mod:`.htmltext`),
field blocks (:mod:`.fields`), addresses (:mod:`.address`), a recipient's lines
(:mod:`.blocks`), what the headers say (:mod:`.headers`). Every failure is judged by
the one classifier (:mod:`postwarden.bounces.classify`, through :mod:`.judge`).
"""

from postwarden.bounces.parse.address import ADDR_RE, addresses, clean_addr, clean_remote
from postwarden.bounces.parse.mime import ORIGINAL_MARKERS, split_mbox
from postwarden.bounces.parse.parser import Parser
from postwarden.bounces.parse.report import (
    MAX_DIAGNOSTIC,
    MAX_HTML,
    MAX_RECIPIENTS,
    MAX_TEXT,
    Finding,
    Kind,
    Report,
)

__all__ = [
    "ADDR_RE",
    "MAX_DIAGNOSTIC",
    "MAX_HTML",
    "MAX_RECIPIENTS",
    "MAX_TEXT",
    "ORIGINAL_MARKERS",
    "Finding",
    "Kind",
    "Parser",
    "Report",
    "addresses",
    "clean_addr",
    "clean_remote",
    "split_mbox",
]
