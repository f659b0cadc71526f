"""The event list's indexes and rollups (migration 0005, issue 18 item 6) on SQLite and
PostgreSQL: the migration goes down and up again, and at every step each filter
of ``GET /v1/events`` (alone, combined, after a cursor, any page size) answers exactly
what a plain scan of the events answers. PostgreSQL's rollups (event_hours, event_tags)
are filled from the events already there, and follow inserts (one statement of many
rows, or many statements), deletes and truncation. Not a timing test: bench/events_query.py
measures."""

from __future__ import annotations

import datetime as dt
import random
import threading
from dataclasses import dataclass
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import text

from postwarden.store.db import (
    alembic_config,
    create_engine,
    current_revision,
    head_revision,
    sessionmaker,
    upgrade,
)
from postwarden.store.event_query import events_query
from postwarden.store.models import Event

EVENTS: sa.Table = Event.__table__  # type: ignore[assignment]
T0 = dt.datetime(2027, 3, 1, 9, 0, tzinfo=dt.UTC)  # on an hour
TYPES = ["accepted", "delivered", "deferred", "bounced", "complained"]
TAGS = ["", ",orders,", ",orders,eu.shop,", ",news-1,", ",news-1,news-1,", ",eu.shop,"]
HOUR = dt.timedelta(hours=1)
BEFORE = "0004"  # the revision before 0005_event_query_indexes
MINUTE = dt.timedelta(minutes=1)


def downgrade_sync(url: str, revision: str) -> None:
    """Alembic's downgrade in a thread of its own (its env runs an event loop)."""
    from alembic import command

    errors: list[BaseException] = []

    def run() -> None:
        try:
            command.downgrade(alembic_config(url), revision)
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=run)
    t.start()
    t.join()
    if errors:
        raise errors[0]


@pytest.fixture
def database_url(migrated_url: str) -> str:
    return migrated_url


def make_events(rng: random.Random, n: int, start: dt.datetime) -> list[dict[str, Any]]:
    """``n`` events of two tenants over about a day and a half from ``start``; times are
    only roughly in the order written, some land exactly on an hour, a few come late."""
    rows = []
    for i in range(n):
        ts = start + dt.timedelta(seconds=i * 311 + rng.randint(-400, 400))
        if i % 23 == 0:
            ts = ts.replace(minute=0, second=0, microsecond=0)
        if i % 37 == 0:
            ts -= dt.timedelta(hours=rng.randint(2, 20))  # copied late (a worker was down)
        rows.append(
            {
                "tenant_id": 1 if rng.random() < 0.7 else 2,
                "ts": ts,
                "type": rng.choice(TYPES),
                "message_id": f"m{rng.randint(0, n // 3)}",
                "recipient_id": None,
                "recipient": rng.choice(["a@x.test", "b@x.test", "c@y.test", None]),
                "tags": rng.choice(TAGS),
                "detail": {"i": i},
            }
        )
    return rows


@dataclass(frozen=True)
class Filters:
    type: str | None = None
    recipient: str | None = None
    message_id: str | None = None
    tag: str | None = None
    since: dt.datetime | None = None
    until: dt.datetime | None = None

    def match(self, e: Any, tenant: int) -> bool:
        return (
            e.tenant_id == tenant
            and (not self.type or e.type == self.type)
            and (not self.recipient or e.recipient == self.recipient)
            and (not self.message_id or e.message_id == self.message_id)
            and (not self.tag or self.tag in e.tags.split(","))
            and (self.since is None or e.ts >= self.since)
            and (self.until is None or e.ts < self.until)
        )


