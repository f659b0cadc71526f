"""A worker's side of shaping: which provider site a destination belongs to, which
source a connection leaves from, and the broker's word on connections and messages.

The broker is the supervisor's (over its socket, :class:`BrokerClient`) or this
process's own (:class:`LocalBackend`); both answer the same calls, with times on
this process's event-loop clock.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from postwarden.config import Config, PoolConfig, SourceConfig
from postwarden.shaping.grants import Choice, Grant
from postwarden.shaping.rules import Rules, RulesError, load_rules
from postwarden.shaping.wants import deliver
from postwarden.values import Job

log = logging.getLogger("postwarden.shaping")

_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})\b")


def split_answer(response: str) -> tuple[int, str, str]:
    """``"421 4.7.28 text"`` → ``(421, "4.7.28", "text")``."""
    code_s, _, rest = response.partition(" ")
    try:
        code = int(code_s)
    except ValueError:
        return 0, "", response
    m = _ENHANCED.match(rest)
    if m:
        return code, m.group(0), rest[m.end() :].strip()
    return code, "", rest.strip()


class Backend(Protocol):
    async def choose(
        self,
        pool: str,
        members: list[tuple[str, int]],
        overflow: str,
        site: str,
        domain: str | None,
        want: int,
        queued: int = 0,
        lane: int = 0,
    ) -> tuple[Choice, list[str]]: ...

    async def take(
        self,
        source: str,
        site: str,
        want: int,
        domain: str | None,
        sending_domain: str | None,
        lane: int = 0,
    ) -> Grant: ...

    async def refusal(self, source: str, site: str, domain: str | None) -> Grant:
        """Whether the broker now refuses ``source`` at ``site`` for more than a
        message's wait (suspended, paused, capped); the reports sent before count."""
        ...

    async def release(
        self, pool: str, source: str, site: str, domain: str | None, sent: int, unused: int
    ) -> None: ...

    def report_outcome(self, **item: Any) -> None: ...

    async def command(self, **args: Any) -> dict[str, Any]: ...

    async def close(self) -> None: ...


class LocalBackend:
    """The broker of this very process (a single-process appliance, tests).

    ``on_notice``: called (soon after, never inside a broker call) with the broker's
    notices for this process (``shaping.wants``: a slot wanted or freed at a site)."""

    def __init__(
        self, service: Any, on_notice: Callable[[dict[str, Any]], None] | None = None
    ) -> None:
        self.service = service
        self.broker = service.broker
        self.on_notice = on_notice

    def push(self, msg: dict[str, Any]) -> None:
        if self.on_notice is not None:
            asyncio.get_running_loop().call_soon(self.on_notice, msg)

    def _notify(self) -> None:
        if self.broker.wants.outbox:
            deliver(self.broker.wants.take_outbox())

    def _at(self, retry_at: float) -> float:
        if not retry_at:
            return 0.0
        return asyncio.get_running_loop().time() + max(0.0, retry_at - self.broker.clock())

    async def choose(
        self,
        pool: str,
        members: list[tuple[str, int]],
        overflow: str,
        site: str,
        domain: str | None,
        want: int,
        queued: int = 0,
        lane: int = 0,
    ) -> tuple[Choice, list[str]]:
        c = self.broker.choose(
            self, pool, members, overflow, site, domain, want, queued=queued, lane=lane
        )
        self._notify()
        return dataclasses.replace(c, retry_at=self._at(c.retry_at)), self.broker.warming_domains()

    async def take(
        self,
        source: str,
        site: str,
        want: int,
        domain: str | None,
        sending_domain: str | None,
        lane: int = 0,
    ) -> Grant:
        g = self.broker.take(self, source, site, want, domain, sending_domain, lane=lane)
        return dataclasses.replace(g, retry_at=self._at(g.retry_at))

    async def refusal(self, source: str, site: str, domain: str | None) -> Grant:
        g = self.broker.refusal(source, site, domain)
        return dataclasses.replace(g, retry_at=self._at(g.retry_at))

    async def release(
        self, pool: str, source: str, site: str, domain: str | None, sent: int, unused: int
    ) -> None:
        self.broker.release(self, pool, source, site, domain, sent, unused)
        self._notify()

    def report_outcome(self, **item: Any) -> None:
        self.broker.report(**item)

    async def command(self, **args: Any) -> dict[str, Any]:
        return dict(self.service.command(args))

    async def close(self) -> None:
        self.broker.drop_holder(self)


class Shaper:
    """``pools``: a pool by name (the control plane's, which holds the config's too)."""

    def __init__(
        self, cfg: Config, backend: Backend, pools: Callable[[str], PoolConfig | None]
    ) -> None:
        self.backend = backend
        self.pools = pools
        self.warming_domains: set[str] = set()
        self.reconfigure(cfg)

    def reconfigure(self, cfg: Config) -> None:
        try:
            self.rules: Rules = load_rules(cfg.shaping.rules_file)
        except RulesError as exc:  # the supervisor refuses such a file; keep what we had
            log.error("event=shaping_rules_refused error=%r", str(exc))
            if not hasattr(self, "rules"):
                raise
        self.cfg = cfg
        self.sources: dict[str, SourceConfig] = cfg.source_map()

    def site_for(self, mx_hosts: Iterable[str]) -> str:
        return self.rules.site_for(mx_hosts)

    def pool(self, name: str | None) -> PoolConfig:
        """The pool by name, else (deleted since the mail was queued) the default."""
        default = self.cfg.default_pool
        pool = self.pools(name or default)
        if pool is None:
            log.warning("event=unknown_pool pool=%s using=%s", name, default)
            pool = self.pools(default) or self.cfg.pool_map()[default]
        return pool

    async def choose(
        self,
        pool: PoolConfig,
        site: str,
        domain: str | None,
        want: int,
        queued: int = 0,
        lane: int = 0,
    ) -> tuple[Choice, SourceConfig | None]:
        """A source and up to ``want`` tokens; ``queued``: the messages waiting for
        the destination (a capped source's share of them waits with overflow "wait");
        ``lane``: the first message's (0 transactional, 1 bulk)."""
        members = [(m.source, m.weight) for m in pool.members]
        choice, warming = await self.backend.choose(
            pool.name, members, pool.overflow, site, domain, want, queued, lane
        )
        self.warming_domains = set(warming)
        return choice, self.sources.get(choice.source) if choice.ok else None

    def metered_domain(self, job: Job) -> bool:
        """Whether the job takes its sending domain's warming tokens (its domain is
        looked at only while some domain is warming: this runs per transaction)."""
        return bool(self.warming_domains) and job.sending_domain in self.warming_domains
