"""The scheduler: leases due recipients, groups them into ready queues, runs sessions.

* Due recipients come from the spool (``lease_due``) or straight from acceptance
  (:meth:`Scheduler.offer`), never more than ``queue.max_inflight`` at a time, so
  memory follows what is in flight, not the size of the queue.
* They are grouped by destination domain; a message's recipients at one domain form
  one job (one SMTP transaction), split at ``delivery.max_recipients_per_transaction``.
  Mail that leaves with a VERP return path (the :attr:`Scheduler.return_path` hook,
  ``bounces/verp.py``) has one envelope sender per recipient, so one job per recipient.
* Each domain gets up to ``delivery.max_connections_per_domain`` sessions, all
  domains together up to ``delivery.max_connections``; a session carries up to
  ``delivery.max_messages_per_connection`` jobs.
* Results are turned into outcomes with the one retry policy and written back to the
  spool in batches.
* With traffic shaping (a :class:`~postwarden.shaping.shaper.Shaper`), queues are per
  (destination domain, pool); each session asks the broker for a source and for
  message tokens (:class:`Gate`). What the broker refuses waits without counting an
  attempt: in memory when the wait is short (the queue is held until then), back in
  the spool with its next attempt at the broker's time when it is long.
* Lanes: within a queue, transactional jobs go before bulk ones, and tenants take
  turns within a lane; bulk mail may hold at most ``BULK_SHARE`` of the in-flight
  room, so transactional mail always finds room.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from postwarden.bounces.classify import default_classifier
from postwarden.config import Config
from postwarden.metrics import Metrics, site_label
from postwarden.mta.delivery import DeliveryAgent
from postwarden.queue.gate import Gate
from postwarden.queue.jobqueue import DomainQueue
from postwarden.queue.retry import RetryPolicy
from postwarden.queue.spool import Spool
from postwarden.shaping.grants import Choice, Grant
from postwarden.values import (
    BOUNCED,
    DEFERRED,
    DELIVERED,
    DROPPED,
    EXPIRED,
    QUEUED,
    SUPPRESSIONS_UNKNOWN,
    AttemptResult,
    Job,
    Lease,
    Outcome,
)

if TYPE_CHECKING:
    from postwarden.shaping.shaper import Shaper

log = logging.getLogger("postwarden.scheduler")

#: Bytes of freshly accepted message bodies kept in memory for their first attempt.
BODY_BUDGET = 64 * 1024 * 1024
#: The share of ``queue.max_inflight`` bulk mail may hold.
BULK_SHARE = 0.8
#: ... for at most this long, with the jobs in memory; beyond, they go back to the spool.
HOLD_MEMORY = 60.0
#: Seconds a broker's notice that a slot is wanted holds here without a word again
# (the broker repeats it twice a second while the request waits; shaping.wants).
WANT_HEARD = 1.5
#: Seconds such a recipient waits before it is asked about again.
SUPPRESSIONS_RECHECK = 5.0
#: Failed spool writes of outcomes are retried after this long, doubling up to the max.
RECORD_RETRY_FIRST = 0.05
RECORD_RETRY_MAX = 5.0
#: ... and given up after this many failures once the scheduler is stopping.
RECORD_RETRIES_AT_STOP = 3
#: The answer recorded for a recipient that expired without a counted attempt.
EXPIRED_UNTRIED = "451 4.4.7 expired in the queue before an attempt (queue.max_age)"


# AttemptResult.reason -> the SMTP stage the classifier weighs.
_STAGE = {"mail": "mail", "rcpt": "rcpt", "data": "data", "connect": "connect"}


class Scheduler:
    """Moves leased recipients through delivery sessions and records what happened."""

    def __init__(
        self,
        cfg: Config,
        spool: Spool,
        agent: DeliveryAgent,
        metrics: Metrics,
        rng: random.Random | None = None,
        *,
        suppressed: Callable[[str, str], str | None] | None = None,
        return_path: Callable[[Lease], str | None] | None = None,
        failed: Callable[[list[tuple[Lease, AttemptResult, bool]]], None] | None = None,
        shaper: Shaper | None = None,
    ) -> None:
        self.cfg = cfg
        self.spool = spool
        self.agent = agent
        self.metrics = metrics
        self.rng = rng or random.Random()
        self.policy = RetryPolicy.from_config(cfg.queue)
        self.classifier = default_classifier(cfg.bounces.patterns_file)
        self.queues: dict[tuple[str, str], DomainQueue] = {}
        self.inflight = 0
        self.bulk_ids: set[int] = set()  # recipients in flight in the bulk lane
        # Site -> queues waiting for a connection slot there: a slot freed in this
        # process goes to them at once; idle connections there stop idling.
        self.slot_waiters: dict[str, set[tuple[str, str]]] = {}
        # Site -> what the broker says is wanted there (shaping.wants): the sources
        # wanted by transactional requests, by any, and until when (loop time).
        self.site_wants: dict[str, tuple[frozenset[str], frozenset[str], float]] = {}
        # Destination domain -> its site's retry schedule, when the rules override it.
        self.retry_policies: dict[str, RetryPolicy] = {}
        # Traffic shaping (queues per destination and pool, slots from the broker);
        # None: one queue per domain, unshaped.
        self.shaper = shaper
        self.sessions = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()
        self._stopping = False
        self._main: asyncio.Task[None] | None = None
        self._pending: list[Outcome] = []
        self._flush_task: asyncio.Task[None] | None = None
        self._recording: set[asyncio.Task[None]] = set()
        self._body_bytes = 0
        # (tenant, address) -> suppression reason or None (the control plane's cache).
        self.suppressed: Callable[[str, str], str | None] = suppressed or (
            lambda _tenant, _rcpt: None
        )
        # A recipient's VERP return path (bounces/verp.py), or None to keep the
        # message's sender. None (the default): no VERP, and today's grouping at no
        # extra cost.
        self.return_path = return_path
        # Called with the leases that failed for good (bounced or expired) and their
        # answers, after the outcomes are recorded (bounces.notices).
        self.failed = failed

    @property
    def stopping(self) -> bool:
        """Whether :meth:`stop` has begun (no new sessions, refusals not waited out)."""
        return self._stopping

    def reconfigure(self, cfg: Config) -> None:
        self.cfg = cfg
        self.policy = RetryPolicy.from_config(cfg.queue)
        self.classifier = default_classifier(cfg.bounces.patterns_file)

    # ------------------------------------------------------------------ capacity

    def bulk_room(self) -> int:
        return int(self.cfg.queue.max_inflight * BULK_SHARE) - len(self.bulk_ids)

    def reserve(self, n: int, lane: int = 0) -> bool:
        """Claim room for ``n`` recipients coming straight from acceptance."""
        if self._stopping or self.inflight + n > self.cfg.queue.max_inflight:
            return False
        if lane and n > self.bulk_room():
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
                    leases = await self.spool.lease_due(
                        time.time(), room, bulk_limit=max(0, self.bulk_room())
                    )
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
        unknown: list[Lease] = []
        for lease in leases:
            reason = self.suppressed(lease.tenant, lease.rcpt) if lease.tenant else None
            if reason is None:
                keep.append(lease)
                continue
            if reason == SUPPRESSIONS_UNKNOWN:
                unknown.append(lease)
                continue
            dropped.append(
                Outcome(
                    lease.rcpt_id,
                    lease.msg_id,
                    DROPPED,
                    counted_attempt=False,
                    detail={"reason": reason, "stage": "delivery"},
                )
            )
            self.metrics.dropped.labels(reason, "delivery").inc()
        if unknown:
            # Started while the control database was down: whether these addresses
            # are suppressed cannot be known yet. They wait (no attempt counted;
            # in flight until their outcome is written, as a drop is).
            now = time.time()
            why = "control database unavailable: the suppression list is not loaded yet"
            for lease in unknown:
                dropped.append(
                    Outcome(
                        lease.rcpt_id,
                        lease.msg_id,
                        QUEUED,
                        next_attempt=now + SUPPRESSIONS_RECHECK,
                        counted_attempt=False,
                        wait_reason=why,
                    )
                )
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
        touched: set[tuple[str, str]] = set()
        shaped = self.shaper is not None
        verp = self.return_path
        for (msg_id, domain), group in groups.items():
            first = group[0]
            lane = first.lane
            # "" (shaped): no pool named and no route by domain or sender; the
            # default pool, unless a route by site says otherwise when a connection
            # opens (Gate.open).
            pool = (first.pool or self._route(domain, first.mail_from)) if shaped else ""
            key = (domain, pool)
            q = self.queues.get(key)
            if q is None:
                q = self.queues[key] = DomainQueue(domain, pool)
            if lane:
                self.bulk_ids.update(x.rcpt_id for x in group)
            if verp is not None and (path := verp(first)) is not None:
                # A return path per recipient: a transaction per recipient. (The
                # recipients of a group share message, tenant and sender, hence the
                # decision.)
                self._enqueue_verp(q, group, path, verp, body)
                touched.add(key)
                continue
            for i in range(0, len(group), per_job):
                chunk = group[i : i + per_job]
                q.jobs.append(
                    Job(
                        msg_id,
                        domain,
                        first.mail_from,
                        chunk,
                        body=body,
                        tenant=first.tenant or "",
                        lane=lane,
                    )
                )
                if body is not None:
                    self._body_bytes += len(body)
            touched.add(key)
        for key in touched:
            q = self.queues[key]
            q.changed.set()
            self._dispatch(key, q)

    def _route(self, domain: str, mail_from: str) -> str:
        assert self.shaper is not None
        rules = self.shaper.rules
        if not rules.routes:
            return ""
        return rules.route(domain, mail_from.rpartition("@")[2]) or ""

    def _enqueue_verp(
        self,
        q: DomainQueue,
        group: list[Lease],
        path: str,
        verp: Callable[[Lease], str | None],
        body: bytes | None,
    ) -> None:
        """One job per recipient, each with its own return path as ``mail_from``; the
        message's sender rides along as ``Job.sender`` (its sending domain)."""
        first = group[0]
        tenant = first.tenant or ""
        for i, lease in enumerate(group):
            mail_from = path if i == 0 else (verp(lease) or first.mail_from)
            q.jobs.append(
                Job(
                    lease.msg_id,
                    lease.domain,
                    mail_from,
                    [lease],
                    body=body,
                    tenant=tenant,
                    lane=first.lane,
                    sender=first.mail_from,
                )
            )
            if body is not None:
                self._body_bytes += len(body)

    def _dispatch(self, key: tuple[str, str], q: DomainQueue) -> None:
        d = self.cfg.delivery
        if q.blocked_until and asyncio.get_running_loop().time() < q.blocked_until:
            return  # the broker said when; the timer dispatches then
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
            task = asyncio.create_task(self._session(key, q), name=f"session:{key[0]}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------------ shaping refusals

    def hold(
        self, key: tuple[str, str], q: DomainQueue, jobs: list[Job], no: Grant | Choice
    ) -> None:
        """Jobs the broker refused until ``no.retry_at`` (loop time): held in memory,
        the queue blocked until then, when that is soon; else back to the spool, with
        every job queued for the destination (they would meet the same refusal: only
        refusals no source of the pool can get past come here)."""
        loop = asyncio.get_running_loop()
        retry_at = no.retry_at
        wait = retry_at - loop.time()
        if wait > HOLD_MEMORY or self._stopping:
            rest = [self.take_job(q) for _ in range(len(q.jobs))]
            self.to_spool(jobs + rest, no)
            return
        for job in reversed(jobs):
            q.jobs.append(job, left=True)
            if job.body is not None:  # taken once already: counted again when retaken
                self._body_bytes += len(job.body)
        if wait > 0 and retry_at > q.blocked_until:
            q.blocked_until = retry_at
            if q.timer is not None:
                q.timer.cancel()
            q.timer = loop.call_at(retry_at, self._unblock, key, q)
            # The whole queue waits: each job counted once per reason, however many
            # times it meets the same refusal.
            kind = no.kind or "shaping"
            n = 0
            for job in q.jobs:
                if job.held != kind:
                    job.held = kind
                    n += len(job.leases)
            if n:
                self.metrics.shaping_waits.labels(kind).inc(n)

    def requeue(self, q: DomainQueue, job: Job) -> None:
        """A job handed back untouched: first in its queue again (the next session's
        source takes it)."""
        q.jobs.append(job, left=True)
        if job.body is not None:
            self._body_bytes += len(job.body)
        q.changed.set()

    def _unblock(self, key: tuple[str, str], q: DomainQueue) -> None:
        q.timer = None
        q.blocked_until = 0.0
        if self.queues.get(key) is q and q.jobs:
            self._dispatch(key, q)

    def to_spool(self, jobs: list[Job], no: Grant | Choice) -> None:
        """Back to the queue without counting an attempt, due when the broker said."""
        if not jobs:
            return
        now = time.time()
        when = now + max(0.0, no.retry_at - asyncio.get_running_loop().time())
        n = 0
        expired: list[AttemptResult] = []
        # Kept with the recipient (for `postwarden queue list`) until its next outcome.
        why = f"{no.kind or 'shaping'}: {no.reason}"
        for job in jobs:
            for lease in job.leases:
                policy = self.policy_for(lease)
                if policy.expired(lease.created_at, now):
                    # Waiting for a limit does not stop the clock: expiry counts from
                    # acceptance.
                    resp = f"451 4.7.0 held by traffic shaping: {no.reason}"[:500]
                    expired.append(AttemptResult(lease, "temporary", resp, reason="shaping"))
                    continue
                self._pending.append(
                    Outcome(
                        lease.rcpt_id,
                        lease.msg_id,
                        QUEUED,
                        # Back at expiry at the latest, to expire then if still held.
                        next_attempt=min(when, lease.created_at + policy.max_age),
                        counted_attempt=False,
                        wait_reason=why,
                    )
                )
                n += 1
        if expired:
            self._report(expired)
        self.metrics.shaping_waits.labels(no.kind).inc(n)
        log.info("event=shaping_wait recipients=%d until=%.0f reason=%r", n, when, no.reason)
        if self._flush_task is None:
            self._flush_task = asyncio.get_running_loop().create_task(self._flush())

    def refused_at_site(
        self, key: tuple[str, str], q: DomainQueue, job: Job, choice: Choice
    ) -> None:
        if choice.bounce:
            jobs = [job] + [self.take_job(q) for _ in range(len(q.jobs))]
            resp = f"554 5.7.1 delivery stopped by a shaping rule: {choice.bounce}"[:500]
            self._report(
                [
                    AttemptResult(x, "permanent", resp, reason="shaping")
                    for j in jobs
                    for x in j.leases
                ]
            )
        elif choice.defer:
            jobs = [job] + [self.take_job(q) for _ in range(min(len(q.jobs), choice.defer - 1))]
            self.to_spool(jobs, choice)
            if q.jobs:
                asyncio.get_running_loop().call_soon(self._dispatch, key, q)
        else:
            self.hold(key, q, [job], choice)
            if choice.kind == "connection_limit" and q.site:
                self.slot_waiters.setdefault(q.site, set()).add(key)
                for other in self.queues.values():  # idle sessions there: give way
                    if other.site == q.site and other.waiters:
                        other.changed.set()

    def slot_freed(self, site: str) -> None:
        """A connection to ``site`` ended (here, or in another worker: the broker's
        notice): queues waiting for a slot there try now."""
        for key in self.slot_waiters.pop(site, ()):
            q = self.queues.get(key)
            if q is not None and q.jobs:
                if q.timer is not None:
                    q.timer.cancel()
                    q.timer = None
                q.blocked_until = 0.0
                self._dispatch(key, q)

    def broker_notice(self, msg: dict[str, Any]) -> None:
        """The broker's word (shaping.wants): a slot at a site is wanted, by a request
        of this or another worker (idle connections there give way; bulk ones too,
        when transactional mail waits), or one was freed (who waits here asks now)."""
        site = str(msg.get("site") or "")
        if msg.get("push") == "freed":
            self.slot_freed(site)
            return
        if msg.get("push") != "wanted":
            return
        every = frozenset(msg.get("any") or ())
        if not every:
            self.site_wants.pop(site, None)
            return
        until = asyncio.get_running_loop().time() + WANT_HEARD
        self.site_wants[site] = (frozenset(msg.get("high") or ()), every, until)
        for q in self.queues.values():
            if q.site == site and q.waiters:
                q.changed.set()

    def _wanted(self, site: str, source: str, high: bool) -> bool:
        """Whether a request waits for a slot at ``site`` from ``source`` (``high``:
        a transactional one)."""
        w = self.site_wants.get(site)
        if w is None:
            return False
        if w[2] < asyncio.get_running_loop().time():
            del self.site_wants[site]
            return False
        return source in (w[0] if high else w[1])

    async def _session(self, key: tuple[str, str], q: DomainQueue) -> None:
        domain = key[0]
        gate: Gate | None = None

        def gives_way(idle: bool) -> bool:
            """Whether this connection's slot goes to a request waiting for it: when
            idle, to any; else, before a bulk message, to a transactional one."""
            if gate is None or gate.source is None or not q.site or not self.site_wants:
                return False
            if not idle and q.jobs.lanes[0]:
                return False  # transactional mail of its own comes next
            if not self._wanted(q.site, gate.source.name, high=not idle):
                return False
            self.metrics.shaping_yields.labels("idle" if idle else "bulk").inc()
            return True

        async def next_job(first: bool) -> Job | None:
            if self._stopping:
                return None
            if q.jobs:
                if not first and gives_way(idle=False):
                    return None
                return self.take_job(q)
            if first:
                return None
            # Keep the connection a moment for work that is about to arrive.
            q.waiters += 1
            try:
                deadline = time.monotonic() + self.cfg.delivery.timeouts.idle
                while not q.jobs and not self._stopping:
                    if q.site and self.slot_waiters.get(q.site):
                        return None  # another destination of the site needs the slot
                    if gives_way(idle=True):
                        return None  # a request (here or in another worker) does
                    q.changed.clear()
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return None
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(q.changed.wait(), remaining)
            finally:
                q.waiters -= 1
            return self.take_job(q) if q.jobs and not self._stopping else None

        # Every recipient this session took is reported exactly once: by the agent,
        # handed back by the gate, or, when the session ends any other way, here.
        outstanding: dict[int, Lease] = {}

        def settle(job: Job) -> None:
            for lease in job.leases:
                outstanding.pop(lease.rcpt_id, None)

        def report(results: list[AttemptResult]) -> None:
            self._report(results, q.site)
            for r in results:
                outstanding.pop(r.lease.rcpt_id, None)

        async def tracked_next_job(first: bool) -> Job | None:
            job = await next_job(first)
            if job is not None:
                outstanding.update((x.rcpt_id, x) for x in job.leases)
            return job

        if self.shaper is not None:
            gate = Gate(self, key, q, settle)
        ending = "completed"
        try:
            await self.agent.run_session(domain, tracked_next_job, report, gate)
        except asyncio.CancelledError:
            ending = "cancelled"
            raise
        except Exception:
            ending = "failed"
            log.exception("event=session_failed domain=%s", domain)
        finally:
            if outstanding:
                self._report_leftovers(domain, list(outstanding.values()), ending)
            q.sessions -= 1
            self.sessions -= 1
            if q.jobs and not self._stopping:
                self._dispatch(key, q)
            elif not q.jobs and q.sessions == 0 and self.queues.get(key) is q:
                if q.timer is not None:
                    q.timer.cancel()
                del self.queues[key]
                self.retry_policies.pop(domain, None)
            # A global slot came free: another domain may be waiting for one.
            if self.sessions < self.cfg.delivery.max_connections and not self._stopping:
                for other, oq in list(self.queues.items()):
                    if oq.jobs and len(oq.jobs) > oq.waiters:
                        self._dispatch(other, oq)
                    if self.sessions >= self.cfg.delivery.max_connections:
                        break

    def _report_leftovers(self, domain: str, leases: list[Lease], ending: str) -> None:
        """Recipients a session took and never reported: back to the queue untouched
        when it was cancelled (shutdown), else a failed attempt (backed off like any
        temporary failure, so a fault that recurs cannot spin)."""
        self.metrics.session_leftovers.labels(ending).inc(len(leases))
        log.error(
            "event=session_leftovers domain=%s recipients=%d ending=%s",
            domain,
            len(leases),
            ending,
        )
        if ending == "cancelled":
            results = [AttemptResult(x, "not_attempted", "", reason="local") for x in leases]
        else:
            resp = "451 4.3.0 local error during delivery"
            results = [AttemptResult(x, "temporary", resp, reason="local") for x in leases]
        try:
            self._report(results)
        except Exception:
            log.exception("event=leftovers_report_failed domain=%s", domain)

    def take_job(self, q: DomainQueue) -> Job:
        job = q.jobs.popleft()
        if job.body is not None:
            self._body_bytes -= len(job.body)
        return job

    # ------------------------------------------------------------------ results

    def policy_for(self, lease: Lease) -> RetryPolicy:
        return self.retry_policies.get(lease.domain, self.policy)

    def _report(self, results: list[AttemptResult], site: str = "") -> None:
        """The attempts' outcomes to the spool; ``site``: the provider site the
        destination's MX hosts fell in (shaping), in each attempt's event."""
        now = time.time()
        outcomes: list[Outcome] = []
        finals: list[tuple[Lease, AttemptResult, bool]] = []
        label = site_label(site)
        for r in results:
            lease = r.lease
            if r.kind == "not_attempted" and self.policy_for(lease).expired(lease.created_at, now):
                # Expiry counts from acceptance, attempts or none.
                r = dataclasses.replace(r, kind="temporary", response=EXPIRED_UNTRIED)
            detail: dict[str, object] = {"mx": r.mx, "ip": r.ip, "tls": r.tls} if r.mx else {}
            if r.source:
                detail["source"] = r.source
            if site and r.mx:
                detail["site"] = site
            if r.kind == "delivered":
                outcomes.append(
                    Outcome(lease.rcpt_id, lease.msg_id, DELIVERED, r.response, detail=detail)
                )
                self.metrics.delivered.inc()
                self.metrics.delivery_latency.observe(max(0.0, now - lease.created_at))
            elif r.kind == "permanent":
                finals.append((lease, r, False))
                # The one classifier judges the answer (bounces.classify); the event
                # carries its verdict, which feeds suppressions (bounces.feedback).
                v = self.classifier.classify(text=r.response, stage=_STAGE.get(r.reason))
                detail.update(category=v.category, hard=v.hard, status=v.status,
                              evidence="weak" if v.weak else "strong")  # fmt: skip
                outcomes.append(
                    Outcome(lease.rcpt_id, lease.msg_id, BOUNCED, r.response, detail=detail)
                )
                self.metrics.bounced.labels(r.reason).inc()
                self.metrics.bounce_categories.labels(v.category, str(v.hard).lower(), "sync").inc()
            elif r.kind == "temporary":
                policy = self.policy_for(lease)
                state, when = policy.after_temporary_failure(
                    lease.attempts + 1, lease.created_at, now, self.rng
                )
                if state == EXPIRED:
                    finals.append((lease, r, True))
                    detail.update(category="expired", hard=False)
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
                self.metrics.attempts.labels(r.kind, label).inc()
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
        if finals and self.failed is not None:
            self.failed(finals)
        if self._flush_task is None:
            self._flush_task = asyncio.get_running_loop().create_task(self._flush())

    async def _flush(self) -> None:
        # One spool operation for whatever results arrived meanwhile.
        await asyncio.sleep(0)
        batch, self._pending = self._pending, []
        self._flush_task = None
        if not batch:
            return
        if self.bulk_ids:
            self.bulk_ids.difference_update(o.rcpt_id for o in batch)
        task = asyncio.current_task()
        if task is not None:  # drain_records waits for batches still being retried
            self._recording.add(task)
        delay = RECORD_RETRY_FIRST
        failures = 0
        try:
            while True:
                try:
                    await self.spool.record(batch)
                    break
                except Exception:
                    failures += 1
                    self.metrics.record_failures.inc()
                    log.exception("event=record_failed count=%d failures=%d", len(batch), failures)
                    if self._stopping and failures >= RECORD_RETRIES_AT_STOP:
                        # Give up only at shutdown: the recipients stay "active" in the
                        # index and are recovered at the next start; never dropped.
                        break
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, RECORD_RETRY_MAX)
        finally:
            if task is not None:
                self._recording.discard(task)
            self.release(len(batch))
            if any(o.state == QUEUED for o in batch):
                self.wake()

    async def drain_records(self) -> None:
        while self._flush_task is not None or self._pending or self._recording:
            if self._flush_task is not None:
                await self._flush_task
            elif self._pending:
                self._flush_task = asyncio.get_running_loop().create_task(self._flush())
            else:
                await asyncio.wait(set(self._recording))

    # ------------------------------------------------------------------ shutdown

    async def stop(self, grace: float) -> None:
        """Stop taking work; let sessions finish their transaction; give back the rest."""
        self._stopping = True
        self._wake.set()
        for q in self.queues.values():
            q.changed.set()
            if q.timer is not None:
                q.timer.cancel()
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
