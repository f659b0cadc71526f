"""Delivery's events onto campaigns' send records (issue 21; docs/campaigns.md).

A campaign message has one recipient, and its record holds the message id before the
message reaches the spool, so each event (``deferred``, ``delivered``, ``bounced``,
``expired``, ``dropped``, ``complained``, ``deleted``) finds its record by message id. The events
are read in id order after a cursor (``event_cursors`` row :data:`CURSOR`); their ids
become visible in the order they are drawn (``store.feed.lock_events``), so none is
passed over. One reader at a time: the cursor's row is locked for the step.

A record only moves forward (:data:`RANK`): an event that arrives late never undoes a
later one, and a step repeated after a crash changes nothing.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from typing import Any

from sqlalchemy import Table, bindparam, func, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession

from postwarden.store.campaign_models import SendRecord
from postwarden.store.models import Event, EventCursor

CURSOR = "campaign-outcomes"
#: Events read per step.
BATCH = 2000
RECORDS: Table = SendRecord.__table__  # type: ignore[assignment]

#: A record's states in the order they may follow one another.
RANK = {"pending": 0, "queued": 1, "deferred": 2, "delivered": 3, "bounced": 4, "complained": 5}
#: Event type -> the record's state after it.
STATE_OF = {
    "deferred": "deferred",
    "delivered": "delivered",
    "bounced": "bounced",
    "expired": "bounced",
    "dropped": "suppressed",
    "complained": "complained",
    "deleted": "cancelled",  # taken out of the spool (a cancelled campaign's, or by hand)
}


def new_cursor(s: AsyncSession, last_id: int, name: str = CURSOR) -> Any:
    """Insert the cursor's row unless it is there."""
    pg = s.get_bind().dialect.name == "postgresql"
    insert = (postgresql if pg else sqlite).insert(EventCursor)
    return insert.values(shard=name, last_id=last_id).on_conflict_do_nothing()


def _before(state: str) -> tuple[str, ...]:
    """The states a record may be in to move to ``state``."""
    if state in ("suppressed", "cancelled"):  # never delivered
        return ("pending", "queued", "deferred")
    if state == "deferred":
        return ("pending", "queued", "deferred")
    return tuple(s for s, r in RANK.items() if r < RANK[state])


def _reason(kind: str, detail: dict[str, Any]) -> str:
    if kind == "expired":
        return "expired"
    if kind == "dropped":
        return str(detail.get("reason") or "suppressed")
    if kind == "deleted":
        return "deleted from the queue"
    if kind in ("bounced", "deferred"):
        return str(detail.get("category") or "")
    if kind == "complained":
        return str(detail.get("feedback_type") or "abuse")
    return ""


async def hold_cursor(s: AsyncSession, name: str = CURSOR) -> int | None:
    """Lock the row of the events reader ``name``'s cursor for this transaction and
    return where it is; None when another reader holds it (PostgreSQL; SQLite has one
    writer at a time anyway)."""
    pg = s.get_bind().dialect.name == "postgresql"
    await s.execute(new_cursor(s, 0, name))
    if not pg:
        await s.execute(
            update(EventCursor).where(EventCursor.shard == name).values(last_id=EventCursor.last_id)
        )
        return int(
            await s.scalar(select(EventCursor.last_id).where(EventCursor.shard == name)) or 0
        )
    row = (
        await s.execute(
            select(EventCursor.last_id)
            .where(EventCursor.shard == name)
            .with_for_update(skip_locked=True)
        )
    ).first()
    return None if row is None else int(row[0])


async def apply_outcomes(sessions: Callable[[], Any], batch: int = BATCH) -> tuple[int, int]:
    """One step: the next events onto the records they concern. Returns how many
    events were read (0: none new, or another reader is at it) and how many of them
    were campaigns'."""
    async with sessions() as s:
        last = await hold_cursor(s)
        if last is None:
            await s.rollback()
            return 0, 0
        rows = (
            await s.execute(
                select(Event.id, Event.type, Event.message_id)
                .where(Event.id > last)
                .order_by(Event.id)
                .limit(batch)
            )
        ).all()
        if not rows:
            await s.rollback()
            return 0, 0
        # Most events are of other mail (SMTP, the API): one indexed look says which
        # messages are campaigns', and only their events are read whole and applied.
        wanted = {mid for _id, kind, mid in rows if kind in STATE_OF and mid}
        ours: set[str] = set()
        if wanted:
            ours = set(
                (
                    await s.execute(
                        select(RECORDS.c.message_id).where(RECORDS.c.message_id.in_(wanted))
                    )
                ).scalars()
            )
        moves: dict[str, list[dict[str, Any]]] = defaultdict(list)
        mine = [eid for eid, kind, mid in rows if mid in ours and kind in STATE_OF]
        if mine:
            full = await s.execute(
                select(Event.type, Event.message_id, Event.ts, Event.detail)
                .where(Event.id.in_(mine))
                .order_by(Event.id)
            )
            for kind, msg_id, ts, detail in full.all():
                moves[STATE_OF[kind]].append(
                    {"mid": msg_id, "why": _reason(kind, detail or {})[:200], "ts": ts}
                )
        for state, params in moves.items():
            await s.execute(
                update(RECORDS)
                .where(
                    RECORDS.c.message_id == bindparam("mid"),
                    # Not IN (…): an expanding parameter cannot be used in executemany.
                    or_(*(RECORDS.c.state == before for before in _before(state))),
                )
                .values(
                    state=state,
                    reason=bindparam("why"),
                    sent_at=func.coalesce(RECORDS.c.sent_at, bindparam("ts")),
                    updated_at=bindparam("ts"),
                ),
                params,
            )
        await s.execute(
            update(EventCursor).where(EventCursor.shard == CURSOR).values(last_id=rows[-1][0])
        )
        await s.commit()
        return len(rows), len(mine)


async def skip_to_now(sessions: Callable[[], Any]) -> None:
    """Start the cursor at the newest event (a database with events and no cursor
    yet: none of those can concern a campaign sent by this version)."""
    async with sessions() as s:
        have = await s.get(EventCursor, CURSOR)
        if have is None:
            newest = await s.scalar(select(func.max(Event.id))) or 0
            await s.execute(new_cursor(s, int(newest)))
            await s.commit()
