"""One delivery session's dealings with the shaping broker: the source and slot it
opens with, the message tokens each job takes, what a refusal does to the jobs, and
the answers fed back (docs/shaping.md)."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from postwarden.config import PoolConfig, SourceConfig
from postwarden.dns.resolver import MxHost
from postwarden.queue.jobqueue import DomainQueue
from postwarden.shaping.adaptive import no_answer, speaks_of_pace
from postwarden.shaping.grants import Grant
from postwarden.shaping.shaper import split_answer
from postwarden.values import AttemptResult, Job

if TYPE_CHECKING:
    from postwarden.queue.scheduler import Scheduler

log = logging.getLogger("postwarden.scheduler")

#: A refusal for at most this long is waited out with the connection open.
HOLD_CONNECTION = 2.0
#: Refusals of the chosen source alone (another source of the pool may take its mail).
SOURCE_REFUSALS = frozenset({"suspended", "warming_cap", "paused"})


class Gate:
    """One session's dealings with the shaping broker (see ``DeliveryAgent.run_session``)."""

    def __init__(
        self,
        sched: Scheduler,
        key: tuple[str, str],
        q: DomainQueue,
        settle: Callable[[Job], None] = lambda _job: None,
    ) -> None:
        assert sched.shaper is not None
        self.sched = sched
        # Called with each job handed back (to the queue or the spool) instead of run.
        self.settle = settle
        self.shaper = sched.shaper
        self.key = key
        self.q = q
        self.pool: PoolConfig = self.shaper.pool(key[1])
        self.domain = key[0]
        self.site = ""
        self.source: SourceConfig | None = None
        self.metered = False
        self.tokens = 0
        self.max_messages = 0

    async def open(self, mx_hosts: tuple[MxHost, ...], job: Job) -> SourceConfig | None:
        self.site = self.q.site = self.shaper.site_for(h.name for h in mx_hosts)
        rules = self.shaper.rules
        if not self.key[1] and rules.routes:  # no pool yet: a route by site may give one
            routed = rules.route(self.domain, job.sending_domain, self.site)
            if routed is not None:
                self.pool = self.shaper.pool(routed)
        limits = rules.limits_for(self.site, self.domain)
        if limits.retry:
            self.sched.retry_policies[self.domain] = dataclasses.replace(
                self.sched.policy, **limits.retry
            )
        # Tokens for what one connection may carry here (the site's own limit, not
        # only the delivery default): never the rest of a warming cap.
        cap = self.sched.cfg.delivery.max_messages_per_connection
        if limits.max_messages_per_connection:
            cap = min(cap, limits.max_messages_per_connection)
        queued = 1 + len(self.q.jobs)
        choice, source = await self.shaper.choose(
            self.pool, self.site, self.domain, min(queued, cap), queued, 1 if job.lane else 0
        )
        if not choice.ok or source is None:
            self.sched.refused_at_site(self.key, self.q, job, choice)
            self.settle(job)
            return None
        self.source, self.metered = source, choice.metered
        self.tokens, self.max_messages = choice.tokens, choice.max_messages
        self.sched.metrics.shaping_connections.labels(self.pool.name, source.name).inc()
        return source

    async def admit(self, job: Job) -> str:
        assert self.source is not None
        by_domain = self.shaper.metered_domain(job)
        if not self.metered and not by_domain:
            return "go"
        if self.tokens > 0 and not by_domain:
            self.tokens -= 1
            return "go"
        loop = asyncio.get_running_loop()
        while True:
            want = 1 if by_domain else min(10, 1 + len(self.q.jobs))
            g = await self.shaper.backend.take(
                self.source.name,
                self.site,
                want,
                self.domain,
                job.sending_domain if by_domain else None,
                1 if job.lane else 0,
            )
            if g.ok:
                self.tokens += g.tokens - 1
                return "go"
            if g.kind in ("domain_warming_cap", "domain_paused"):  # this sender's mail only
                self.sched.to_spool([job], g)
                self.settle(job)
                return "skip"
            wait = g.retry_at - loop.time()
            if wait <= HOLD_CONNECTION and not self.sched.stopping:
                await asyncio.sleep(max(wait, 0.005))
                continue
            if g.kind in SOURCE_REFUSALS and not self.sched.stopping:
                # This source's own refusal: the job goes first in the queue again
                # and the next connection's source (another of the pool, or the
                # broker's word that none can) takes it; the queue is not held.
                self.sched.requeue(self.q, job)
            else:
                self.sched.hold(self.key, self.q, [job], g)
            self.settle(job)
            return "stop"

    async def refused(
        self, job: Job, results: list[AttemptResult], room: int, answer: bool
    ) -> bool:
        """The connection was refused as a whole (at connect, greeting, EHLO, or a
        MAIL answer ending it): one event for the (source, site), reported once. The
        host's answer (``answer``) about pace hands the job back without counting an attempt: to the
        queue when the broker now refuses this source (another source takes it), else
        with what the connection would have carried (``room`` jobs) to the spool, due
        at the retry schedule's time. True: the gate took the job back."""
        if self.source is None or not results:
            return False
        r = results[0]
        code, enhanced, _text = split_answer(r.response)
        pace = answer and r.kind == "temporary" and speaks_of_pace(r.reason, code, enhanced)
        self._report_answer(
            job,
            r.response,
            bounced=int(r.kind == "permanent"),
            # A host that gave no answer (down, unreachable) says nothing of the sender.
            deferred=int(r.kind == "temporary" and not pace and answer),
            throttled=len(job.leases) if pace else 0,
            adaptive=pace,
        )
        if not pace or self.sched.stopping:
            return False
        no = await self.shaper.backend.refusal(self.source.name, self.site, self.domain)
        if not no.ok:
            self.sched.requeue(self.q, job)
            self.settle(job)
            return True
        jobs = [job] + [self.sched.take_job(self.q) for _ in range(min(len(self.q.jobs), room - 1))]
        lease = job.leases[0]
        delay = self.sched.policy_for(lease).delay(lease.attempts + 1, self.sched.rng)
        loop = asyncio.get_running_loop()
        wait = Grant(False, reason=r.response, retry_at=loop.time() + delay, kind="throttled")
        self.sched.to_spool(jobs, wait)
        self.settle(job)
        return True

    def answered(self, job: Job, results: list[AttemptResult]) -> None:
        if self.source is None or not results:
            return
        delivered = bounced = deferred = throttled = 0
        worst: AttemptResult | None = None
        for r in results:
            if r.kind == "delivered":
                delivered += 1
            elif r.kind == "permanent":
                bounced += 1
                worst = worst or r
            elif r.kind == "temporary":
                # A deferral about pace is the provider's throttling, not a failure;
                # no answer at all (the network's, DNS, ours) says nothing of the
                # sender: neither counts against its health.
                c, e, _t = split_answer(r.response)
                if speaks_of_pace(r.reason, c, e):
                    throttled += 1
                elif not no_answer(r.reason, e):
                    deferred += 1
                worst = worst or r
        response = (worst or results[0]).response
        code, enhanced, _text = split_answer(response)
        adaptive = worst is None or speaks_of_pace(worst.reason, code, enhanced)
        self._report_answer(
            job,
            response,
            delivered=delivered,
            bounced=bounced,
            deferred=deferred,
            throttled=throttled,
            adaptive=adaptive,
        )

    def _report_answer(self, job: Job, response: str, **counts: int) -> None:
        """One answer for the (source, site) pair, with the recipients' outcomes."""
        assert self.source is not None
        code, enhanced, text = split_answer(response)
        self.shaper.backend.report_outcome(
            source=self.source.name,
            site=self.site,
            domain=self.domain,
            sending_domain=job.sending_domain,
            code=code,
            enhanced=enhanced,
            text=text[:300],
            **counts,
        )

    async def close(self, sent: int) -> None:
        if self.source is not None:
            await self.shaper.backend.release(
                self.pool.name, self.source.name, self.site, self.domain, sent, max(0, self.tokens)
            )
            if self.sched.slot_waiters.get(self.site):
                self.sched.slot_freed(self.site)
