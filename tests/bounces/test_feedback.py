"""What failures and complaints do to suppressions, on a real database (SQLite)."""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from postwarden.bounces import feedback
from postwarden.config import BouncesConfig
from postwarden.store.db import create_engine, sessionmaker, upgrade
from postwarden.store.models import Change, Event, Suppression, Tenant

NOW = dt.datetime(2026, 11, 25, 12, 0, tzinfo=dt.UTC)
CFG = BouncesConfig(soft_bounce_limit=3, soft_bounce_window=86400.0, soft_bounce_ttl=7 * 86400.0)


@pytest.fixture
async def sessions(tmp_path: Path) -> AsyncIterator[Any]:
    url = f"sqlite+aiosqlite:///{tmp_path / 'c.db'}"
    await upgrade(url)
    engine = create_engine(url)
    make = sessionmaker(engine)
    async with make() as s:
        s.add_all([Tenant(id=1, name="a"), Tenant(id=2, name="b")])
        await s.commit()
    yield make
    await engine.dispose()


async def fail(
    s: Any, address: str, category: str, hard: bool, at: dt.datetime, tenant: int = 1
) -> feedback.Outcome:
    s.add(
        Event(tenant_id=tenant, ts=at, type="bounced", message_id="m", recipient=address,
              detail={"category": category, "hard": hard})
    )  # fmt: skip
    return await feedback.apply(
        s, CFG, tenant_id=tenant, address=address, kind="failure", hard=hard,
        category=category, note="552 5.2.2 full", now=at,
    )  # fmt: skip


async def suppressions(sessions: Any) -> dict[tuple[int, str], tuple[str, dt.datetime | None]]:
    async with sessions() as s:
        rows = (await s.execute(select(Suppression))).scalars()
        return {
            (r.tenant_id, r.address): (
                r.reason,
                r.expires_at.replace(tzinfo=dt.UTC) if r.expires_at else None,
            )
            for r in rows
        }


async def test_hard_bounce_suppresses_at_once(sessions: Any) -> None:
    async with sessions() as s:
        out = await fail(s, "Gone@Example.com", "user_unknown", True, NOW)
        await s.commit()
    assert out.suppressed == "hard_bounce"
    assert await suppressions(sessions) == {(1, "gone@example.com"): ("hard_bounce", None)}
    async with sessions() as s:  # the change feed tells the other processes
        kinds = [(c.kind, c.tenant_id, c.ref) for c in (await s.execute(select(Change))).scalars()]
    assert ("suppression", 1, "gone@example.com") in kinds


async def test_soft_bounces_suppress_for_a_while_after_the_limit(sessions: Any) -> None:
    async with sessions() as s:
        # Two within the window, one long before it: not yet.
        await fail(s, "full@example.com", "mailbox_full", False, NOW - dt.timedelta(days=3))
        await fail(s, "full@example.com", "mailbox_full", False, NOW - dt.timedelta(hours=5))
        out = await fail(s, "full@example.com", "mailbox_full", False, NOW - dt.timedelta(hours=1))
        await s.commit()
    assert out == feedback.Outcome(None, 2)
    assert await suppressions(sessions) == {}
    async with sessions() as s:
        out = await fail(s, "full@example.com", "expired", False, NOW)
        await s.commit()
    assert out == feedback.Outcome("soft_bounce", 3)
    got = await suppressions(sessions)
    assert got == {(1, "full@example.com"): ("soft_bounce", NOW + dt.timedelta(days=7))}
    # A hard bounce later replaces the expiring entry with a lasting one.
    async with sessions() as s:
        await fail(s, "full@example.com", "user_unknown", True, NOW + dt.timedelta(hours=1))
        await s.commit()
    assert (await suppressions(sessions))[(1, "full@example.com")] == ("hard_bounce", None)


async def test_an_unconfirmed_user_unknown_counts_as_soft(sessions: Any) -> None:
    # A relayed "550 User unknown" with no code and no stage is soft but about the
    # address: enough of them suppress it for a while.
    async with sessions() as s:
        for i in range(3):
            at = NOW + dt.timedelta(hours=i)
            out = await fail(s, "maybe@example.com", "user_unknown", False, at)
        await s.commit()
    assert out == feedback.Outcome("soft_bounce", 3)
    assert (await suppressions(sessions))[(1, "maybe@example.com")][0] == "soft_bounce"


async def test_failures_that_judge_the_sender_never_count(sessions: Any) -> None:
    async with sessions() as s:
        for i in range(5):
            for cat in ("policy_blocked", "spam_content", "authentication_failed", "rate_limited"):
                out = await fail(s, "good@example.com", cat, False, NOW + dt.timedelta(minutes=i))
                assert out.suppressed is None and out.soft_count == 0
        await s.commit()
    assert await suppressions(sessions) == {}


async def test_tenants_are_apart_and_other_reasons_stay(sessions: Any) -> None:
    async with sessions() as s:
        s.add(Suppression(tenant_id=1, address="u@example.com", reason="unsubscribe"))
        await s.commit()
    async with sessions() as s:
        out = await fail(s, "u@example.com", "user_unknown", True, NOW)  # tenant 1: kept
        assert out.suppressed is None
        await fail(s, "u@example.com", "user_unknown", True, NOW, tenant=2)
        out = await feedback.apply(
            s, CFG, tenant_id=2, address="c@example.com", kind="complaint", hard=None,
            category=None, now=NOW,
        )  # fmt: skip
        assert out.suppressed == "complaint"
        await s.commit()
    got = await suppressions(sessions)
    assert got == {
        (1, "u@example.com"): ("unsubscribe", None),
        (2, "u@example.com"): ("hard_bounce", None),
        (2, "c@example.com"): ("complaint", None),
    }
