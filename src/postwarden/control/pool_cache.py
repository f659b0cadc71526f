"""Pools and who may use them: the configuration's pools and those made through the
API (the configuration's win a name), each tenant's default and allowed pools, and —
read with them from the tenants' rows — the tenants that want DSNs for their failed
mail. Reloaded when the change feed names a pool or a tenant."""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import select

from postwarden.config import Config, PoolConfig, PoolMember, SourceConfig
from postwarden.store.models import Pool, Tenant

log = logging.getLogger("postwarden.control")


class PoolNotAllowed(ValueError):
    """The pool a message names does not exist or is not the sender's to use; the
    message is one line, fit for an SMTP reply or an API error."""


def pool_from_row(row: Pool) -> PoolConfig:
    return PoolConfig(
        row.name,
        [PoolMember(str(m["source"]), int(m["weight"])) for m in row.members],
        "spill" if row.overflow == "spill" else "wait",
    )


class PoolCache:
    def __init__(self, sessions: Any, cfg: Config) -> None:
        self.sessions = sessions
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
        self.notify_tenants: set[int] = set()  # tenants with settings.bounce_notifications
        self.truncate_ip_tenants: set[int] = set()  # tenants with settings.truncate_ip
        self.configure(cfg)

    def configure(self, cfg: Config) -> None:
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

    async def reload(self) -> None:
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
        # Tenants that keep tracking hits' IP addresses truncated (control.tracking).
        self.truncate_ip_tenants = {
            tid for tid, *_pools, settings in tenants if (settings or {}).get("truncate_ip")
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

    def members(self, name: str) -> PoolConfig | None:
        """A pool by name (its weighted sources and overflow), or None."""
        return self.pools.get(name)
