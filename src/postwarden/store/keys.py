"""Revoking API keys: one rule for the API and the ``postwarden admin`` command.

A revocation is a change-feed row (``api_key``) in the same transaction, so every
process drops the key from its caches (and SMTP sessions that logged in with it stop)
within ``control.cache_poll``; the process that answers an API call waits for it.

The last operator key that is not revoked cannot be revoked: nothing could then
manage tenants through the API (only ``postwarden admin create-key`` on the host
could make another). An operator revokes a key in use by making its successor first.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import func, select

from postwarden.store.feed import record_change
from postwarden.store.models import ApiKey


class LastOperatorKey(Exception):
    """The key is the last operator key that is not revoked."""


async def revoke(session: Any, key: ApiKey) -> bool:
    """Mark ``key`` revoked (now) and record the change; False when it already was
    (its ``revoked_at`` is kept)."""
    if key.revoked_at is not None:
        return False
    key.revoked_at = dt.datetime.now(dt.UTC)
    await record_change(session, "api_key", key.tenant_id, key.prefix)
    return True


async def revoke_operator_key(session: Any, key_id: int) -> ApiKey | None:
    """Revoke the operator key ``key_id`` in ``session``'s transaction (the caller
    commits). None when there is no operator key of that id (a tenant's key is not
    one); :class:`LastOperatorKey` when it is the last one not revoked (the caller
    must then not commit).

    Two revocations at once must not each leave the other's key as the last and
    together revoke both: PostgreSQL locks the operator keys not revoked before they
    are counted; SQLite takes its one write lock at the revocation's write, so they
    are counted again under it."""
    active = set(
        (
            await session.execute(
                select(ApiKey.id)
                .where(ApiKey.tenant_id.is_(None), ApiKey.revoked_at.is_(None))
                .with_for_update()
            )
        ).scalars()
    )
    key: ApiKey | None = (
        await session.execute(select(ApiKey).where(ApiKey.id == key_id, ApiKey.tenant_id.is_(None)))
    ).scalar_one_or_none()
    if key is None or key.revoked_at is not None:
        return key
    refusal = LastOperatorKey(
        f"key {key.id} ({key.prefix}) is the last operator key not revoked: make another"
        " first (POST /v1/operator-keys or `postwarden admin create-key`)"
    )
    if active <= {key.id}:
        raise refusal
    await revoke(session, key)
    await session.flush()
    left = (
        await session.execute(
            select(func.count())
            .select_from(ApiKey)
            .where(ApiKey.tenant_id.is_(None), ApiKey.revoked_at.is_(None))
        )
    ).scalar_one()
    if not left:
        raise refusal
    return key
