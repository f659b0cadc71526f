"""The queue's gauges: recipients by state (and held) in this worker's spool shard,
counted every few seconds into ``postwarden_queue_recipients`` (and the age of the
oldest queued and deferred one); with an inbox, its pending
and unparsed reports too, and (in the worker that keeps it) the hourly pruning of
unparsed reports older than ``inbound.keep_unparsed``."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from postwarden.bounces.inbox import Inbox
from postwarden.metrics import Metrics
from postwarden.queue.spool import Spool

log = logging.getLogger("postwarden")

#: Seconds between two counts.
INTERVAL = 5.0
#: Seconds between two prunings of the inbox's unparsed reports.
PRUNE_EVERY = 3600.0


#: States whose oldest recipient's age is a gauge (postwarden_queue_oldest_seconds).
AGED_STATES = ("queued", "deferred")


def _count(db: Any) -> tuple[dict[str, int], dict[str, float]]:
    """Recipients by state (and held); and when the oldest of each aged state was
    accepted, by acceptance order: the first row of the state index (ids grow with
    acceptance), one index seek rather than a scan."""
    rows = db.execute("SELECT state, COUNT(*) FROM recipients GROUP BY state").fetchall()
    held = db.execute("SELECT COUNT(*) FROM recipients WHERE held = 1").fetchone()[0]
    oldest = {}
    for state in AGED_STATES:
        row = db.execute(
            "SELECT created_at FROM recipients WHERE state = ? ORDER BY id LIMIT 1", (state,)
        ).fetchone()
        if row is not None:
            oldest[state] = float(row[0])
    return {**{r[0]: r[1] for r in rows}, "held": held}, oldest


async def update_gauges(
    spool: Spool,
    metrics: Metrics,
    inbox: Inbox | None = None,
    *,
    prune_inbox: bool = False,
    keep_unparsed: float = 0.0,
    last_prune: float = 0.0,
) -> float:
    """One count (and, when due, one pruning of the inbox); returns when the inbox was
    last pruned (``time.monotonic``)."""
    counts, oldest = await spool.run(_count)
    for state in ("queued", "deferred", "active", "held"):
        metrics.queue_depth.labels(state).set(counts.get(state, 0))
    now = time.time()
    for state in AGED_STATES:
        since = oldest.get(state)
        metrics.queue_oldest.labels(state).set(0.0 if since is None else max(0.0, now - since))
    if inbox is None:
        return last_prune
    now = time.monotonic()
    if prune_inbox and now - last_prune >= PRUNE_EVERY:
        pruned = await asyncio.to_thread(inbox.prune_unparsed, keep_unparsed)
        if pruned:
            log.info("event=inbound_unparsed_pruned count=%d", pruned)
        last_prune = now
    pending, unparsed = await asyncio.to_thread(lambda: (inbox.pending(), inbox.unparsed_count()))
    metrics.inbound_pending.set(pending)
    metrics.inbound_unparsed.set(unparsed)
    return last_prune


async def keep_gauges(
    spool: Spool,
    metrics: Metrics,
    inbox: Inbox | None = None,
    *,
    prune_inbox: bool = False,
    keep_unparsed: float = 0.0,
) -> None:
    """:func:`update_gauges` every :data:`INTERVAL` until the spool closes (or the task
    is cancelled)."""
    last_prune = 0.0
    while True:
        try:
            last_prune = await update_gauges(
                spool, metrics, inbox, prune_inbox=prune_inbox,
                keep_unparsed=keep_unparsed, last_prune=last_prune,
            )  # fmt: skip
        except Exception:
            if spool.closed:
                return
            log.exception("event=gauge_update_failed")
        await asyncio.sleep(INTERVAL)