def filter_sets() -> list[Filters]:
    on_hour = T0 + 7 * HOUR
    return [
        Filters(),
        Filters(type="bounced"),
        Filters(type="held"),  # nobody's
        Filters(recipient="a@x.test"),
        Filters(recipient="nobody@x.test"),
        Filters(message_id="m5"),
        Filters(tag="orders"),
        Filters(tag="eu.shop"),
        Filters(tag="news-1"),
        Filters(tag="nosuchtag"),
        Filters(since=on_hour),
        Filters(since=on_hour - dt.timedelta(microseconds=1)),
        Filters(since=on_hour + dt.timedelta(microseconds=1)),
        Filters(since=T0 + 20 * HOUR + 17 * MINUTE),
        Filters(since=T0 + dt.timedelta(days=30)),
        Filters(since=T0 - dt.timedelta(days=30)),
        Filters(until=on_hour),
        Filters(until=on_hour + dt.timedelta(microseconds=1)),
        Filters(until=T0 - dt.timedelta(days=1)),
        Filters(until=T0 + 20 * HOUR + 30 * MINUTE),
        Filters(since=T0 + 8 * HOUR + 10 * MINUTE, until=T0 + 8 * HOUR + 50 * MINUTE),
        Filters(since=T0 + 5 * HOUR, until=T0 + 9 * HOUR),
        Filters(since=T0 + 9 * HOUR, until=T0 + 5 * HOUR),
        Filters(type="bounced", since=T0 + 10 * HOUR),
        Filters(tag="orders", since=T0 + 3 * HOUR, until=T0 + 30 * HOUR),
        Filters(tag="orders", type="delivered"),
        Filters(tag="news-1", recipient="a@x.test", until=T0 + 20 * HOUR),
        Filters(recipient="b@x.test", type="accepted", since=T0 + 2 * HOUR),
    ]


async def all_events(url: str) -> list[Any]:
    engine = create_engine(url)
    try:
        async with engine.connect() as conn:
            return list((await conn.execute(sa.select(EVENTS).order_by(EVENTS.c.id))).all())
    finally:
        await engine.dispose()


