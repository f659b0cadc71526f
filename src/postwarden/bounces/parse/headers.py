"""What a message's own header fields say it is: a bounce (by its sender or subject),
an auto-reply, a report written by a content-filtering gateway."""

from __future__ import annotations

import functools
import re
from email.message import Message

from postwarden.bounces.parse.mime import decode_header
from postwarden.bounces.provenance import NOTHING, switch_on

BOUNCE_FROM = re.compile(
    r"mailer-daemon|mail-daemon|post_?master|mail delivery|delivery (status|subsystem)|"
    r"mail administrator|maildelivery|mdaemon|mailerdaemon|mail system|"
    r"undeliverable|bounce|daemon@|notification|returned mail|nobody@",
    re.I,
)
BOUNCE_SUBJECT = re.compile(
    r"undeliver|undelivered|delivery (status|failure|failed|notification|problem|report)|"
    r"failure notice|returned mail|returned to sender|mail delivery|could not be delivered|"
    r"non[- ]?remis|nicht zustellbar|unzustellbar|error sending|delivery error|"
    r"failed delivery|mail system error|permanent error|message not delivered|"
    r"no se puede entregar|non recapitabile|bounce|rejected|warning: could not send|"
    r"delayed mail|delivery delayed|delivery has failed|mail failure|unable to deliver|"
    r"message status|nondeliverable|not delivered|mail error|de entrega|kann nicht",
    re.I,
)
AUTO_REPLY_SUBJECT = re.compile(
    r"^\s*(auto(matic)?[ -]?(reply|response|antwort|answer|respuesta|risposta)|"
    r"auto:|autoreply|out of (the )?office|abwesenheit|absence|absent|vacation|"
    r"on vacation|away from|r[ée]ponse automatique|i am (currently )?(away|out)|"
    r"respuesta autom|risposta automatica|automatisch|office closed|out of town|"
    r"\[?auto|away until|ooo\b)",
    re.I,
)

# Content-filtering gateways that write their own delivery reports, by the header
# fields they add, each a rule of its own family (provenance.SWITCHES).
_GATEWAYS = {
    "gateway-mcafee": r"x-nai-header:",  # McAfee (NAI) Email Gateway
    "gateway-surfcontrol": r"x-sef-|x-mailer: *surfcontrol",
    "gateway-m-filter": r"x-mailer: *m-filter",
    "gateway-mailfoundry": r"received:.*\(mailfoundry\)",
}
_DAEMON_RE = re.compile(r"mailer-daemon|mail delivery (system|subsystem)|postmaster@", re.I)


@functools.cache
def _gateway_re(excluded: frozenset[str]) -> re.Pattern[str] | None:
    alts = [rx for name, rx in _GATEWAYS.items() if switch_on(name, excluded)]
    return re.compile("^(?:" + "|".join(alts) + ")", re.I | re.M) if alts else None


def filter_gateway(msg: Message, excluded: frozenset[str] = NOTHING) -> bool:
    """Whether a content-filtering gateway wrote the report (it refuses what it read).
    ``excluded``: the families whose rules are left out (provenance.py)."""
    rx = _gateway_re(excluded)
    if rx is None:
        return False
    heads = "\n".join(f"{k}: {v}" for k, v in msg.items())
    return rx.search(heads) is not None


def bounce_like(msg: Message, *, strict: bool) -> bool:
    """Whether an attached message is itself a bounce or a report, not the original.
    ``strict``: a report, or from a mailer daemon with a bounce's subject (always read
    beside the wrapper); else any sign of one (a bounce header, a bounce-like sender or
    subject), used only when the wrapper names nobody."""
    if msg.get_content_type() == "multipart/report":
        return True
    sender = decode_header(msg.get("from"))
    subject = decode_header(msg.get("subject"))
    if strict:
        return bool(_DAEMON_RE.search(sender) and BOUNCE_SUBJECT.search(subject))
    return bool(
        msg.get("x-failed-recipients")
        or (msg.get("return-path") or "").strip() == "<>"
        or BOUNCE_FROM.search(sender)
        or BOUNCE_SUBJECT.search(subject)
    )
