"""``Idempotency-Key`` for the sending routes: the same key and body give the same
answer for ``control.idempotency_ttl``, the same key with another body a 409, and a
retry after any failure finds in the spool what was accepted (docs/api.md)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import hashlib
import logging
import re
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel
from sqlalchemy.exc import IntegrityError

from postwarden.control.errors import ApiError, invalid
from postwarden.control.routing import Call
from postwarden.queue.shards import find_idempotent
from postwarden.store.availability import LogLimiter, is_unavailable
from postwarden.store.models import IdempotencyKey
from postwarden.values import Envelope

log = logging.getLogger("postwarden.control.messages")
_limited = LogLimiter(log)

#: The answer for a message found in the spool: (message id, its recipients as
#: accepted: address, recipient id, drop reason) -> the response model.
Answer = Callable[[str, list[Any]], Any]

#: A retried request is carried out once per process at a time (the database row
#: guards across processes; while the database is down, this lock alone does).
_KEY_LOCKS: dict[tuple[int, str], tuple[asyncio.Lock, int]] = {}  # lock, requests using it

#: What a retry finds in the spool: part (a batch's index) -> the answer then.
Found = dict[int, Any]


def keyed(c: Call, env: Envelope, part: int) -> Envelope:
    """The envelope with the request's Idempotency-Key, for the spool to keep."""
    if c.idempotency is None:
        return env
    key, digest = c.idempotency
    return dataclasses.replace(env, idempotency=(key, digest, part))


async def idempotent(c: Call, run: Any, answer: Answer) -> Any:
    """``Idempotency-Key``: the same key and body give the same answer for
    ``control.idempotency_ttl``; the same key with another body is a 409.

    The spool keeps each message's key in the transaction that accepts it, so a
    retry after any failure (the database down before, during or after, a crash, a
    lost answer) finds what was accepted and answers as the first time: ``run`` is
    called with what the spool holds (part -> answer, made by ``answer`` from a
    message id and its recipients as accepted) and sends only the rest."""
    key = c.request.headers.get("idempotency-key")
    if key is None:
        return await run({})
    if not re.fullmatch(r"[\x21-\x7e]{1,200}", key):
        raise invalid("Idempotency-Key", "1 to 200 printable ASCII characters")
    digest = hashlib.sha256(c.request.url.path.encode() + b"\0" + c.raw).hexdigest()
    c.idempotency = (key, digest)
    lock_key = (c.tenant_id, key)
    # Forgotten when the last request using it is done (not when it is merely
    # released: a waiter woken for it has not taken it yet).
    lock, users = _KEY_LOCKS.get(lock_key) or (asyncio.Lock(), 0)
    _KEY_LOCKS[lock_key] = (lock, users + 1)
    try:
        async with lock:
            return await _idempotent(c, key, digest, run, answer)
    finally:
        lock, users = _KEY_LOCKS[lock_key]
        if users > 1:
            _KEY_LOCKS[lock_key] = (lock, users - 1)
        else:
            del _KEY_LOCKS[lock_key]


async def _idempotent(c: Call, key: str, digest: str, run: Any, answer: Answer) -> Any:
    ttl = dt.timedelta(seconds=c.ctx.cfg.control.idempotency_ttl)
    now = dt.datetime.now(dt.UTC)
    row: IdempotencyKey | None = None
    ours = False  # this request holds the key's row (in progress)
    try:
        async with c.ctx.sessions() as s:
            row = await s.get(IdempotencyKey, (c.tenant_id, key))
            # An answer past its time, or a request that never finished (its process
            # died mid-way; nothing takes this long), no longer holds the key.
            if row is not None and (
                row.created_at < now - ttl
                or (row.status_code == 0 and row.created_at < now - STALE_IN_PROGRESS)
            ):
                await s.delete(row)
                await s.flush()
                row = None
            if row is None:
                s.add(
                    IdempotencyKey(
                        tenant_id=c.tenant_id,
                        key=key,
                        request_hash=digest,
                        status_code=0,
                        response={},
                        created_at=now,
                    )
                )
                try:
                    await s.commit()
                    ours = True
                except IntegrityError:
                    await s.rollback()
                    row = await s.get(IdempotencyKey, (c.tenant_id, key))
    except Exception as exc:
        if not is_unavailable(exc):
            raise
        # The database is down: the spool alone says what was accepted.
        c.ctx.db.down(exc)
        row = None
    if row is not None:
        if row.request_hash != digest:
            raise ApiError(
                409,
                "idempotency_conflict",
                "this Idempotency-Key was used with another request body",
            )
        if row.status_code != 0:
            return row.status_code, row.response
    found = await _in_spool(c, key, digest, answer)
    if row is not None and not found:  # another request with this key, under way
        raise ApiError(
            409,
            "idempotency_in_progress",
            "a request with this Idempotency-Key is still being processed",
            headers={"Retry-After": "1"},
        )
    try:
        status, body = await run(found)
    except ApiError as exc:
        if exc.status >= 500:
            if ours:  # let a retry try again
                with contextlib.suppress(Exception):
                    async with c.ctx.sessions() as s:
                        gone = await s.get(IdempotencyKey, (c.tenant_id, key))
                        if gone is not None:
                            await s.delete(gone)
                            await s.commit()
            raise
        status, body = exc.status, exc.body(c.request_id)
    payload = body.model_dump(mode="json") if isinstance(body, BaseModel) else body
    try:
        async with c.ctx.sessions() as s:
            done = await s.get(IdempotencyKey, (c.tenant_id, key))
            if done is None:
                s.add(
                    IdempotencyKey(
                        tenant_id=c.tenant_id,
                        key=key,
                        request_hash=digest,
                        status_code=status,
                        response=payload,
                        created_at=now,
                    )
                )
            else:
                done.status_code, done.response = status, payload
            await s.commit()
    except Exception as exc:
        # The answer stands (the mail is in the spool): a retry finds it there.
        _limited(logging.WARNING, "idempotency_record", "event=idempotency_record_failed",
                 exc=exc)  # fmt: skip
    return status, payload


async def _in_spool(c: Call, key: str, digest: str, answer: Answer) -> Found:
    """What the spool accepted under ``key`` for this tenant (part -> answer); a 409
    when it was accepted for another body."""
    root = c.ctx.spool_root
    if root is None:
        return {}
    rows = await asyncio.to_thread(find_idempotent, root, str(c.tenant_id), key)
    if any(h != digest for _part, h, _m, _a in rows):
        raise ApiError(
            409,
            "idempotency_conflict",
            "this Idempotency-Key was used with another request body",
        )
    return {part: answer(msg_id, [tuple(r) for r in rcpts]) for part, _h, msg_id, rcpts in rows}


STALE_IN_PROGRESS = dt.timedelta(minutes=2)
IDEMPOTENCY = {
    "Idempotency-Key": "makes a retried request safe: same key and body, same answer (24 h)"
}
