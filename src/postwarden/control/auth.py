"""API keys as bearer tokens (and as SMTP passwords): lookup, scopes, rate limits."""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from postwarden.store.availability import LogLimiter, is_unavailable
from postwarden.store.models import ApiKey, Tenant
from postwarden.store.secrets import hash_key, key_matches, key_prefix

log = logging.getLogger("postwarden.control.auth")
_limited = LogLimiter(log)

TENANT_SCOPES = ("send", "read", "manage", "approve")
ALL_SCOPES = (*TENANT_SCOPES, "admin")
# A scope that includes others: managing a tenant's resources includes reading them.
IMPLIES = {"manage": {"read"}}


@dataclass(frozen=True)
class Principal:
    key_id: int
    prefix: str
    tenant_id: int | None  # None: an operator (admin) key
    tenant_name: str | None
    scopes: frozenset[str]

    def has(self, scope: str) -> bool:
        return scope in self.scopes or any(scope in IMPLIES.get(s, ()) for s in self.scopes)


@dataclass(frozen=True)
class TenantDisabled:
    """A real, unrevoked key whose tenant is disabled: it may not act (403, not 401)."""

    key_id: int
    tenant_name: str


Found = Principal | TenantDisabled | None


class KeyAuthenticator:
    """Finds the key behind a token; answers are cached briefly (and dropped on any
    change of keys or tenants: :meth:`invalidate`), last use is written at most once a
    minute per key."""

    def __init__(
        self, sessions: Callable[[], AsyncSession], *, ttl: float = 30.0, touch_every: float = 60.0
    ) -> None:
        self._sessions = sessions
        self._ttl = ttl
        self._touch_every = touch_every
        self._cache: dict[str, tuple[Found, float]] = {}
        self._touched: dict[int, float] = {}

    def invalidate(self) -> None:
        self._cache.clear()

    async def authenticate(self, token: str) -> Principal | None:
        """The key's principal, or None: unknown, revoked, or of a disabled tenant."""
        found = await self.resolve(token)
        return found if isinstance(found, Principal) else None

    async def resolve(self, token: str) -> Found:
        """As :meth:`authenticate`, but a key of a disabled tenant comes back as
        :class:`TenantDisabled`, so that the API can say so."""
        prefix = key_prefix(token)
        if prefix is None:
            return None
        digest = hash_key(token)
        now = time.monotonic()
        hit = self._cache.get(digest)
        if hit is not None and hit[1] > now:
            found = hit[0]
        else:
            try:
                found = await self._lookup(prefix, token)
            except Exception as exc:
                # The database is down: a key seen before keeps its last answer (its
                # revocation, if any, is read from the change feed when it is back).
                if hit is None or not is_unavailable(exc):
                    raise
                return hit[0]
            if len(self._cache) > 10_000:
                self._cache.clear()
            self._cache[digest] = (found, now + self._ttl)
        if isinstance(found, Principal) and now - self._touched.get(found.key_id, -1e9) > (
            self._touch_every
        ):
            self._touched[found.key_id] = now
            await self._touch(found.key_id)
        return found

    async def _lookup(self, prefix: str, token: str) -> Found:
        async with self._sessions() as s:
            row = (
                await s.execute(
                    select(ApiKey, Tenant)
                    .outerjoin(Tenant, Tenant.id == ApiKey.tenant_id)
                    .where(ApiKey.prefix == prefix)
                )
            ).first()
        if row is None:
            return None
        key, tenant = row
        if key.revoked_at is not None or not key_matches(token, key.secret_hash):
            return None
        if key.tenant_id is not None and tenant is None:
            return None
        if tenant is not None and tenant.disabled:
            return TenantDisabled(key.id, tenant.name)
        return Principal(
            key.id,
            key.prefix,
            key.tenant_id,
            tenant.name if tenant else None,
            frozenset(key.scopes.split()),
        )

    async def _touch(self, key_id: int) -> None:
        try:
            async with self._sessions() as s:
                await s.execute(
                    update(ApiKey)
                    .where(ApiKey.id == key_id)
                    .values(last_used_at=dt.datetime.now(dt.UTC))
                )
                await s.commit()
        except Exception as exc:  # a busy database must not fail the request
            _limited(logging.WARNING, "key_touch", "event=key_touch_failed key=%s", key_id, exc=exc)


class RateLimiter:
    """A token bucket per key: ``rate`` requests a second, bursts of ``burst``.

    ``clock`` gives the time in seconds (monotonic); tests pass one they advance."""

    def __init__(
        self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rate = rate
        self.burst = burst
        self.clock = clock
        self._buckets: dict[Any, tuple[float, float]] = {}

    def take(self, key: Any) -> float:
        """0 when the request may go; else the seconds until it could."""
        now = self.clock()
        tokens, last = self._buckets.get(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - last) * self.rate)
        if tokens >= 1.0:
            self._buckets[key] = (tokens - 1.0, now)
            return 0.0
        self._buckets[key] = (tokens, now)
        return (1.0 - tokens) / self.rate
