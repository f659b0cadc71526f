"""The SQL of every state change a message or recipient goes through outside delivery.

Plain functions over a connection to a shard's index, inside the caller's
transaction: the spool's writer thread calls them, and so does
:class:`postwarden.queue.admin.QueueAdmin` (the ``queue`` commands) with its own
connection while the appliance runs. Only the running spool unlinks segment files.
"""

from __future__ import annotations

import json
import sqlite3
from typing import Any


def insert_event(
    db: sqlite3.Connection, ts: float, kind: str, msg_id: str, rid: int | None,
    rcpt: str | None, detail: dict[str, Any],
) -> dict[str, Any]:  # fmt: skip
    """Append an event to the log; returns it as the event listeners see it."""
    payload = json.dumps(detail, separators=(",", ":"), default=str)
    cur = db.execute(
        "INSERT INTO events(ts, type, msg_id, rcpt_id, rcpt, detail) VALUES (?,?,?,?,?,?)",
        (ts, kind, msg_id, rid, rcpt, payload),
    )
    return {
        "id": cur.lastrowid, "ts": ts, "type": kind, "msg_id": msg_id,
        "rcpt_id": rid, "rcpt": rcpt, "detail": detail,
    }  # fmt: skip


def settle_message(db: sqlite3.Connection, msg_id: str, finished: int) -> int | None:
    """``finished`` more recipients of a message are done; when none is left pending,
    its rows go and its segment's live count drops. Returns that segment's id when no
    message lives in it any more (its file can go, unless it is being written)."""
    if finished:
        db.execute("UPDATE messages SET remaining = remaining - ? WHERE id = ?", (finished, msg_id))
    row = db.execute("SELECT remaining, segment FROM messages WHERE id = ?", (msg_id,)).fetchone()
    if row is None or row[0] > 0:
        return None
    seg = int(row[1])
    db.execute("DELETE FROM recipients WHERE msg_id = ?", (msg_id,))
    db.execute("DELETE FROM messages WHERE id = ?", (msg_id,))
    db.execute("UPDATE segments SET live = live - 1 WHERE id = ?", (seg,))
    left = db.execute("SELECT live FROM segments WHERE id = ?", (seg,)).fetchone()
    return seg if left is not None and left[0] <= 0 else None


# Operator actions: which waiting recipients each touches, the change, its event.
OPERATOR_ACTIONS: dict[str, tuple[str, str, str]] = {
    "hold": ("held = 0", "held = 1", "held"),
    "release": ("held = 1", "held = 0", "released"),
    "flush": ("held = 0", "next_attempt = :now", "flushed"),
    "delete": ("1", "state = 'deleted'", "deleted"),
}
# The actions that end a wait for traffic shaping (``wait_reason``): the recipient is
# due now, or gone. Hold and release leave the schedule, and so its reason, as it was.
_ENDS_WAIT = ("flush", "delete")


def operator_action(
    db: sqlite3.Connection, action: str, msg_id: str | None, now: float,
    *, wait_column: bool = True,
) -> tuple[list[dict[str, Any]], list[int]]:  # fmt: skip
    """Apply an operator action (:data:`OPERATOR_ACTIONS`) to the waiting recipients
    (``queued``, ``deferred``; never one being delivered) of one message, or of all
    when ``msg_id`` is None; one event each. Runs in the caller's transaction.
    ``wait_column=False``: the index is of a schema before 4 (no ``wait_reason``; a
    running appliance of an older version upgrades it at its next start).

    Returns the events and the segments left with no live message (by deletes)."""
    which, change, kind = OPERATOR_ACTIONS[action]
    if wait_column and action in _ENDS_WAIT:
        change += ", wait_reason = NULL"
    # Only constant fragments (OPERATOR_ACTIONS) are concatenated; values are bound.
    sql = (
        "SELECT id, msg_id, rcpt FROM recipients WHERE state IN ('queued','deferred')"  # noqa: S608
        f" AND {which}" + (" AND msg_id = :msg" if msg_id is not None else "")
    )
    rows = db.execute(sql, {"msg": msg_id}).fetchall()
    events: list[dict[str, Any]] = []
    deleted: dict[str, int] = {}
    for rid, mid, rcpt in rows:
        db.execute(
            f"UPDATE recipients SET {change}, updated_at = :now WHERE id = :id",  # noqa: S608
            {"now": now, "id": rid},
        )
        events.append(insert_event(db, now, kind, mid, rid, rcpt, {"by": "operator"}))
        if action == "delete":
            deleted[mid] = deleted.get(mid, 0) + 1
    emptied = [seg for mid, n in deleted.items() if (seg := settle_message(db, mid, n)) is not None]
    return events, emptied
