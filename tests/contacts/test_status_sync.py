"""A contact's status follows the suppressions that bounces and complaints write
(bounces.feedback, on SQLite and PostgreSQL), and statuses set on contacts at the same
time as bounces come in neither deadlock nor leave the two out of step."""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import Any

from sqlalchemy import select

from postwarden.bounces import feedback
from postwarden.config import BouncesConfig
from postwarden.store.contact_models import Contact
from postwarden.store.contacts import ContactIn, save_contacts, update_contact
from postwarden.store.models import Suppression
from postwarden.store.suppress import remove_suppression
from tests.contacts.conftest import tenant_id

CFG = BouncesConfig(soft_bounce_limit=3, soft_bounce_window=86400.0, soft_bounce_ttl=86400.0)


async def tenant_ids(sessions: Any) -> tuple[int, int]:
    return await tenant_id(sessions, "acme"), await tenant_id(sessions, "other")


async def statuses(sessions: Any, tid: int) -> dict[str, str]:
    async with sessions() as s:
        rows = await s.execute(
            select(Contact.email, Contact.status).where(Contact.tenant_id == tid)
        )
        return dict(rows.all())


async def reasons(sessions: Any, tid: int) -> dict[str, str]:
    async with sessions() as s:
        rows = await s.execute(
            select(Suppression.address, Suppression.reason).where(Suppression.tenant_id == tid)
        )
        return dict(rows.all())


def failure(tid: int, rcpt: str, hard: bool, category: str) -> dict[str, Any]:
    return {
        "type": "bounced",
        "tenant_id": tid,
        "recipient": rcpt,
        "message_id": "m1",
        "ts": dt.datetime.now(dt.UTC),
        "detail": {"hard": hard, "category": category, "response": "550 5.1.1 no such user"},
    }


async def test_bounces_and_complaints_move_statuses(db: Any) -> None:
    acme, other = await tenant_ids(db)
    async with db() as s:
        await save_contacts(s, acme, [ContactIn(e) for e in ("a@x.test", "b@x.test", "c@x.test")])
        await save_contacts(s, other, [ContactIn("a@x.test")])
        await s.commit()
    async with db() as s:
        done = await feedback.apply_failures(
            s,
            CFG,
            [
                failure(acme, "A@x.test", True, "user_unknown"),
                failure(acme, "b@x.test", False, "mailbox_full"),  # one soft: nothing yet
                failure(acme, "nobody@x.test", True, "user_unknown"),  # no contact: no error
            ],
        )
        await feedback.apply(
            s, CFG, tenant_id=acme, address="c@x.test", kind="complaint", hard=None, category=None
        )
        await s.commit()
    assert [(d.address, d.reason) for d in done] == [
        ("A@x.test", "hard_bounce"),
        ("nobody@x.test", "hard_bounce"),
    ]
    assert await statuses(db, acme) == {
        "a@x.test": "bounced",
        "b@x.test": "active",
        "c@x.test": "complained",
    }
    # The other tenant's contact of the same address is not theirs to change.
    assert await statuses(db, other) == {"a@x.test": "active"}
    async with db() as s:
        assert await remove_suppression(s, acme, "a@x.test") is not None
        assert await remove_suppression(s, acme, "a@x.test") is None
        await s.commit()
    assert (await statuses(db, acme))["a@x.test"] == "active"


async def test_statuses_set_while_bounces_arrive(db: Any) -> None:
    """Both writers touch the change feed and the contact: taken in one order (the
    feed first), they wait for each other rather than deadlock (PostgreSQL would
    abort one of them), and the end state is the one that committed last."""
    acme, _ = await tenant_ids(db)
    emails = [f"u{i}@x.test" for i in range(8)]
    async with db() as s:
        got = await save_contacts(s, acme, [ContactIn(e) for e in emails])
        await s.commit()
    ids = {r.email: r.id for r in got}

    async def set_status(email: str, status: str) -> None:
        async with db() as s:
            await update_contact(s, acme, ids[email], status=status)
            await s.commit()

    async def bounce(email: str) -> None:
        async with db() as s:
            await feedback.apply_failures(s, CFG, [failure(acme, email, True, "user_unknown")])
            await s.commit()

    for _ in range(3):
        await asyncio.gather(
            *(set_status(e, "unsubscribed") for e in emails),
            *(bounce(e) for e in reversed(emails)),
            *(set_status(e, "active") for e in emails),
        )
        now, supp = await statuses(db, acme), await reasons(db, acme)
        for e in emails:
            # In step whatever the order was: no suppression of a status reason ⇔ active.
            expected = {"unsubscribe": "unsubscribed", "hard_bounce": "bounced"}
            assert now[e] == expected.get(supp.get(e, ""), "active"), (e, now[e], supp.get(e))
