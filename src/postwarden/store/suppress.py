"""The one suppression check, used by every sending path.

Each process keeps every tenant's suppressions in memory (a dict per tenant) and keeps
it current from the change feed, so the check is a lookup and never a database round
trip on the MTA's hot path (docs/decisions/0005).
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable, Iterable
from typing import Any, Literal

from sqlalchemy import select, tuple_

from postwarden.engagement.tombstones import is_tombstone
from postwarden.mail.addresses import suppression_key
from postwarden.store.feed import lock_feed, record_change
from postwarden.store.models import Suppression

Upserted = Literal["created", "replaced", "kept"]


async def upsert_suppression(
    s: Any,
    tenant_id: int,
    address: str,
    reason: str,
    source: str,
    note: str,
    expires_at: dt.datetime | None,
    *,
    keep: Callable[[Suppression], bool] | None = None,
    follow: bool = True,
) -> tuple[Suppression, Upserted]:
    """Add or replace one suppression, with the change-feed row that makes every
    process's cache load it, and the status of the address's contact to match
    (``store.contacts.follow_suppression``); the caller commits. An existing entry
    for which ``keep`` is true stays as it is (``"kept"``). ``follow=False``: the
    caller moves the contacts' statuses itself, many at once (``follow_suppression``)."""
    key = suppression_key(address)
    # The feed lock before the row: every writer takes feed, suppression, contact in
    # that order (the row's write is flushed by the next statement, before the lock).
    await lock_feed(s)
    row = await _entry(s, tenant_id, key)
    if row is not None and keep is not None and keep(row):
        return row, "kept"
    how: Upserted = "created" if row is None else "replaced"
    if row is None:
        row = Suppression(tenant_id=tenant_id, address=key)
        s.add(row)
    row.reason, row.source, row.note, row.expires_at = reason, source, note, expires_at
    row.created_at = dt.datetime.now(dt.UTC)
    await record_change(s, "suppression", tenant_id, key)
    if follow:
        await _contacts().follow_suppression(s, tenant_id, [key], reason)
    return row, how


async def remove_suppression(s: Any, tenant_id: int, address: str) -> Suppression | None:
    """Remove one suppression (None when there is none), with its change-feed row;
    the contact of the address becomes active again. The caller commits."""
    key = suppression_key(address)
    await lock_feed(s)
    row = await _entry(s, tenant_id, key)
    if row is None:
        return None
    await s.delete(row)
    await record_change(s, "suppression", tenant_id, key)
    await _contacts().follow_suppression(s, tenant_id, [key], None)
    return row


async def _entry(s: Any, tenant_id: int, key: str) -> Suppression | None:
    found: Suppression | None = (
        await s.execute(
            select(Suppression).where(
                Suppression.tenant_id == tenant_id, Suppression.address == key
            )
        )
    ).scalar_one_or_none()
    return found


def _contacts() -> Any:
    # store.contacts writes suppressions through this module (a contact's status):
    # imported when called, not at import time, to keep the two modules' import order free.
    from postwarden.store import contacts

    return contacts


class SuppressionCache:
    def __init__(self, sessions: Callable[[], Any]) -> None:
        self._sessions = sessions
        self._by_tenant: dict[int, dict[str, tuple[str, float | None]]] = {}
        # Tenants with tombstones of erased addresses (``h1:…``), and how to make an
        # address's (control.tenant_keys): only those tenants' checks pay a hash.
        self._tombstoned: set[int] = set()
        self.tombstone_of: Callable[[int, str], str | None] | None = None

    def __len__(self) -> int:
        return sum(len(d) for d in self._by_tenant.values())

    def check(self, tenant_id: int | None, address: str, now: float | None = None) -> str | None:
        """The reason ``address`` is suppressed for the tenant, or None to send."""
        if tenant_id is None:
            return None
        entries = self._by_tenant.get(tenant_id)
        if not entries:
            return None
        key = suppression_key(address)
        hit = entries.get(key)
        if hit is None and tenant_id in self._tombstoned and self.tombstone_of is not None:
            tomb = self.tombstone_of(tenant_id, key)
            hit = entries.get(tomb) if tomb is not None else None
        if hit is None:
            return None
        reason, expires = hit
        if expires is not None and expires <= (time.time() if now is None else now):
            return None
        return reason

    def _put(self, row: Any) -> None:
        exp = row.expires_at.timestamp() if row.expires_at is not None else None
        self._by_tenant.setdefault(row.tenant_id, {})[row.address] = (row.reason, exp)
        if is_tombstone(row.address):
            self._tombstoned.add(row.tenant_id)

    async def load(self) -> None:
        fresh: dict[int, dict[str, tuple[str, float | None]]] = {}
        self._by_tenant = fresh
        self._tombstoned = set()
        async with self._sessions() as s:
            result = await s.stream(
                select(
                    Suppression.tenant_id,
                    Suppression.address,
                    Suppression.reason,
                    Suppression.expires_at,
                ).execution_options(yield_per=5000)
            )
            async for row in result:
                self._put(row)

    async def refresh(self, changes: Iterable[tuple[int, str]]) -> None:
        """Re-read the given (tenant, address) entries: added, replaced or removed."""
        pairs = list(dict.fromkeys((t, a) for t, a in changes if t is not None))
        for i in range(0, len(pairs), 500):
            chunk = pairs[i : i + 500]
            async with self._sessions() as s:
                rows = (
                    await s.execute(
                        select(
                            Suppression.tenant_id,
                            Suppression.address,
                            Suppression.reason,
                            Suppression.expires_at,
                        ).where(tuple_(Suppression.tenant_id, Suppression.address).in_(chunk))
                    )
                ).all()
            for t, a in chunk:
                self._by_tenant.get(t, {}).pop(a, None)
            for row in rows:
                self._put(row)
