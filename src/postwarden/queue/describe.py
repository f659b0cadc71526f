"""Words for operators: why a recipient waits, and one line per event.

Plain functions over the rows :class:`postwarden.queue.admin.QueueAdmin` returns, for
``postwarden queue list`` and ``postwarden events``; no I/O.
"""

from __future__ import annotations

import datetime
import re
import time
from collections.abc import Mapping
from typing import Any

from postwarden.values import (
    ACTIVE,
    BOUNCED,
    DEFERRED,
    DELETED,
    DELIVERED,
    DROPPED,
    EXPIRED,
    QUEUED,
)

# A remote answer longer than this is cut, at a word boundary, with an ellipsis.
MAX_ANSWER = 300

# The shaping broker's refusals (postwarden.values.REFUSALS) in words.
SHAPING_WAITS = {
    "connection_limit": "throttled (connection limit)",
    "connection_rate": "throttled (connection rate limit)",
    "message_rate": "throttled (message rate limit)",
    "suspended": "throttled (suspended by a response rule)",
    "warming_cap": "warming cap",
    "domain_warming_cap": "sending domain's warming cap",
    "paused": "source paused",
    "domain_paused": "sending domain paused",
    "no_source": "no source to send from",
    "broker_unavailable": "shaping broker unavailable",
}


def local_time(ts: float | None) -> str:
    """``YYYY-MM-DD HH:MM:SS`` in local time; ``-`` for none."""
    if not ts:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def iso_time(ts: float) -> str:
    """ISO 8601 in UTC, to the millisecond (``2024-05-01T12:00:00.250+00:00``)."""
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).isoformat(timespec="milliseconds")


def one_line(text: str | None, limit: int = MAX_ANSWER) -> str:
    """A remote answer on one line: whitespace runs (a multi-line reply's line breaks)
    become one space; whole when it fits in ``limit`` characters, else cut at the last
    word boundary before it, with an ellipsis. Never mid-word (a single word longer
    than the limit is kept whole)."""
    flat = re.sub(r"\s+", " ", text or "").strip()
    if len(flat) <= limit:
        return flat
    cut = flat.rfind(" ", 0, limit)
    if cut <= 0:
        cut = flat.find(" ", limit)
        if cut < 0:
            return flat
    return flat[:cut].rstrip() + " …"


def shaping_wait(wait_reason: str) -> str:
    """``"<kind>: <reason>"`` (the spool's ``wait_reason``) in words."""
    kind, _, reason = wait_reason.partition(": ")
    label = SHAPING_WAITS.get(kind, kind.replace("_", " "))
    # The broker's reason often just names the kind ("message rate"): said once.
    if reason and reason.replace(" ", "_") != kind:
        return f"{label}: {reason}"
    return label


def why(row: Mapping[str, Any], now: float | None = None) -> str:
    """Why a recipient (a :meth:`QueueAdmin.list` row) is where it is, in words."""
    now = time.time() if now is None else now
    state = row["state"]
    answer = one_line(row.get("last_response"))
    when = float(row.get("next_attempt") or 0)
    due = "now" if when <= now else local_time(when)
    if state == ACTIVE:
        return "active: being delivered (leased for an attempt)"
    if state in (QUEUED, DEFERRED):
        if row.get("held"):
            last = f"; last answer: {answer}" if answer else ""
            return f"held by an operator: not tried until released{last}"
        if row.get("wait_reason") and when > now:
            return (
                f"waiting for traffic shaping, {shaping_wait(row['wait_reason'])}; next try {due}"
            )
        if state == DEFERRED:
            return f"deferred: the remote answered {answer or '(nothing)'}; next try {due}"
        return "queued: due now" if when <= now else f"queued: next try {due}"
    if state == DELIVERED:
        return f"delivered: {answer}"
    if state == BOUNCED:
        return f"bounced: {answer}"
    if state == EXPIRED:
        return f"expired: {answer}"
    if state == DROPPED:
        return f"dropped, never sent: {answer}"
    if state == DELETED:
        return "deleted by an operator"
    return state


# ------------------------------------------------------------------------ events


def _event_detail(ev: Mapping[str, Any]) -> str:
    """What matters in an event, by type: the remote answer, the reason, ..."""
    kind = ev["type"]
    d: Mapping[str, Any] = ev.get("detail") or {}
    parts: list[str] = []
    if kind == "accepted":
        if d.get("mail_from") is not None:
            parts.append(f"from=<{d['mail_from']}>")
        if d.get("tenant"):
            parts.append(f"tenant={d['tenant']}")
        if d.get("size") is not None:
            parts.append(f"size={d['size']}")
        if d.get("client_ip"):
            parts.append(f"client={d['client_ip']}")
    elif kind == DROPPED or ("reason" in d and "response" not in d):
        parts.append(f"reason: {d.get('reason')}")
        if d.get("stage"):
            parts.append(f"(at {d['stage']})")
    elif kind in ("held", "released", "flushed", "deleted"):
        parts.append(f"by {d.get('by', 'operator')}")
    else:
        if d.get("mx"):
            parts.append(f"mx={d['mx']}")
        if kind == BOUNCED and d.get("category"):
            parts.append(f"category={d['category']}")
        if kind == DEFERRED and d.get("next_attempt"):
            parts.append(f"next try {local_time(float(d['next_attempt']))}")
        if d.get("response"):
            parts.append(one_line(str(d["response"])))
    return " ".join(parts)


def event_line(ev: Mapping[str, Any]) -> str:
    """One event on one line: local time, type, recipient, message id, what matters."""
    line = (
        f"{local_time(float(ev['ts']))}  {ev['type']:<9} {ev.get('rcpt') or '-'}"
        f"  msg={ev['msg_id']}"
    )
    detail = _event_detail(ev)
    return f"{line}  {detail}" if detail else line


def event_json(ev: Mapping[str, Any]) -> dict[str, Any]:
    """An event for machines: ``time`` (ISO 8601) and every original field."""
    return {"time": iso_time(float(ev["ts"])), **ev}
