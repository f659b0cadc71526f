"""The control plane inside a process: the database, the change feed that keeps the
caches current (signing keys, pools, inbound domains, revocations, suppressions: each a
module of its own), and the context the API handlers use (docs/decisions/0005)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any

from sqlalchemy import delete, func, select

from postwarden.config import Config
from postwarden.control import ControlPlaneError, stop_task
from postwarden.control.analytics_pass import AnalyticsPass
from postwarden.control.auth import KeyAuthenticator, RateLimiter
from postwarden.control.bodies import BodyBudget
from postwarden.control.campaign_runner import CampaignRunner, Submit
from postwarden.control.data_sources import pull_due
from postwarden.control.import_runner import ImportRunner
from postwarden.control.inbound_domains import InboundDomains
from postwarden.control.pool_cache import PoolCache
from postwarden.control.revocations import Revocations
from postwarden.control.signing_keys import SigningKeyCache
from postwarden.control.tenant_keys import TenantKeyCache
from postwarden.control.tracking import HitWriter
from postwarden.control.verdict_pass import VerdictPass
from postwarden.control.webhook_dispatch import WebhookDispatcher
from postwarden.dns.resolver import Resolver
from postwarden.metrics import Metrics
from postwarden.mta.auth import AuthUnavailable, KeyLogin
from postwarden.mta.dkim import SigningKey
from postwarden.store.availability import DbHealth, LogLimiter, is_unavailable, short_error
from postwarden.store.check import shipped_revisions
from postwarden.store.db import (
    create_engine,
    current_revision,
    head_revision,
    sessionmaker,
    upgrade,
)
from postwarden.store.models import (
    Change,
    IdempotencyKey,
)
from postwarden.store.secrets import load_box
from postwarden.store.suppress import SuppressionCache
from postwarden.values import SUPPRESSIONS_UNKNOWN, tenant_id

log = logging.getLogger("postwarden.control")
_limited = LogLimiter(log)
#: Seconds before the database is asked again after it failed; doubling up to the max.
RETRY_FIRST = 0.5
RETRY_MAX = 5.0


class ControlPlane:
    def __init__(
        self,
        cfg: Config,
        resolver: Resolver,
        *,
        inject: Callable[..., Awaitable[Any]] | None = None,
        spool_root: str | None = None,
        shaping_command: Callable[..., Awaitable[dict[str, Any]]] | None = None,
        on_keys: Callable[[list[SigningKey]], None] | None = None,
        submit: Submit | None = None,
        worker: tuple[int, int] = (0, 1),
        metrics: Metrics | None = None,
    ) -> None:
        self.cfg = cfg
        # The appliance's metrics (None in a control-only process): the public routes count.
        self.metrics = metrics
        self.resolver = resolver
        # Checking records an operator just published must not see yesterday's answer.
        self.fresh_resolver = Resolver(cfg.dns.nameservers, timeout=cfg.dns.timeout, cache_size=0)
        self.engine = create_engine(cfg.database.url)
        self.sessions = sessionmaker(self.engine)
        try:
            self.box = load_box(cfg.control.encryption_key, cfg.control.encryption_key_file)
        except (OSError, ValueError) as exc:
            raise ControlPlaneError(f"control.encryption_key: {exc}") from exc
        # Whether the database answers (issue 18): the API, SMTP AUTH and /healthz ask.
        self.db = DbHealth(log=log)
        self.auth = KeyAuthenticator(self.sessions)
        self.limiter = RateLimiter(cfg.control.rate_limit, cfg.control.rate_burst)
        # Bytes of request bodies this process holds at once (its share of the budget).
        self.body_budget = BodyBudget(cfg.control.max_body_memory)
        # The caches, each kept current from the change feed (poll_once).
        self.suppressions = SuppressionCache(self.sessions)
        self.revocations = Revocations(self.sessions)
        self.signing = SigningKeyCache(self.sessions, self.box, on_keys)
        self.pool_cache = PoolCache(self.sessions, cfg)
        self.inbound = InboundDomains(self.sessions, cfg)
        # The tenants' keys of tracking, unsubscribe and preference links (issue 22).
        self.tenant_keys = TenantKeyCache(self.sessions, self.box)
        # Erased addresses stay suppressed as tombstones (control.privacy).
        self.suppressions.tombstone_of = self.tenant_keys.tombstone
        # Tracking hits, written in batches (control.tracking), and judged by one
        # process (the first worker; control.verdict_pass).
        self.hits = HitWriter(self.sessions, cfg.tracking.hit_batch)
        self.verdicts = (
            VerdictPass.from_config(self.sessions, cfg, metrics) if worker[0] == 0 else None
        )
        # Event webhooks out: the outbox sent by the first worker (control.webhook_dispatch).
        self.webhooks = WebhookDispatcher(self) if worker[0] == 0 else None
        # Events into the hourly rollups the analytics read (control.analytics_pass).
        self.analytics = (
            AnalyticsPass(self.sessions, shaping=shaping_command) if worker[0] == 0 else None
        )
        # Contact imports and data-source pulls, in the background (issue 20).
        self.imports = ImportRunner(self.sessions, cfg.control.import_batch, self._pull_due)
        # Spools a message (the appliance's; None in a control-only process).
        self.inject = inject
        # Campaigns, launched and fed in the background where mail is spooled (issue
        # 21); ``worker``: (this worker's index, how many there are).
        self.campaigns = (
            CampaignRunner(
                self,
                submit,
                index=worker[0],
                count=worker[1],
            )
            if submit is not None
            else None
        )
        # The spool this process writes to (its root, every worker's shard under it):
        # where a retried idempotent request finds what was accepted (None: this
        # process relays to an MTA elsewhere).
        self.spool_root = spool_root
        # A command to the traffic-shaping broker, through the worker's shaper (None in
        # a control-only process): what the shaping API routes call.
        self.shaping_command = shaping_command
        self._last_change = 0
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        # One reader of the change feed at a time: the poller, or a request that waits
        # for what it changed to be in force (:meth:`sync`).
        self._sync_lock = asyncio.Lock()

    async def start(self) -> None:
        """Load the caches and follow the change feed. With the database down, return
        at once and keep trying in the background (the MTA side goes on without it:
        :attr:`db` says ``control_plane: starting`` until then); a database at the wrong
        revision still stops the start."""
        try:
            await self._start()
        except Exception as exc:
            if not is_unavailable(exc):
                raise
            self.db.down(exc)
            log.error(
                "event=control_plane_waiting reason=database_unavailable error=%r"
                " note='the API answers 503 and SMTP AUTH 454 until the database is back'",
                short_error(exc),
            )
            self._task = asyncio.create_task(self._start_later(), name="control-start")

    async def _start_later(self) -> None:
        delay = RETRY_FIRST
        while True:
            await asyncio.sleep(delay)
            try:
                await self._start()
                return
            except ControlPlaneError as exc:  # reachable, but not at this version's revision
                self.db.error = str(exc)
                _limited(logging.ERROR, "start_refused", "event=control_plane_not_started %s",
                         str(exc))  # fmt: skip
            except Exception as exc:
                if is_unavailable(exc):
                    self.db.down(exc)
                else:
                    _limited(logging.ERROR, "start_failed", "event=control_plane_start_failed",
                             exc=exc)  # fmt: skip
            delay = min(delay * 2, RETRY_MAX)

    async def _start(self) -> None:
        url = self.cfg.database.url
        # A worker's supervisor has checked (or upgraded) the database already.
        if os.environ.get("POSTWARDEN_DB_CHECKED") != "1":
            have, want = await current_revision(url), head_revision()
            if have is not None and have not in {rev for rev, _doc in shipped_revisions()}:
                raise ControlPlaneError(
                    f"database.url: the database is at revision {have}, which this"
                    f" version (newest {want}) does not know: it was upgraded by a newer"
                    " Postwarden; install that version, or downgrade the database with"
                    f" it (`postwarden db downgrade {want}`)"
                )
            if have != want and self.cfg.database.auto_upgrade:
                await upgrade(url)
                have = await current_revision(url)
            if have != want:
                raise ControlPlaneError(
                    f"database.url: the database is at revision {have or 'none'}, this"
                    f" version needs {want}: run `postwarden db upgrade`"
                )
        async with self.sessions() as s:
            self._last_change = (await s.execute(select(func.max(Change.id)))).scalar() or 0
        await self.suppressions.load()
        await self.signing.reload()
        await self.inbound.reload()
        await self.pool_cache.reload()
        await self.tenant_keys.reload()
        self.db.started = True
        self.db.recovered()
        self._task = asyncio.create_task(self._poll())
        self.imports.start()
        if self.campaigns is not None:
            self.campaigns.start()
        if self.verdicts is not None:
            self.verdicts.start()
        if self.webhooks is not None:
            self.webhooks.start()
        if self.analytics is not None:
            self.analytics.start()

    def wake(self) -> None:
        """Read the change feed soon (this process just wrote to it)."""
        self._wake.set()

    async def sync(self) -> None:
        """Read the change feed now and wait until this process's caches hold it: an
        API answer to a change (a domain verified, a suppression added, a tenant
        disabled) is then already in force here. Other processes follow within
        ``control.cache_poll``."""
        async with self._sync_lock:
            await self.poll_once()

    async def _pull_due(self) -> int:
        return await pull_due(self)

    async def stop(self) -> None:
        await self.imports.stop()
        if self.campaigns is not None:
            await self.campaigns.stop()
        if self.verdicts is not None:
            await self.verdicts.stop()
        if self.webhooks is not None:
            await self.webhooks.stop()
        if self.analytics is not None:
            await self.analytics.stop()
        await stop_task(self._task)
        await self.hits.stop()
        await self.engine.dispose()

    # ------------------------------------------------------------------ the MTA's questions

    async def smtp_login(self, login: str, password: str) -> KeyLogin | None:
        """SMTP AUTH with an API key: the tenant and key when ``login`` is the key's
        tenant name and the key has the ``send`` scope. Raises :class:`AuthUnavailable`
        when the database cannot say (and the key is not cached)."""
        try:
            principal = await self.auth.authenticate(password)
        except Exception as exc:
            if not is_unavailable(exc):
                raise
            self.db.down(exc)
            raise AuthUnavailable(short_error(exc)) from exc
        if (
            principal is None
            or principal.tenant_id is None
            or principal.tenant_name != login
            or not principal.has("send")
        ):
            return None
        return KeyLogin(principal.tenant_id, principal.prefix)

    def may_send_as(self, tenant_id: int, domain: str | None) -> bool:
        """Whether a tenant may send mail From ``domain`` (one of its verified domains,
        unless ``control.require_verified_domains`` is off)."""
        if domain is None:
            return False
        if not self.cfg.control.require_verified_domains:
            return True
        return domain in self.signing.verified.get(tenant_id, ())

    def suppressed(self, tenant: str, address: str) -> str | None:
        """The one suppression check, for spool tenants (ids as text);
        ``SUPPRESSIONS_UNKNOWN`` while the list has not been read (started with the
        database down): the caller holds the mail."""
        tid = tenant_id(tenant)
        if tid is None:
            return None
        if not self.db.started:
            return SUPPRESSIONS_UNKNOWN
        return self.suppressions.check(tid, address)

    # ------------------------------------------------------------------ change feed

    async def poll_once(self) -> None:
        async with self.sessions() as s:
            rows = (
                await s.execute(
                    select(Change.id, Change.kind, Change.tenant_id, Change.ref)
                    .where(Change.id > self._last_change)
                    .order_by(Change.id)
                    .limit(20_000)
                )
            ).all()
        if not rows:
            return
        kinds = {r[1] for r in rows}
        if kinds & {"api_key", "tenant"}:
            self.auth.invalidate()
            await self.revocations.reload(rows)
        if "suppression" in kinds:
            await self.suppressions.refresh((r[2], r[3]) for r in rows if r[1] == "suppression")
        if "domain" in kinds:
            await self.signing.reload()
            await self.inbound.reload()
        if kinds & {"pool", "tenant"}:
            await self.pool_cache.reload()
        if "tenant_key" in kinds:
            await self.tenant_keys.reload()
        # Only once the caches hold them: a failure above reads the same rows again.
        self._last_change = rows[-1][0]

    async def prune(self) -> None:
        """Forget change-feed rows older than a day and expired idempotency keys."""
        now = dt.datetime.now(dt.UTC)
        async with self.sessions() as s:
            await s.execute(delete(Change).where(Change.created_at < now - dt.timedelta(days=1)))
            ttl = dt.timedelta(seconds=self.cfg.control.idempotency_ttl)
            await s.execute(delete(IdempotencyKey).where(IdempotencyKey.created_at < now - ttl))
            await s.commit()

    async def _poll(self) -> None:
        """Read the change feed every ``control.cache_poll`` (or when woken); while
        the database is down, ask it again after 0.5 s, doubling up to 5 s, and say
        it is back the first time it answers."""
        n = 0
        wait = self.cfg.control.cache_poll
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), wait)
            self._wake.clear()
            try:
                await self.sync()
                self.db.recovered()
                wait = self.cfg.control.cache_poll
                n += 1
                if n % 3600 == 0:
                    await self.prune()
            except Exception as exc:
                if is_unavailable(exc):
                    self.db.down(exc)
                    wait = RETRY_FIRST if self.db.failures <= 1 else min(wait * 2, RETRY_MAX)
                _limited(logging.WARNING, "change_feed", "event=change_feed_failed", exc=exc)
