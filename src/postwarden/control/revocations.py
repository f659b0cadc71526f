"""What SMTP sessions that logged in with a key check at every MAIL, kept from the
change feed: keys revoked or deleted, and tenants disabled or deleted, since this
process started (a key revoked before could not have logged in)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from postwarden.store.models import ApiKey, Tenant


class Revocations:
    def __init__(self, sessions: Any) -> None:
        self.sessions = sessions
        self.revoked_keys: set[str] = set()  # key prefixes
        self.disabled_tenants: set[int] = set()

    def key_valid(self, prefix: str, tenant_id: int) -> bool:
        """Whether a key that logged in may still send: not revoked, its tenant not
        disabled since (two set lookups: asked at every MAIL)."""
        return prefix not in self.revoked_keys and tenant_id not in self.disabled_tenants

    async def reload(self, rows: list[Any]) -> None:
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