async def check_answers(url: str) -> int:
    """Every filter set, both tenants, several cursors and page sizes: the query's ids
    are the plain scan's. Returns how many of the answers were not empty."""
    events = await all_events(url)
    ids = [e.id for e in events]
    engine = create_engine(url)
    filled = 0
    try:
        dialect = engine.dialect.name
        async with sessionmaker(engine)() as s:
            for f in filter_sets():
                for tenant in (1, 2):
                    want_all = [e.id for e in events if f.match(e, tenant)]
                    for after in (0, ids[len(ids) // 3], ids[-1]):
                        for limit in (1, 7, 1000):
                            stmt = events_query(
                                dialect, tenant, after=after, limit=limit, **f.__dict__
                            )
                            got = [e.id for e in (await s.execute(stmt)).all()]
                            want = [i for i in want_all if i > after][:limit]
                            assert got == want, (f, tenant, after, limit)
                            filled += bool(want)
                    # Paging through with the cursor gives each event once, in order.
                    seen: list[int] = []
                    after = 0
                    while True:
                        stmt = events_query(dialect, tenant, after=after, limit=5, **f.__dict__)
                        page = [e.id for e in (await s.execute(stmt)).all()]
                        if not page:
                            break
                        seen += page
                        after = page[-1]
                    assert seen == want_all, f
    finally:
        await engine.dispose()
    return filled


async def insert(url: str, rows: list[dict[str, Any]], *, one_statement: bool) -> None:
    engine = create_engine(url)
    try:
        async with engine.begin() as conn:
            if one_statement:
                await conn.execute(EVENTS.insert().values(rows))
            else:
                await conn.execute(EVENTS.insert(), rows)
    finally:
        await engine.dispose()


async def execute(url: str, *sql: str) -> list[list[Any]]:
    engine = create_engine(url)
    try:
        async with engine.begin() as conn:
            out = []
            for q in sql:
                result = await conn.execute(text(q))
                out.append(list(result.all()) if result.returns_rows else [])
            return out
    finally:
        await engine.dispose()


async def schema(url: str) -> tuple[set[str], set[str]]:
    """The events table's index names, and the tables there are."""
    engine = create_engine(url)
    try:
        async with engine.connect() as conn:
            return await conn.run_sync(
                lambda c: (
                    {str(ix["name"]) for ix in sa.inspect(c).get_indexes("events")},
                    set(sa.inspect(c).get_table_names()),
                )
            )
    finally:
        await engine.dispose()


async def rollups_agree(url: str) -> None:
    """PostgreSQL: event_tags holds exactly each tenant event's tags; every hour with
    events has a row whose ids bound them, and no hour without events has one."""
    tags, hours, events = await execute(
        url,
        "SELECT tenant_id, tag, event_id FROM event_tags",
        "SELECT tenant_id, hour, first_id, last_id FROM event_hours",
        "SELECT id, tenant_id, ts, tags FROM events",
    )
    want_tags = {
        (t, tag, i) for i, t, _, text_ in events if t is not None for tag in text_.split(",") if tag
    }
    assert {tuple(r) for r in tags} == want_tags
    assert len(tags) == len(want_tags)
    spans: dict[tuple[int, dt.datetime], list[int]] = {}
    for i, t, ts, _ in events:
        if t is not None:
            hour = ts.astimezone(dt.UTC).replace(minute=0, second=0, microsecond=0, tzinfo=None)
            spans.setdefault((t, hour), []).append(i)
    by_key = {(t, h): (first, last) for t, h, first, last in hours}
    assert set(by_key) == set(spans)
    for key, member_ids in spans.items():
        first, last = by_key[key]
        assert first <= min(member_ids) and max(member_ids) <= last


async def test_filters_answer_as_a_scan_through_down_and_up(database_url: str) -> None:
    url = database_url
    pg = url.startswith("postgresql")
    head = head_revision()
    assert await current_revision(url) == head
    names, tables = await schema(url)
    assert {"ix_events_tenant_id_type_id", "ix_events_tenant_id_recipient_id"} <= names
    assert "ix_events_tenant_id_recipient" not in names
    assert ({"event_hours", "event_tags"} <= tables) == pg

    rng = random.Random(18)
    await insert(url, make_events(rng, 150, T0), one_statement=True)
    await insert(url, make_events(rng, 150, T0 + 6 * HOUR), one_statement=False)
    await insert(url, make_events(rng, 1, T0 + 40 * HOUR), one_statement=False)
    assert await check_answers(url) > 200
    if pg:
        await rollups_agree(url)

    # Down a step: the indexes as they were, no rollups, every event still there.
    before = [tuple(e) for e in await all_events(url)]
    downgrade_sync(url, BEFORE)
    assert await current_revision(url) == BEFORE
    names, tables = await schema(url)
    assert "ix_events_tenant_id_recipient" in names
    assert not names & {"ix_events_tenant_id_type_id", "ix_events_tenant_id_recipient_id"}
    assert not tables & {"event_hours", "event_tags"}
    assert [tuple(e) for e in await all_events(url)] == before
    if pg:
        triggers = await execute(url, "SELECT tgname FROM pg_trigger WHERE NOT tgisinternal")
        assert triggers == [[]]
    # Events written before the migration (no triggers then) are in the rollups made on the way up.
    await insert(url, make_events(rng, 80, T0 + 12 * HOUR), one_statement=False)

    await upgrade(url)
    assert await current_revision(url) == head
    assert await check_answers(url) > 200
    if not pg:
        return
    await rollups_agree(url)

    # Retention deletes in batches; whole hours empty, others thin out.
    await execute(
        url,
        f"DELETE FROM events WHERE ts < '{(T0 + 10 * HOUR).isoformat()}' AND id % 3 <> 0",
        f"DELETE FROM events WHERE ts < '{(T0 + 4 * HOUR).isoformat()}'",
    )
    await rollups_agree(url)
    assert await check_answers(url) > 200
    # Events of no tenant (a trusted network's relay) are nobody's: in no rollup.
    orphan = make_events(rng, 3, T0)
    for row in orphan:
        row["tenant_id"] = None
    await insert(url, orphan, one_statement=True)
    await rollups_agree(url)
    await execute(url, "TRUNCATE events")
    assert await execute(
        url, "SELECT count(*) FROM event_hours", "SELECT count(*) FROM event_tags"
    ) == [
        [(0,)],
        [(0,)],
    ]
