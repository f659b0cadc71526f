"""What a failure or a complaint does to a tenant's suppressions (docs/bounces.md).

* A hard failure (the address cannot receive mail) suppresses the address at once
  (``hard_bounce``).
* A soft failure that says something about the address (a full or disabled mailbox,
  mail that expired, a "user unknown" that a bounce relayed without a code or the
  command it answered: ``filtered``) counts; ``bounces.soft_bounce_limit`` of them within
  ``bounces.soft_bounce_window`` suppress it for ``bounces.soft_bounce_ttl``
  (``soft_bounce``). Failures that judge the *sender* (policy, reputation, content,
  authentication, rate, size, relaying) never count: suppressing their addresses would
  throw good addresses away.
* A complaint suppresses at once (``complaint``).

The suppression is written in the caller's transaction, with the change-feed row that
makes every process's cache load it; an address already suppressed for another reason
(an unsubscribe, an operator's entry) keeps that entry, except that a hard bounce or a
complaint replaces a soft bounce's expiring one.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select

from postwarden.config import BouncesConfig
from postwarden.store.models import Event, Suppression
from postwarden.store.suppress import upsert_suppression

#: Soft failures that say something about the address itself.
SOFT_ADDRESS = frozenset(
    {
        "user_unknown",  # when not hard: temporary (docs/bounces.md)
        "filtered",  # an unconfirmed "user unknown": perhaps a filter's, perhaps not
        "null_mx",
        "mailbox_full",
        "mailbox_disabled",
        "expired",
        "domain_not_found",
        "no_mx",
        "network",
        "timeout",
    }
)
#: Suppression reasons a stronger one replaces.
_REPLACEABLE = frozenset({"soft_bounce"})


@dataclass(frozen=True)
class Outcome:
    """What :func:`apply` did: the suppression reason written, if any."""

    suppressed: str | None = None
    soft_count: int = 0


def counts_as_soft(category: str | None) -> bool:
    return category in SOFT_ADDRESS


async def _suppress(
    s: Any,
    tenant_id: int,
    address: str,
    reason: str,
    note: str,
    expires_at: dt.datetime | None,
    now: dt.datetime,
) -> bool:
    """Whether the entry was written: a live one of another reason stays (but a soft
    bounce's gives way to a hard bounce or a complaint)."""

    def keep(row: Suppression) -> bool:
        expires = row.expires_at
        if expires is not None and expires.tzinfo is None:
            expires = expires.replace(tzinfo=dt.UTC)
        live = expires is None or expires > now
        return live and not (row.reason in _REPLACEABLE and reason != "soft_bounce")

    _row, how = await upsert_suppression(
        s, tenant_id, address, reason, "bounces", note[:2000], expires_at, keep=keep
    )
    return how != "kept"


async def apply(
    s: Any,
    cfg: BouncesConfig,
    *,
    tenant_id: int,
    address: str,
    kind: str,  # "failure" | "complaint"
    hard: bool | None,
    category: str | None,
    note: str = "",
    now: dt.datetime | None = None,
) -> Outcome:
    """Feed one failure or complaint of ``address`` into the tenant's suppressions.

    For a soft failure the count includes this one when its event is already in the
    session (the caller adds the event first)."""
    now = now or dt.datetime.now(dt.UTC)
    if kind == "complaint":
        done = await _suppress(s, tenant_id, address, "complaint", note, None, now)
        return Outcome("complaint" if done else None)
    if hard:
        done = await _suppress(s, tenant_id, address, "hard_bounce", note, None, now)
        return Outcome("hard_bounce" if done else None)
    if not counts_as_soft(category):
        return Outcome()
    since = now - dt.timedelta(seconds=cfg.soft_bounce_window)
    await s.flush()
    rows = (
        await s.execute(
            select(Event.detail).where(
                Event.tenant_id == tenant_id,
                Event.recipient == address,
                Event.type.in_(("bounced", "expired")),
                Event.ts >= since,
            )
        )
    ).scalars()
    count = sum(
        1 for d in rows if not (d or {}).get("hard") and counts_as_soft((d or {}).get("category"))
    )
    if count >= cfg.soft_bounce_limit:
        expires = now + dt.timedelta(seconds=cfg.soft_bounce_ttl)
        note = f"{count} soft bounces within {int(cfg.soft_bounce_window)} s; last: {note}"
        done = await _suppress(s, tenant_id, address, "soft_bounce", note, expires, now)
        return Outcome("soft_bounce" if done else None, count)
    return Outcome(None, count)


@dataclass(frozen=True)
class Suppressed:
    """A suppression written for a delivery failure (:func:`apply_failures`)."""

    tenant_id: int
    address: str
    reason: str
    message_id: str
    category: str | None


async def apply_failures(
    s: Any, cfg: BouncesConfig, events: list[dict[str, Any]]
) -> list[Suppressed]:
    """The delivery failures among ``events`` (rows of ``events`` being written in this
    session: ``bounced`` or ``expired`` with a recipient) into their tenants'
    suppressions, through :func:`apply`; the suppressions written."""
    done: list[Suppressed] = []
    for e in events:
        if e["type"] not in ("bounced", "expired") or not e["recipient"]:
            continue
        d = e["detail"]
        category = d.get("category") or ("expired" if e["type"] == "expired" else None)
        out = await apply(
            s,
            cfg,
            tenant_id=e["tenant_id"],
            address=e["recipient"],
            kind="failure",
            hard=bool(d.get("hard")),
            category=category,
            note=str(d.get("response") or d.get("reason") or "")[:500],
            now=e["ts"],
        )
        if out.suppressed:
            done.append(
                Suppressed(
                    e["tenant_id"], e["recipient"], out.suppressed, e["message_id"], category
                )
            )
    return done
