"""Operator actions on the spool index, for ``postwarden queue ...`` and ``events``.

These open the index with their own SQLite connection (WAL allows it while the
appliance runs). State changes only touch recipients that are not being delivered
right now (``active``), so an operator never races a delivery attempt; each change is
an event.
"""

from __future__ import annotations

import builtins
import json
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from postwarden.queue.spool import FINAL_STATES

_FINAL_PLACEHOLDERS = "(" + ",".join("?" * len(FINAL_STATES)) + ")"


class QueueAdmin:
    """Read and change the queue from outside the appliance process."""

    def __init__(self, spool_path: str | Path) -> None:
        path = Path(spool_path) / "index.db"
        if not path.exists():
            raise FileNotFoundError(f"no spool index at {path}")
        self.db = sqlite3.connect(path, isolation_level=None, timeout=30)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA busy_timeout=30000")

    def close(self) -> None:
        self.db.close()

    def list(self, state: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        sql = (
            "SELECT r.msg_id, r.id AS rcpt_id, r.rcpt, r.state, r.held, r.attempts,"
            " r.next_attempt, r.last_response, m.mail_from, m.received_at"
            " FROM recipients r JOIN messages m ON m.id = r.msg_id"
        )
        args: builtins.list[Any] = []
        if state == "held":
            sql += " WHERE r.held = 1"
        elif state:
            sql += " WHERE r.state = ?"
            args.append(state)
        sql += " ORDER BY m.received_at, r.id LIMIT ?"
        args.append(limit)
        return [dict(r) for r in self.db.execute(sql, args)]

    def summary(self) -> dict[str, int]:
        rows = self.db.execute("SELECT state, COUNT(*) FROM recipients GROUP BY state")
        out = {r[0]: r[1] for r in rows}
        out["held"] = self.db.execute("SELECT COUNT(*) FROM recipients WHERE held=1").fetchone()[0]
        out["messages"] = self.db.execute("SELECT COUNT(*) FROM messages").fetchone()[0]
        return out

    def show(self, msg_id: str) -> dict[str, Any] | None:
        msg = self.db.execute("SELECT * FROM messages WHERE id = ?", (msg_id,)).fetchone()
        rcpts = [
            dict(r)
            for r in self.db.execute(
                "SELECT id, rcpt, state, held, attempts, next_attempt, last_response"
                " FROM recipients WHERE msg_id = ? ORDER BY id",
                (msg_id,),
            )
        ]
        events = self.events(msg_id=msg_id, limit=10_000)
        if msg is None and not events:
            return None
        return {
            "id": msg_id,
            "message": dict(msg) if msg else None,
            "recipients": rcpts,
            "events": events,
            "in_queue": msg is not None,
        }

    def events(
        self, *, msg_id: str | None = None, after: int = 0, limit: int = 100
    ) -> builtins.list[dict[str, Any]]:
        sql = "SELECT * FROM events WHERE id > ?"
        args: builtins.list[Any] = [after]
        if msg_id:
            sql += " AND msg_id = ?"
            args.append(msg_id)
        sql += " ORDER BY id LIMIT ?"
        args.append(limit)
        out = []
        for r in self.db.execute(sql, args):
            d = dict(r)
            d["detail"] = json.loads(d["detail"] or "{}")
            out.append(d)
        return out

    def last_event_id(self) -> int:
        return int(self.db.execute("SELECT COALESCE(MAX(id), 0) FROM events").fetchone()[0])

    def tail(self, poll: float = 0.5, after: int | None = None) -> Iterator[dict[str, Any]]:
        last = self.last_event_id() if after is None else after
        while True:
            batch = self.events(after=last, limit=1000)
            for ev in batch:
                last = ev["id"]
                yield ev
            if not batch:
                time.sleep(poll)

    # -- actions

    def _where(self, msg_id: str | None) -> tuple[str, builtins.list[Any]]:
        if msg_id in (None, "ALL"):
            return "", []
        return " AND msg_id = ?", [msg_id]

    def _act(self, sql: str, args: builtins.list[Any], event: str, msg_id: str | None) -> int:
        where, wargs = self._where(msg_id)
        now = time.time()
        self.db.execute("BEGIN IMMEDIATE")
        try:
            ids = [
                tuple(r)
                # Only constant fragments are concatenated; every value is bound.
                for r in self.db.execute(
                    "SELECT id, msg_id, rcpt FROM recipients WHERE state IN ('queued','deferred')"  # noqa: S608
                    + sql
                    + where,
                    args + wargs,
                )
            ]
            for rid, mid, rcpt in ids:
                self._apply(event, rid, now)
                self.db.execute(
                    "INSERT INTO events(ts, type, msg_id, rcpt_id, rcpt, detail)"
                    " VALUES (?,?,?,?,?,?)",
                    (now, event, mid, rid, rcpt, json.dumps({"by": "operator"})),
                )
            if event == "deleted":
                self._remove_finished({mid for _, mid, _ in ids})
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        return len(ids)

    def _apply(self, event: str, rid: int, now: float) -> None:
        if event == "held":
            self.db.execute("UPDATE recipients SET held=1, updated_at=? WHERE id=?", (now, rid))
        elif event == "released":
            self.db.execute("UPDATE recipients SET held=0, updated_at=? WHERE id=?", (now, rid))
        elif event == "flushed":
            self.db.execute(
                "UPDATE recipients SET next_attempt=?, updated_at=? WHERE id=?", (now, now, rid)
            )
        elif event == "deleted":
            self.db.execute(
                "UPDATE recipients SET state='deleted', updated_at=? WHERE id=?", (now, rid)
            )

    def _remove_finished(self, msg_ids: set[str]) -> None:
        for mid in msg_ids:
            n = self.db.execute(
                "SELECT COUNT(*) FROM recipients WHERE msg_id=? AND state NOT IN "  # noqa: S608
                + _FINAL_PLACEHOLDERS,
                (mid, *FINAL_STATES),
            ).fetchone()[0]
            self.db.execute("UPDATE messages SET remaining=? WHERE id=?", (n, mid))
            if n == 0:
                seg = self.db.execute("SELECT segment FROM messages WHERE id=?", (mid,)).fetchone()
                self.db.execute("DELETE FROM recipients WHERE msg_id=?", (mid,))
                self.db.execute("DELETE FROM messages WHERE id=?", (mid,))
                if seg is not None:
                    # The appliance's writer removes the file when it next sees the
                    # segment empty (at rotation or restart).
                    self.db.execute("UPDATE segments SET live = live - 1 WHERE id=?", (seg[0],))

    def hold(self, msg_id: str | None) -> int:
        return self._act(" AND held = 0", [], "held", msg_id)

    def release(self, msg_id: str | None) -> int:
        return self._act(" AND held = 1", [], "released", msg_id)

    def flush(self, msg_id: str | None = None) -> int:
        return self._act(" AND held = 0", [], "flushed", msg_id)

    def delete(self, msg_id: str | None) -> int:
        return self._act("", [], "deleted", msg_id)
