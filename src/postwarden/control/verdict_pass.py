"""The verdict pass (issue 22; docs/tracking.md, docs/decisions/0011): tracking hits
are judged a settle time after they arrive (``tracking.settle``), a message's hits
together (``engagement.verdicts.judge``), with what delivery recorded of the message
(when it was delivered, to which MX host).

Each judged hit becomes an ``opened`` or ``clicked`` event with ``machine`` and
``reason`` in its detail; a human one moves its send record's first open or click
(``opened_at``, ``clicked_at``: what A/B tests decide on). Machine hits stay in
``tracking_hits`` for forensics and never count as human.

Several processes may run it: a hit is claimed by setting its ``judged_at`` where it
is still null, in the transaction that writes its verdict and event, so each hit is
judged once.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from sqlalchemy import select, update

from postwarden.control import ControlPlaneError, stop_task
from postwarden.control.events import tags_text
from postwarden.engagement.verdicts import (
    Hit,
    Rules,
    Verdict,
    VerdictRulesError,
    judge,
    load_rules,
)
from postwarden.store.availability import LogLimiter, is_unavailable
from postwarden.store.campaign_models import Campaign, SendRecord
from postwarden.store.engagement_models import TrackingHit
from postwarden.store.feed import lock_events
from postwarden.store.models import Event, Recipient

log = logging.getLogger("postwarden.control.verdicts")
_limited = LogLimiter(log)

#: Messages judged per transaction.
GROUPS = 200


def _epoch(value: dt.datetime | None) -> float | None:
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    return value.timestamp()


def to_hit(row: TrackingHit, delivered: tuple[float, str | None] | None,
           links: int | None) -> Hit:  # fmt: skip
    return Hit(
        id=row.id,
        kind=row.kind,
        at=_epoch(row.at) or 0.0,
        method=row.method,
        ip=row.ip,
        user_agent=row.user_agent,
        link_index=row.link_index,
        delivered_at=delivered[0] if delivered else None,
        mx=delivered[1] if delivered else None,
        links_in_message=links,
        ranged=row.ranged,
    )


class VerdictPass:
    def __init__(self, sessions: Any, settle: float, rules: Rules, metrics: Any = None) -> None:
        self.sessions = sessions
        self.settle = settle
        self.rules = rules
        self.metrics = metrics
        self._task: asyncio.Task[None] | None = None

    @classmethod
    def from_config(cls, sessions: Any, cfg: Any, metrics: Any = None) -> VerdictPass:
        try:
            rules = load_rules(cfg.tracking.verdicts_file)
        except VerdictRulesError as exc:
            raise ControlPlaneError(f"tracking.verdicts_file: {exc}") from exc
        return cls(sessions, cfg.tracking.settle, rules, metrics)

    def reconfigure(self, cfg: Any) -> None:
        """A reloaded configuration's settle time and rules (checked by the caller)."""
        self.settle = cfg.tracking.settle
        self.rules = load_rules(cfg.tracking.verdicts_file)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="verdicts")

    async def stop(self) -> None:
        await stop_task(self._task)
        self._task = None

    async def _run(self) -> None:
        wait = min(self.settle / 4, 5.0)
        while True:
            await asyncio.sleep(wait)
            try:
                while await self.run_once() >= GROUPS:
                    pass
            except Exception as exc:
                if not is_unavailable(exc):
                    _limited(logging.WARNING, "verdicts", "event=verdict_pass_failed", exc=exc)

    async def run_once(self, now: dt.datetime | None = None) -> int:
        """Judge the hits that have settled; the number of messages (or anonymous
        hits) judged."""
        now = now or dt.datetime.now(dt.UTC)
        cutoff = now - dt.timedelta(seconds=self.settle)
        async with self.sessions() as s:
            due = (
                await s.execute(
                    select(TrackingHit.id, TrackingHit.message_id)
                    .where(TrackingHit.judged_at.is_(None), TrackingHit.at <= cutoff)
                    .order_by(TrackingHit.id)
                    .limit(GROUPS * 4)
                )
            ).all()
            if not due:
                return 0
            messages = list(dict.fromkeys(m for _i, m in due if m))[:GROUPS]
            lone = [i for i, m in due if not m][: max(0, GROUPS - len(messages))]
            rows: list[TrackingHit] = []
            if messages:
                rows += (
                    await s.execute(select(TrackingHit).where(TrackingHit.message_id.in_(messages)))
                ).scalars()
            if lone:
                rows += (
                    await s.execute(select(TrackingHit).where(TrackingHit.id.in_(lone)))
                ).scalars()
            delivered = await self._deliveries(s, messages)
            records = await self._records(s, messages)
            alone = await self._only_recipients(s, [m for m in messages if m not in records])
            tags = await self._tags(s, {r.campaign_id for r in rows if r.campaign_id})
            groups: dict[Any, list[TrackingHit]] = defaultdict(list)
            for r in rows:
                groups[r.message_id or ("hit", r.id)].append(r)
            await lock_events(s)
            judged = 0
            for key, hits in groups.items():
                mid = key if isinstance(key, str) else None
                judged += await self._judge(
                    s, now, cutoff, hits, delivered.get(mid) if mid else None,
                    records.get(mid) if mid else None, tags,
                    alone.get(mid) if mid else None,
                )  # fmt: skip
            await s.commit()
        return judged

    async def _deliveries(
        self, s: Any, messages: Sequence[str]
    ) -> dict[str, tuple[float, str | None]]:
        """When each message was delivered and to which MX host (its first delivery)."""
        if not messages:
            return {}
        rows = (
            await s.execute(
                select(Event.message_id, Event.ts, Event.detail)
                .where(Event.message_id.in_(messages), Event.type == "delivered")
                .order_by(Event.id)
            )
        ).all()
        out: dict[str, tuple[float, str | None]] = {}
        for mid, ts, detail in rows:
            if mid not in out:
                mx = (detail or {}).get("mx")
                out[mid] = (_epoch(ts) or 0.0, str(mx) if mx else None)
        return out

    async def _records(self, s: Any, messages: Sequence[str]) -> dict[str, SendRecord]:
        if not messages:
            return {}
        rows = (
            await s.execute(select(SendRecord).where(SendRecord.message_id.in_(messages)))
        ).scalars()
        return {r.message_id: r for r in rows if r.message_id}

    async def _only_recipients(self, s: Any, messages: Sequence[str]) -> dict[str, str]:
        """The address of each API message (no send record) that has one recipient:
        its hits are that recipient's."""
        if not messages:
            return {}
        rows = (
            await s.execute(
                select(Recipient.message_id, Recipient.address).where(
                    Recipient.message_id.in_(messages)
                )
            )
        ).all()
        found: dict[str, list[str]] = defaultdict(list)
        for mid, address in rows:
            found[mid].append(address)
        return {mid: addrs[0] for mid, addrs in found.items() if len(addrs) == 1}

    async def _tags(self, s: Any, campaigns: set[int | None]) -> dict[int, str]:
        ids = [c for c in campaigns if c]
        if not ids:
            return {}
        rows = await s.execute(select(Campaign.id, Campaign.tags).where(Campaign.id.in_(ids)))
        return {cid: tags_text(list(t or [])) for cid, t in rows.all()}

    async def _judge(
        self,
        s: Any,
        now: dt.datetime,
        cutoff: dt.datetime,
        rows: list[TrackingHit],
        delivered: tuple[float, str | None] | None,
        record: SendRecord | None,
        tags: dict[int, str],
        address: str | None = None,
    ) -> int:
        # The settled hits, judged with every hit of the message as context (the
        # rules join hits at most ``Rules.horizon`` apart, well under the settle
        # time: a later hit cannot change these verdicts).
        settled = _epoch(cutoff) or 0.0
        pending = [r for r in rows if r.judged_at is None and (_epoch(r.at) or 0.0) <= settled]
        if not pending:
            return 0
        # Claim them: another process judging the same message at once gets none.
        claimed = await s.execute(
            update(TrackingHit)
            .where(TrackingHit.id.in_([r.id for r in pending]), TrackingHit.judged_at.is_(None))
            .values(judged_at=now)
            .execution_options(synchronize_session=False)
        )
        if claimed.rowcount != len(pending):
            return 0
        links = next((r.link_index for r in rows if r.kind == "open" and r.link_index), None)
        verdicts = judge([to_hit(r, delivered, links) for r in rows], self.rules)
        for r in pending:
            v = verdicts.get(r.id) or Verdict(False, "person")
            await s.execute(
                update(TrackingHit)
                .where(TrackingHit.id == r.id)
                .values(machine=v.machine, reason=v.reason[:40])
                .execution_options(synchronize_session=False)
            )
            # The recipient's first human open or click: counted once (the rollups'
            # unique opens and clicks, store.rollups).
            field = "opened_at" if r.kind == "open" else "clicked_at"
            first = not v.machine and record is not None and getattr(record, field) is None
            self._event(s, r, v, record.email if record is not None else address,
                        tags.get(r.campaign_id or 0, ""), first)  # fmt: skip
            if not v.machine and record is not None:
                if getattr(record, field) is None or getattr(record, field) > r.at:
                    setattr(record, field, r.at)
            if self.metrics is not None:
                self.metrics.tracking_verdicts.labels(r.kind, "machine" if v.machine else "human",
                                                      ).inc()  # fmt: skip
        return 1

    def _event(
        self, s: Any, r: TrackingHit, v: Verdict, recipient: str | None, tags: str, first: bool
    ) -> None:
        detail: dict[str, Any] = {
            "machine": v.machine,
            "reason": v.reason,
            "campaign_id": r.campaign_id,
            "contact_id": r.contact_id,
            "user_agent": r.user_agent,
            "ip": r.ip,
            "method": r.method,
        }
        if first:
            detail["first"] = True
        if r.kind == "click":
            detail |= {"link_index": r.link_index, "url": r.url}
        s.add(
            Event(
                tenant_id=r.tenant_id,
                ts=r.at,
                type="opened" if r.kind == "open" else "clicked",
                message_id=(r.message_id or "")[:40],
                recipient_id=None,
                recipient=recipient,
                tags=tags,
                detail=detail,
            )
        )
