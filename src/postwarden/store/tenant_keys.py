"""The tenants' engagement keys in the control database (``tenant_keys``;
docs/decisions/0011): made on first use, rotated with overlap, retired explicitly.

Every write records a ``tenant_key`` change, so that each process's cache
(``control.tenant_keys``) reads the keys again.
"""

from __future__ import annotations

import datetime as dt
import secrets
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from postwarden.store.engagement_models import LINKS, TOMBSTONE, TenantKey
from postwarden.store.feed import record_change

#: A key's secret: 32 random bytes (sealed under the control encryption key).
SECRET_BYTES = 32
CHANGE_KIND = "tenant_key"


class TenantKeyError(LookupError):
    """No such key of the tenant, or it may not be retired."""


async def _add(session: Any, box: Any, tenant_id: int, purpose: str) -> TenantKey:
    newest = await session.scalar(
        select(func.max(TenantKey.generation)).where(
            TenantKey.tenant_id == tenant_id, TenantKey.purpose == purpose
        )
    )
    row = TenantKey(
        tenant_id=tenant_id,
        purpose=purpose,
        generation=(newest or 0) + 1,
        kid=secrets.token_hex(4),
        secret=box.seal(secrets.token_bytes(SECRET_BYTES)),
    )
    session.add(row)
    await record_change(session, CHANGE_KIND, tenant_id, row.kid)
    return row


async def ensure(sessions: Any, box: Any, tenant_id: int) -> bool:
    """Give the tenant a links key and a tombstone key if it has none; whether one was
    made. Two processes making the first key at once: one insert wins (the unique
    generation), the other reads it (so does a kid drawn twice, one in 2**32)."""
    for _ in range(3):
        async with sessions() as s:
            have = set(
                (
                    await s.execute(
                        select(TenantKey.purpose).where(
                            TenantKey.tenant_id == tenant_id, TenantKey.retired_at.is_(None)
                        )
                    )
                ).scalars()
            )
            missing = [p for p in (LINKS, TOMBSTONE) if p not in have]
            if not missing:
                return False
            for purpose in missing:
                await _add(s, box, tenant_id, purpose)
            try:
                await s.commit()
                return True
            except IntegrityError:
                await s.rollback()
    raise RuntimeError(f"tenant {tenant_id}: could not make its engagement keys")


async def rotate(session: Any, box: Any, tenant_id: int) -> TenantKey:
    """A new generation of the tenant's links key (the caller commits): it signs new
    links from the next read of the keys on; the older ones still read."""
    return await _add(session, box, tenant_id, LINKS)


async def retire(session: Any, tenant_id: int, kid: str) -> TenantKey:
    """Retire a links key of the tenant that is not its newest (the caller commits):
    links signed with it answer 404 from then on."""
    row = await session.scalar(
        select(TenantKey).where(
            TenantKey.tenant_id == tenant_id, TenantKey.purpose == LINKS, TenantKey.kid == kid
        )
    )
    if row is None:
        raise TenantKeyError("no such key")
    newest = await session.scalar(
        select(func.max(TenantKey.generation)).where(
            TenantKey.tenant_id == tenant_id,
            TenantKey.purpose == LINKS,
            TenantKey.retired_at.is_(None),
        )
    )
    if row.generation == newest:
        raise TenantKeyError("the newest key signs new links: rotate first, then retire this one")
    if row.retired_at is None:
        row.retired_at = dt.datetime.now(dt.UTC)
        await record_change(session, CHANGE_KIND, tenant_id, kid)
    return row


async def links_keys(session: Any, tenant_id: int) -> list[TenantKey]:
    """The tenant's links keys, newest first (retired ones too)."""
    return list(
        (
            await session.execute(
                select(TenantKey)
                .where(TenantKey.tenant_id == tenant_id, TenantKey.purpose == LINKS)
                .order_by(TenantKey.generation.desc())
            )
        ).scalars()
    )


async def live_keys(session: Any) -> list[TenantKey]:
    """Every key not retired, of every tenant (what each process caches)."""
    return list(
        (await session.execute(select(TenantKey).where(TenantKey.retired_at.is_(None)))).scalars()
    )
