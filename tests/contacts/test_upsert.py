"""store.contacts.upsert_contacts on SQLite and PostgreSQL: emails normalized as the
suppression check does, one contact per email and tenant, updates that merge or
replace attributes or skip, unchanged rows left alone, concurrent writers of the same
emails without an error or a duplicate."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from sqlalchemy import func, select

from postwarden.store.contact_models import Contact
from postwarden.store.contacts import ContactIn, upsert_contacts
from tests.contacts.conftest import tenant_id


async def upsert(sessions: Any, tid: int, items: list[ContactIn], mode: str = "update") -> Any:
    async with sessions() as s:
        out = await upsert_contacts(s, tid, items, mode)
        await s.commit()
        return out


async def contacts(sessions: Any, tid: int) -> dict[str, Contact]:
    async with sessions() as s:
        rows = (await s.execute(select(Contact).where(Contact.tenant_id == tid))).scalars()
        return {c.email: c for c in rows}


async def test_create_normalizes_and_scopes_by_tenant(db: Any) -> None:
    acme, other = await tenant_id(db, "acme"), await tenant_id(db, "other")
    got = await upsert(
        db,
        acme,
        [
            ContactIn("Ann@Example.COM", name="Ann", attributes={"plan": "pro"}),
            ContactIn('"bob"@xn--bcher-kva.example', timezone="Europe/Paris"),
        ],
    )
    assert [(r.email, r.created, r.changed) for r in got] == [
        ("ann@example.com", True, True),
        ("bob@bücher.example", True, True),
    ]
    await upsert(db, other, [ContactIn("ann@example.com", name="Other Ann")])
    mine = await contacts(db, acme)
    assert set(mine) == {"ann@example.com", "bob@bücher.example"}
    assert mine["ann@example.com"].name == "Ann"
    assert mine["ann@example.com"].attributes == {"plan": "pro"}
    assert mine["bob@bücher.example"].timezone == "Europe/Paris"
    assert (await contacts(db, other))["ann@example.com"].name == "Other Ann"


async def test_update_merges_replace_replaces_skip_skips(db: Any) -> None:
    tid = await tenant_id(db, "acme")
    first = await upsert(db, tid, [ContactIn("a@x.test", name="A", attributes={"p": 1, "q": 2})])
    got = await upsert(db, tid, [ContactIn("A@x.test", attributes={"q": None, "r": 3})])
    assert (got[0].id, got[0].created, got[0].changed) == (first[0].id, False, True)
    c = (await contacts(db, tid))["a@x.test"]
    assert (c.name, c.attributes) == ("A", {"p": 1, "r": 3})
    await upsert(db, tid, [ContactIn("a@x.test", attributes={"z": "only"})], "replace")
    assert (await contacts(db, tid))["a@x.test"].attributes == {"z": "only"}
    got = await upsert(db, tid, [ContactIn("a@x.test", name="B")], "skip")
    assert (got[0].created, got[0].changed) == (False, False)
    assert (await contacts(db, tid))["a@x.test"].name == "A"
    with pytest.raises(ValueError, match="on_conflict"):
        await upsert(db, tid, [ContactIn("a@x.test")], "merge")


async def test_unchanged_rows_are_not_written(db: Any) -> None:
    tid = await tenant_id(db, "acme")
    await upsert(db, tid, [ContactIn("a@x.test", name="A", attributes={"p": 1})])
    stamp = (await contacts(db, tid))["a@x.test"].updated_at
    got = await upsert(db, tid, [ContactIn("a@x.test", name="A", attributes={"p": 1})])
    assert got[0].changed is False
    assert (await contacts(db, tid))["a@x.test"].updated_at == stamp


async def test_an_email_twice_in_one_batch_is_one_contact(db: Any) -> None:
    tid = await tenant_id(db, "acme")
    got = await upsert(
        db,
        tid,
        [
            ContactIn("dup@x.test", name="First", attributes={"a": 1}),
            ContactIn("other@x.test"),
            ContactIn("DUP@x.test", attributes={"b": 2}),
        ],
    )
    assert got[0].id == got[2].id != got[1].id
    c = (await contacts(db, tid))["dup@x.test"]
    assert (c.name, c.attributes) == ("First", {"a": 1, "b": 2})
    # The same for a contact that exists already.
    await upsert(db, tid, [ContactIn("dup@x.test", name="N1"), ContactIn("dup@x.test", name="N2")])
    assert (await contacts(db, tid))["dup@x.test"].name == "N2"


async def test_concurrent_writers_of_the_same_emails(db: Any) -> None:
    tid = await tenant_id(db, "acme")
    emails = [f"u{i}@x.test" for i in range(300)]

    async def writer(n: int) -> Any:
        return await upsert(db, tid, [ContactIn(e, attributes={f"w{n}": n}) for e in emails])

    results = await asyncio.gather(*(writer(n) for n in range(4)))
    ids = {tuple(r.id for r in res) for res in results}
    assert len(ids) == 1  # every writer wrote to the same rows
    async with db() as s:
        n = (await s.execute(select(func.count()).where(Contact.tenant_id == tid))).scalar_one()
    assert n == len(emails)
    assert all(len(c.attributes) == 4 for c in (await contacts(db, tid)).values())
