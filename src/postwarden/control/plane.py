"""The control plane inside a process: database, caches kept current from the change
feed, and the context the API handlers use (docs/decisions/0005)."""

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
from postwarden.control import ControlPlaneError
from postwarden.control.auth import KeyAuthenticator, RateLimiter
from postwarden.control.domains import signing_generation
from postwarden.dns.resolver import Resolver
from postwarden.mta.dkim import DkimKeyError, SigningKey, parse_key
from postwarden.store.db import (
    create_engine,
    current_revision,
    head_revision,
    sessionmaker,
    upgrade,
)
from postwarden.store.models import Change, DkimKey, Domain, IdempotencyKey
from postwarden.store.secrets import load_box
from postwarden.store.suppress import SuppressionCache

log = logging.getLogger("postwarden.control")


class ControlPlane:
    def __init__(self, cfg: Config, resolver: Resolver) -> None:
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
        self.auth = KeyAuthenticator(self.sessions)
        self.limiter = RateLimiter(cfg.control.rate_limit, cfg.control.rate_burst)
        self.suppressions = SuppressionCache(self.sessions)
        self.signing_keys: list[SigningKey] = []
        self.verified: dict[int, set[str]] = {}  # tenant id -> its verified sending domains
        # Called with the new key list whenever verified domains or their keys change.
        self.on_keys: list[Callable[[list[SigningKey]], None]] = []
        # Set by the appliance: spools a message (None in a control-only process).
        self.inject: Callable[..., Awaitable[Any]] | None = None
        self._last_change = 0
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        url = self.cfg.database.url
        # A worker's supervisor has checked (or upgraded) the database already.
        if os.environ.get("POSTWARDEN_DB_CHECKED") != "1":
            if self.cfg.database.auto_upgrade:
                await upgrade(url)
            have, want = await current_revision(url), head_revision()
            if have != want:
                raise ControlPlaneError(
                    f"database.url: the database is at revision {have or 'none'}, this"
                    f" version needs {want}: run `postwarden db upgrade`"
                )
        async with self.sessions() as s:
            self._last_change = (await s.execute(select(func.max(Change.id)))).scalar() or 0
        await self.suppressions.load()
        await self.reload_keys()
        self._task = asyncio.create_task(self._poll())

    def wake(self) -> None:
        """Read the change feed now (this process just wrote to it)."""
        self._wake.set()

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
        self.verified = verified
        out: list[SigningKey] = []
        for name, keys in by_domain.values():
            gen = signing_generation(keys)
            for k in keys:
                if k.generation != gen:
                    continue
                try:
                    material = self.box.open(k.private_key)
                    out.append(
                        parse_key(
                            name,
                            k.selector,
                            material,
                            k.algorithm,  # type: ignore[arg-type]
                            f"{name}/{k.selector}",
                        )
                    )
                except (ValueError, DkimKeyError) as exc:
                    log.error(
                        "event=dkim_key_unusable domain=%s selector=%s error=%r",
                        name,
                        k.selector,
                        str(exc),
                    )
        return out

    async def reload_keys(self) -> None:
        self.signing_keys = await self.load_signing_keys()
        for fn in self.on_keys:
            fn(self.signing_keys)

    # ------------------------------------------------------------------ the MTA's questions

    async def smtp_login(self, login: str, password: str) -> int | None:
        """SMTP AUTH with an API key: the tenant's id when ``login`` is the key's tenant
        name and the key has the ``send`` scope."""
        principal = await self.auth.authenticate(password)
        if (
            principal is None
            or principal.tenant_id is None
            or principal.tenant_name != login
            or not principal.has("send")
        ):
            return None
        return principal.tenant_id

    def may_send_as(self, tenant_id: int, domain: str | None) -> bool:
        """Whether a tenant may send mail From ``domain`` (one of its verified domains,
        unless ``control.require_verified_domains`` is off)."""
        if domain is None:
            return False
        if not self.cfg.control.require_verified_domains:
            return True
        return domain in self.verified.get(tenant_id, ())

    def suppressed(self, tenant: str, address: str) -> str | None:
        """The one suppression check, for spool tenants (ids as text)."""
        try:
            tid = int(tenant)
        except ValueError:
            return None
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
        if "suppression" in kinds:
            await self.suppressions.refresh((r[2], r[3]) for r in rows if r[1] == "suppression")
        if "domain" in kinds:
            await self.reload_keys()
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
        n = 0
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.cfg.control.cache_poll)
            self._wake.clear()
            try:
                await self.poll_once()
                n += 1
                if n % 3600 == 0:
                    await self.prune()
            except Exception:
                log.warning("event=change_feed_failed", exc_info=True)
