"""The control plane inside a process: database, caches kept current from the change
feed, and the context the API handlers use (docs/decisions/0005)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import os
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from sqlalchemy import delete, func, select

from postwarden.config import Config, PoolConfig, PoolMember, SourceConfig
from postwarden.control import ControlPlaneError
from postwarden.control.auth import KeyAuthenticator, RateLimiter
from postwarden.control.bodies import BodyBudget
from postwarden.control.domains import signing_generation
from postwarden.dns.resolver import Resolver
from postwarden.mta.auth import AuthUnavailable, KeyLogin
from postwarden.mta.dkim import DkimKeyError, SigningKey, parse_key
from postwarden.queue.scheduler import SUPPRESSIONS_UNKNOWN
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
    ApiKey,
    Change,
    DkimKey,
    Domain,
    IdempotencyKey,
    Pool,
    Tenant,
)
from postwarden.store.secrets import load_box
from postwarden.store.suppress import SuppressionCache

if TYPE_CHECKING:
    from postwarden.shaping.shaper import Shaper

log = logging.getLogger("postwarden.control")
_limited = LogLimiter(log)
#: Seconds before the database is asked again after it failed; doubling up to the max.
RETRY_FIRST = 0.5
RETRY_MAX = 5.0


class PoolNotAllowed(ValueError):
    """The pool a message names does not exist or is not the sender's to use; the
    message is one line, fit for an SMTP reply or an API error."""


def _domain_key(domain: str) -> str:
    return domain.strip().rstrip(".").lower()


def pool_from_row(row: Pool) -> PoolConfig:
    return PoolConfig(
        row.name,
        [PoolMember(str(m["source"]), int(m["weight"])) for m in row.members],
        "spill" if row.overflow == "spill" else "wait",
    )


class ControlPlane:
    def __init__(
        self,
        cfg: Config,
        resolver: Resolver,
        *,
        inject: Callable[..., Awaitable[Any]] | None = None,
        spool_root: str | None = None,
    ) -> None:
        self.cfg = cfg
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
        self.suppressions = SuppressionCache(self.sessions)
        # What SMTP sessions that logged in with a key check at every MAIL, kept from
        # the change feed: keys revoked or deleted, and tenants disabled or deleted,
        # since this process started (a key revoked before could not have logged in).
        self.revoked_keys: set[str] = set()  # key prefixes
        self.disabled_tenants: set[int] = set()
        self.signing_keys: list[SigningKey] = []
        self.verified: dict[int, set[str]] = {}  # tenant id -> its verified sending domains
        self.notify_tenants: set[int] = set()  # tenants with settings.bounce_notifications
        # Every pool by name: the configuration's, and those made through the API (the
        # configuration's win a name); kept current from the change feed.
        self.sources: dict[str, SourceConfig] = {}
        self.pools: dict[str, PoolConfig] = {}
        self.config_pools: dict[str, PoolConfig] = {}
        self.api_pools: dict[str, PoolConfig] = {}
        self.default_pool = cfg.default_pool
        # tenant id -> (its default pool, the other pools it may name); only tenants
        # with either.
        self.tenant_pools: dict[int, tuple[str | None, frozenset[str]]] = {}
        self.configure_pools(cfg)
        # Where the inbound MX accepts mail: <control.return_path_label>.<d> for every
        # registered sending domain d (any tenant, verified or not), and inbound.domains.
        self.sending_domains: frozenset[str] = frozenset()
        self.return_path_domains: frozenset[str] = frozenset()
        self.inbound_domains: frozenset[str] = frozenset()
        self.return_path_label = ""
        self.configure_inbound(cfg)
        # Called with the new key list whenever verified domains or their keys change.
        self.on_keys: list[Callable[[list[SigningKey]], None]] = []
        # Spools a message (the appliance's; None in a control-only process).
        self.inject = inject
        # The spool this process writes to (its root, every worker's shard under it):
        # where a retried idempotent request finds what was accepted (None: this
        # process relays to an MTA elsewhere).
        self.spool_root = spool_root
        # Set by the appliance: the worker's traffic shaping (None in a control-only
        # process); the shaping API routes speak to the broker through it.
        self.shaper: Shaper | None = None
        self._last_change = 0
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        # One reader of the change feed at a time: the poller, or a request that waits
        # for what it changed to be in force (:meth:`sync`).
        self._sync_lock = asyncio.Lock()
        # DkimKey id -> its parsed key: a key row never changes, and parsing an RSA key
        # costs tens of milliseconds, so only keys not seen before are parsed.
        self._parsed_keys: dict[int, SigningKey] = {}

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
        await self.reload_keys()
        await self.reload_return_paths()
        await self.reload_pools()
        self.db.started = True
        self.db.recovered()
        self._task = asyncio.create_task(self._poll())

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

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        await self.engine.dispose()

    # ------------------------------------------------------------------ DKIM keys

    async def load_signing_keys(self) -> list[SigningKey]:
        """The keys that sign: the signing generation of every verified domain."""
        async with self.sessions() as s:
            rows = (
                await s.execute(
                    select(Domain.id, Domain.name, Domain.tenant_id, DkimKey)
                    .join(DkimKey, DkimKey.domain_id == Domain.id)
                    .where(Domain.verified_at.is_not(None))
                )
            ).all()
        by_domain: dict[int, tuple[str, list[DkimKey]]] = {}
        verified: dict[int, set[str]] = {}
        for dom_id, name, tenant_id, key in rows:
            by_domain.setdefault(dom_id, (name, []))[1].append(key)
            verified.setdefault(tenant_id, set()).add(name)
        signing: list[tuple[str, DkimKey]] = []
        for name, keys in by_domain.values():
            gen = signing_generation(keys)
            signing += [(name, k) for k in keys if k.generation == gen]
        new = [(name, k) for name, k in signing if k.id not in self._parsed_keys]
        if new:
            # Off the event loop: a database of many domains must not stall SMTP
            # sessions and deliveries while its new keys are read.
            parsed = await asyncio.to_thread(lambda: [self._parse(n, k) for n, k in new])
            for (_, k), key in zip(new, parsed, strict=True):
                if key is not None:
                    self._parsed_keys[k.id] = key
        self._parsed_keys = {
            k.id: self._parsed_keys[k.id] for _, k in signing if k.id in self._parsed_keys
        }
        self.verified = verified
        return [self._parsed_keys[k.id] for _, k in signing if k.id in self._parsed_keys]

    def _parse(self, name: str, k: DkimKey) -> SigningKey | None:
        try:
            material = self.box.open(k.private_key)
            return parse_key(
                name,
                k.selector,
                material,
                k.algorithm,  # type: ignore[arg-type]
                f"{name}/{k.selector}",
            )
        except (ValueError, DkimKeyError) as exc:
            log.error(
                "event=dkim_key_unusable domain=%s selector=%s error=%r",
                name,
                k.selector,
                str(exc),
            )
            return None

    async def reload_keys(self) -> None:
        self.signing_keys = await self.load_signing_keys()
        for fn in self.on_keys:
            fn(self.signing_keys)

    # ------------------------------------------------------------------ pools

    def configure_pools(self, cfg: Config) -> None:
        """Take the pools (and default pool) of a (re)loaded configuration."""
        self.sources = cfg.source_map()
        self.config_pools = cfg.pool_map()
        self.default_pool = cfg.default_pool
        self._merge_pools()

    def _merge_pools(self) -> None:
        merged = dict(self.config_pools)
        for name, pool in self.api_pools.items():
            if name in merged:
                continue  # the configuration's wins its name
            members = [m for m in pool.members if m.source in self.sources]
            if len(members) != len(pool.members):
                # A source taken out of the configuration since: the pool keeps the rest.
                log.warning(
                    "event=pool_source_missing pool=%s sources=%s",
                    name,
                    ",".join(m.source for m in pool.members if m.source not in self.sources),
                )
                pool = PoolConfig(pool.name, members, pool.overflow)
            merged[name] = pool
        self.pools = merged

    async def reload_pools(self) -> None:
        """Read the pools made through the API and each tenant's pools."""
        async with self.sessions() as s:
            rows = list((await s.execute(select(Pool))).scalars())
            tenants = (
                await s.execute(
                    select(Tenant.id, Tenant.default_pool, Tenant.allowed_pools, Tenant.settings)
                )
            ).all()
        api_pools = {}
        for row in rows:
            try:
                api_pools[row.name] = pool_from_row(row)
            except (KeyError, TypeError, ValueError):
                log.error("event=pool_unusable pool=%s members=%r", row.name, row.members)
        self.api_pools = api_pools
        self.tenant_pools = {
            tid: (default, frozenset(allowed or ()))
            for tid, default, allowed, _settings in tenants
            if default or allowed
        }
        # Tenants that want a DSN for their applications' failed mail (bounces.notify).
        self.notify_tenants = {
            tid
            for tid, *_pools, settings in tenants
            if (settings or {}).get("bounce_notifications")
        }
        self._merge_pools()

    def pool_for(self, tenant_id: int | None, requested: str | None) -> str | None:
        """The pool to store with a message that names ``requested`` (None: names none),
        from ``tenant_id`` (None: a trusted submitter, e.g. a configured SMTP user).

        None means the appliance's default pool (delivery resolves it). Raises
        PoolNotAllowed when the pool does not exist or is not the tenant's: its default
        pool, one of its allowed pools, or the appliance's default pool when the tenant
        has no default of its own. A trusted submitter may name any pool."""
        default, allowed = (None, frozenset[str]())
        if tenant_id is not None:
            default, allowed = self.tenant_pools.get(tenant_id, (None, frozenset()))
        if requested is None:
            # A default removed under the tenant (a race with DELETE): the appliance's.
            return default if default in self.pools else None
        if requested not in self.pools:
            raise PoolNotAllowed(f"no pool named {requested[:64]!r}")
        if tenant_id is None or requested == default or requested in allowed:
            return requested
        if default is None and requested == self.default_pool:
            return requested
        raise PoolNotAllowed(f"this account may not send from pool {requested!r}")

    def pool_members(self, name: str) -> PoolConfig | None:
        """A pool by name (its weighted sources and overflow), or None."""
        return self.pools.get(name)

    # ------------------------------------------------------------------ inbound domains

    def configure_inbound(self, cfg: Config) -> None:
        """Take ``inbound.domains`` and the return-path label of a (re)loaded configuration."""
        self.return_path_label = cfg.control.return_path_label.lower()
        self.inbound_domains = frozenset(_domain_key(d) for d in cfg.inbound.domains)
        self.return_path_domains = frozenset(
            f"{self.return_path_label}.{d}" for d in self.sending_domains
        )

    async def reload_return_paths(self) -> None:
        """Read every registered sending domain (the inbound MX's return paths)."""
        async with self.sessions() as s:
            names = (await s.execute(select(Domain.name))).scalars().all()
        self.sending_domains = frozenset(_domain_key(n) for n in names)
        self.return_path_domains = frozenset(
            f"{self.return_path_label}.{d}" for d in self.sending_domains
        )

    def accepts_inbound(self, domain: str) -> bool:
        """Whether the inbound MX takes mail for ``domain``: a registered sending domain's
        return-path domain, or one of ``inbound.domains`` (case and a final dot ignored)."""
        d = _domain_key(domain)
        return d in self.return_path_domains or d in self.inbound_domains

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

    def key_valid(self, prefix: str, tenant_id: int) -> bool:
        """Whether a key that logged in may still send: not revoked, its tenant not
        disabled since (two set lookups: asked at every MAIL)."""
        return prefix not in self.revoked_keys and tenant_id not in self.disabled_tenants

    async def reload_revocations(self, rows: list[Any]) -> None:
        """Bring :attr:`revoked_keys` and :attr:`disabled_tenants` up to date with the
        keys and tenants that change-feed ``rows`` name."""
        prefixes = sorted({r[3] for r in rows if r[1] == "api_key" and r[3]})
        tenants = sorted({r[2] for r in rows if r[1] == "tenant" and r[2] is not None})
        keys: dict[str, Any] = {}
        states: dict[int, bool] = {}
        async with self.sessions() as s:
            for i in range(0, len(prefixes), 500):
                chunk = prefixes[i : i + 500]
                stmt = select(ApiKey.prefix, ApiKey.revoked_at).where(ApiKey.prefix.in_(chunk))
                keys.update((p, at) for p, at in (await s.execute(stmt)).all())
            for i in range(0, len(tenants), 500):
                ids = tenants[i : i + 500]
                stmt2 = select(Tenant.id, Tenant.disabled).where(Tenant.id.in_(ids))
                states.update((t, bool(d)) for t, d in (await s.execute(stmt2)).all())
        for p in prefixes:
            if p not in keys or keys[p] is not None:
                self.revoked_keys.add(p)
            else:
                self.revoked_keys.discard(p)
        for t in tenants:
            if states.get(t, True):
                self.disabled_tenants.add(t)
            else:
                self.disabled_tenants.discard(t)

    def may_send_as(self, tenant_id: int, domain: str | None) -> bool:
        """Whether a tenant may send mail From ``domain`` (one of its verified domains,
        unless ``control.require_verified_domains`` is off)."""
        if domain is None:
            return False
        if not self.cfg.control.require_verified_domains:
            return True
        return domain in self.verified.get(tenant_id, ())

    def suppressed(self, tenant: str, address: str) -> str | None:
        """The one suppression check, for spool tenants (ids as text);
        ``SUPPRESSIONS_UNKNOWN`` while the list has not been read (started with the
        database down): the caller holds the mail."""
        try:
            tid = int(tenant)
        except ValueError:
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
            await self.reload_revocations(rows)
        if "suppression" in kinds:
            await self.suppressions.refresh((r[2], r[3]) for r in rows if r[1] == "suppression")
        if "domain" in kinds:
            await self.reload_keys()
            await self.reload_return_paths()
        if kinds & {"pool", "tenant"}:
            await self.reload_pools()
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
