"""How long GET /v1/messages takes with a large history (not a test).

Fills a fresh control database (SQLite, or the one --db-url names) with N messages of
one tenant (two recipients each, over 30 days; states, tags, senders and sources in
fixed proportions, some of them rare) and 1 000 of a second tenant, then times the
list's query and its per-page recipient count (``message_list.query_messages`` and
``list_for``'s count) for each documented filter: the first page, and a page deep in
the history through a cursor. Prints the median milliseconds of each.

    python bench/message_list.py [--messages 300000] [--db-url postgresql+asyncpg://...]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from sqlalchemy import func, select, text

from postwarden.control import message_list
from postwarden.control.message_list import encode_position, find_messages
from postwarden.control.schemas import MessageQuery
from postwarden.store.db import create_engine, sessionmaker, upgrade
from postwarden.store.models import Message, Recipient

T0 = dt.datetime(2026, 11, 1, tzinfo=dt.UTC)
SPAN = dt.timedelta(days=30)


def rows_for(tenant: int, n: int, start: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    messages, recipients = [], []
    for i in range(start, start + n):
        mid = f"{tenant:02d}{i:020d}"
        state = "delivered"
        if i % 50 == 7:
            state = "bounced"  # 2 %
        elif i % 100 == 3:
            state = "deferred"  # 1 %
        elif i % 10_000 == 5:
            state = "expired"  # 0.01 %
        messages.append(
            {
                "id": mid,
                "tenant_id": tenant,
                "created_at": T0 + SPAN * (i - start) / n,
                "mail_from": ("news@acme.test", "shop@acme.test", "x@other.test")[i % 3],
                "subject": f"subject {i}",
                "source": "smtp" if i % 5 == 0 else "api",
                "tags": ["news"] if i % 2 else (["rare"] if i % 1000 == 2 else []),
                "meta": {},
            }
        )
        second = "archive@inbox.test" if i % 10 == 0 else f"cc{i}@inbox.test"
        for n_, (addr, st) in enumerate(((f"u{i}@inbox.test", state), (second, "delivered"))):
            recipients.append(
                {
                    "id": f"{mid}.{n_}",
                    "message_id": mid,
                    "tenant_id": tenant,
                    "address": addr,
                    "state": st,
                    "attempts": 1,
                    "last_response": "250 ok",
                    "updated_at": T0,
                }
            )
    return messages, recipients


async def fill(sessions: Any, tenant: int, n: int) -> None:
    for start in range(0, n, 5000):
        msgs, rcpts = rows_for(tenant, min(5000, n - start), start)
        async with sessions() as s:
            await s.execute(Message.__table__.insert(), msgs)
            await s.execute(Recipient.__table__.insert(), rcpts)
            await s.commit()


async def timed(sessions: Any, tenant: int, params: dict[str, Any], runs: int) -> tuple[float, int]:
    q = MessageQuery.model_validate(params)
    times, found = [], 0
    for _ in range(runs):
        t = time.perf_counter()
        async with sessions() as s:
            rows = await find_messages(s, tenant, q)
            if rows:
                await s.execute(
                    select(Recipient.message_id, Recipient.state, func.count())
                    .where(Recipient.message_id.in_([m.id for m in rows]))
                    .group_by(Recipient.message_id, Recipient.state)
                )
        times.append((time.perf_counter() - t) * 1000)
        found = len(rows)
    return statistics.median(times), found


async def main(args: argparse.Namespace) -> None:
    if args.lookup_limit is not None:
        message_list.LOOKUP_LIMIT = args.lookup_limit
    scratch = Path(tempfile.mkdtemp(prefix="pw-msglist-"))
    url = args.db_url or f"sqlite+aiosqlite:///{scratch / 'control.db'}"
    await upgrade(url)
    engine = create_engine(url)
    sessions = sessionmaker(engine)
    t = time.perf_counter()
    await fill(sessions, 1, args.messages)
    await fill(sessions, 2, 1000)
    if engine.dialect.name == "postgresql":  # as autovacuum would; SQLite keeps no stats
        async with engine.begin() as conn:
            await conn.execute(text("ANALYZE"))
    print(f"filled {args.messages} + 1000 messages in {time.perf_counter() - t:.1f} s ({url})")
    mid = T0 + SPAN / 2
    deep = encode_position(mid, "99")  # a cursor half-way back
    cases: list[tuple[str, int, dict[str, Any]]] = [
        ("no filter", 1, {}),
        ("no filter, deep cursor", 1, {"cursor": deep}),
        ("limit=1000", 1, {"limit": 1000}),
        ("small tenant", 2, {}),
        ("status=bounced (2 %)", 1, {"status": "bounced"}),
        ("status=deferred (1 %)", 1, {"status": "deferred"}),
        ("status=expired (0.01 %)", 1, {"status": "expired"}),
        ("status=dropped (none)", 1, {"status": "dropped"}),
        ("since=last day", 1, {"since": (T0 + SPAN - dt.timedelta(days=1)).isoformat()}),
        ("until=first day", 1, {"until": (T0 + dt.timedelta(days=1)).isoformat()}),
        ("recipient, one message", 1, {"recipient": f"u{args.messages // 3}@inbox.test"}),
        ("recipient, 10 % of messages", 1, {"recipient": "archive@inbox.test"}),
        ("recipient, none", 1, {"recipient": "nobody@inbox.test"}),
        ("tag=news (50 %)", 1, {"tag": "news"}),
        ("tag=rare (0.1 %)", 1, {"tag": "rare"}),
        ("from=shop@acme.test", 1, {"from": "shop@acme.test"}),
        ("domain=other.test", 1, {"domain": "other.test"}),
        ("source=smtp", 1, {"source": "smtp"}),
    ]
    print(f"{'filter':<34} {'median ms':>10} {'rows':>6}")
    for name, tenant, params in cases:
        ms, found = await timed(sessions, tenant, params, args.runs)
        print(f"{name:<34} {ms:>10.1f} {found:>6}")
    await engine.dispose()
    shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--messages", type=int, default=300_000)
    p.add_argument("--db-url", help="a migrated or empty database (default: a fresh SQLite file)")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--lookup-limit", type=int, help="message_list.LOOKUP_LIMIT to try")
    asyncio.run(main(p.parse_args()))
