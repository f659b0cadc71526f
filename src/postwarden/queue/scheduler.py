"""The scheduler: leases due recipients, groups them into ready queues, runs sessions.

* Due recipients come from the spool (``lease_due``) or straight from acceptance
  (:meth:`Scheduler.offer`), never more than ``queue.max_inflight`` at a time, so
  memory follows what is in flight, not the size of the queue.
* They are grouped by destination domain; a message's recipients at one domain form
  one job (one SMTP transaction), split at ``delivery.max_recipients_per_transaction``.
* Each domain gets up to ``delivery.max_connections_per_domain`` sessions, all
  domains together up to ``delivery.max_connections``; a session carries up to
  ``delivery.max_messages_per_connection`` jobs.
* Results are turned into outcomes with the one retry policy and written back to the
  spool in batches.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from postwarden.config import Config
from postwarden.metrics import Metrics
from postwarden.mta.delivery import AttemptResult, DeliveryAgent, Job
from postwarden.queue.retry import RetryPolicy
from postwarden.queue.spool import (
    BOUNCED,
    DEFERRED,
    DELIVERED,
    DROPPED,
    EXPIRED,
    QUEUED,
    Lease,
    Outcome,
    Spool,
)

log = logging.getLogger("postwarden.scheduler")

#: Bytes of freshly accepted message bodies kept in memory for their first attempt.
BODY_BUDGET = 64 * 1024 * 1024


@dataclass
class _DomainQueue:
    jobs: deque[Job] = field(default_factory=deque)
    sessions: int = 0
    waiters: int = 0
    changed: asyncio.Event = field(default_factory=asyncio.Event)


class Scheduler:
    """Moves leased recipients through delivery sessions and records what happened."""

    def __init__(
        self,
        cfg: Config,
        spool: Spool,
        agent: DeliveryAgent,
        metrics: Metrics,
        rng: random.Random | None = None,
    ) -> None:
        self.cfg = cfg
        self.spool = spool
        self.agent = agent
        self.metrics = metrics
        self.rng = rng or random.Random()
        self.policy = RetryPolicy.from_config(cfg.queue)
        self.queues: dict[str, _DomainQueue] = {}
        self.inflight = 0
        self.sessions = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()
        self._stopping = False
        self._main: asyncio.Task[None] | None = None
        self._pending: list[Outcome] = []
        self._flush_task: asyncio.Task[None] | None = None
        self._recording: set[asyncio.Task[None]] = set()
        self._body_bytes = 0
        # (tenant, address) -> suppression reason or None; set by the appliance.
        self.suppressed: Callable[[str, str], str | None] = lambda _tenant, _rcpt: None

    def reconfigure(self, cfg: Config) -> None:
        self.cfg = cfg
        self.policy = RetryPolicy.from_config(cfg.queue)

    # ------------------------------------------------------------------ capacity

    def reserve(self, n: int) -> bool:
        """Claim room for ``n`` recipients coming straight from acceptance."""
        if self._stopping or self.inflight + n > self.cfg.queue.max_inflight:
            return False
        self.inflight += n
        self.metrics.inflight.set(self.inflight)
        return True

    def release(self, n: int) -> None:
        self.inflight = max(0, self.inflight - n)
        self.metrics.inflight.set(self.inflight)

    def offer(self, leases: Iterable[Lease], body: bytes | None = None) -> None:
        """Queue recipients reserved with :meth:`reserve` and already marked active.

        ``body``, the message just spooled, rides along with its jobs (so delivery
        need not read it back) while the bodies held this way stay under
        ``BODY_BUDGET`` bytes; beyond that they are read from the spool as usual.
        """
        leases = list(leases)
        if body is not None and self._body_bytes + len(body) > BODY_BUDGET:
            body = None
        self._enqueue(leases, body)

    def wake(self) -> None:
        self._wake.set()

    # ------------------------------------------------------------------ main loop

    def start(self) -> None:
        self._main = asyncio.create_task(self._run(), name="scheduler")

    async def _run(self) -> None:
        while not self._stopping:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.cfg.queue.scan_interval)
            self._wake.clear()
            if self._stopping:
                break
            room = self.cfg.queue.max_inflight - self.inflight
            if room > 0:
                try:
                    leases = await self.spool.lease_due(time.time(), room)
                except Exception:
                    log.exception("event=lease_failed")
                    continue
                if leases:
                    self.inflight += len(leases)
                    self.metrics.inflight.set(self.inflight)
                    # Mail that waited in the queue is checked again before it is sent;
                    # fresh mail (offer) was checked a moment ago, at acceptance.
                    self._enqueue(self._drop_suppressed(leases))

    def _drop_suppressed(self, leases: list[Lease]) -> list[Lease]:
        """The one suppression check, again before an attempt from the queue: an address
        suppressed while its mail waited is dropped, never sent."""
        keep: list[Lease] = []
        dropped: list[Outcome] = []
        for lease in leases:
            reason = self.suppressed(lease.tenant, lease.rcpt) if lease.tenant else None
            if reason is None:
                keep.append(lease)
                continue
            dropped.append(Outcome(lease.rcpt_id, lease.msg_id, DROPPED, counted_attempt=False,
                                   detail={"reason": reason, "stage": "delivery"}))  # fmt: skip
            self.metrics.dropped.labels(reason, "delivery").inc()
        if dropped:
            self._pending.extend(dropped)
            if self._flush_task is None:
                self._flush_task = asyncio.get_running_loop().create_task(self._flush())
        return keep

    def _enqueue(self, leases: list[Lease], body: bytes | None = None) -> None:
        per_job = self.cfg.delivery.max_recipients_per_transaction
        groups: dict[tuple[str, str], list[Lease]] = {}
        for lease in leases:
            groups.setdefault((lease.msg_id, lease.domain), []).append(lease)
        touched: set[str] = set()
        for (msg_id, domain), group in groups.items():
            q = self.queues.get(domain)
            if q is None:
                q = self.queues[domain] = _DomainQueue()
            for i in range(0, len(group), per_job):
                chunk = group[i : i + per_job]
                q.jobs.append(Job(msg_id, domain, chunk[0].mail_from, chunk, body=body))
                if body is not None:
                    self._body_bytes += len(body)
            touched.add(domain)
        for domain in touched:
            q = self.queues[domain]
            q.changed.set()
            self._dispatch(domain, q)

    def _dispatch(self, domain: str, q: _DomainQueue) -> None:
        d = self.cfg.delivery
        # Idle sessions waiting for work pick jobs up first; open more connections
        # only for what they cannot absorb.
        while (
            len(q.jobs) > q.waiters
            and q.sessions < d.max_connections_per_domain
            and self.sessions < d.max_connections
            and not self._stopping
        ):
            q.sessions += 1
            self.sessions += 1
            task = asyncio.create_task(self._session(domain, q), name=f"session:{domain}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _session(self, domain: str, q: _DomainQueue) -> None:
        async def next_job(first: bool) -> Job | None:
            if self._stopping:
                return None
            if q.jobs:
                return self._take(q)
            if first:
                return None
            # Keep the connection a moment for work that is about to arrive.
            q.waiters += 1
            try:
                deadline = time.monotonic() + self.cfg.delivery.timeouts.idle
                while not q.jobs and not self._stopping:
                    q.changed.clear()
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return None
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(q.changed.wait(), remaining)
            finally:
                q.waiters -= 1
            return self._take(q) if q.jobs and not self._stopping else None

        try:
            await self.agent.run_session(domain, next_job, self._report)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("event=session_failed domain=%s", domain)
        finally:
            q.sessions -= 1
            self.sessions -= 1
            if q.jobs and not self._stopping:
                self._dispatch(domain, q)
            elif not q.jobs and q.sessions == 0 and self.queues.get(domain) is q:
                del self.queues[domain]
            # A global slot came free: another domain may be waiting for one.
            if self.sessions < self.cfg.delivery.max_connections and not self._stopping:
                for other, oq in list(self.queues.items()):
                    if oq.jobs and len(oq.jobs) > oq.waiters:
                        self._dispatch(other, oq)
                    if self.sessions >= self.cfg.delivery.max_connections:
                        break

    def _take(self, q: _DomainQueue) -> Job:
        job = q.jobs.popleft()
        if job.body is not None:
            self._body_bytes -= len(job.body)
        return job

    # ------------------------------------------------------------------ results

    def _report(self, results: list[AttemptResult]) -> None:
        now = time.time()
        outcomes: list[Outcome] = []
        for r in results:
            lease = r.lease
            detail = {"mx": r.mx, "ip": r.ip, "tls": r.tls} if r.mx else {}
            if r.kind == "delivered":
                outcomes.append(
                    Outcome(lease.rcpt_id, lease.msg_id, DELIVERED, r.response, detail=detail)
                )
                self.metrics.delivered.inc()
                self.metrics.delivery_latency.observe(max(0.0, now - lease.created_at))
            elif r.kind == "permanent":
                outcomes.append(
                    Outcome(lease.rcpt_id, lease.msg_id, BOUNCED, r.response, detail=detail)
                )
                self.metrics.bounced.labels(r.reason).inc()
            elif r.kind == "temporary":
                state, when = self.policy.after_temporary_failure(
                    lease.attempts + 1, lease.created_at, now, self.rng
                )
                if state == EXPIRED:
                    outcomes.append(
                        Outcome(lease.rcpt_id, lease.msg_id, EXPIRED, r.response, detail=detail)
                    )
                    self.metrics.expired.inc()
                else:
                    outcomes.append(
                        Outcome(
                            lease.rcpt_id,
                            lease.msg_id,
                            DEFERRED,
                            r.response,
                            next_attempt=when,
                            detail=detail,
                        )
                    )
                    self.metrics.deferred.labels(r.reason).inc()
            else:  # not attempted: back to the queue untouched
                outcomes.append(Outcome(lease.rcpt_id, lease.msg_id, QUEUED, counted_attempt=False))
            if r.kind != "not_attempted":
                self.metrics.attempts.labels(r.kind).inc()
                # Deliveries at debug (the event log has each one); failures at info.
                log.log(
                    logging.DEBUG if r.kind == "delivered" else logging.INFO,
                    "event=%s msg=%s rcpt_id=%d domain=%s mx=%s ip=%s tls=%s response=%r",
                    r.kind,
                    lease.msg_id,
                    lease.rcpt_id,
                    lease.domain,
                    r.mx,
                    r.ip,
                    r.tls,
                    r.response,
                )
        self._pending.extend(outcomes)
        if self._flush_task is None:
            self._flush_task = asyncio.get_running_loop().create_task(self._flush())

    async def _flush(self) -> None:
        # One spool operation for whatever results arrived meanwhile.
        await asyncio.sleep(0)
        batch, self._pending = self._pending, []
        self._flush_task = None
        if not batch:
            return
        try:
            await self.spool.record(batch)
        except Exception:
            # The recipients stay "active" in the index and are retried after the
            # next restart; never dropped.
            log.exception("event=record_failed count=%d", len(batch))
        finally:
            self.release(len(batch))
            if any(o.state == QUEUED for o in batch):
                self.wake()

    async def drain_records(self) -> None:
        while self._flush_task is not None or self._pending:
            if self._flush_task is not None:
                await self._flush_task
            elif self._pending:
                self._flush_task = asyncio.get_running_loop().create_task(self._flush())

    # ------------------------------------------------------------------ shutdown

    async def stop(self, grace: float) -> None:
        """Stop taking work; let sessions finish their transaction; give back the rest."""
        self._stopping = True
        self._wake.set()
        for q in self.queues.values():
            q.changed.set()
        if self._main is not None:
            self._main.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._main
        if self._tasks:
            _done, pending = await asyncio.wait(set(self._tasks), timeout=grace)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
        # Jobs never started go back to "queued" without counting an attempt.
        leftovers = [
            Outcome(lease.rcpt_id, lease.msg_id, QUEUED, counted_attempt=False)
            for q in self.queues.values()
            for job in q.jobs
            for lease in job.leases
        ]
        self.queues.clear()
        self._pending.extend(leftovers)
        await self.drain_records()
