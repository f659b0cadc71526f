"""How fast an audience's count answers (not a test): typical rules over 1 000 000
contacts of one tenant on PostgreSQL, and over 100 000 on SQLite.

One run:

* a private PostgreSQL (tests/pg.py's throwaway cluster, as bench/events_query.py
  starts it; shared_buffers as Debian ships it) and a SQLite file in a scratch
  directory, both migrated by the migrations;
* contacts made in SQL (``generate_series`` on PostgreSQL, a recursive CTE on SQLite),
  with attributes of every type (plan, age, vip, country, renewal date, tags list,
  score), 7 % not active, another tenant with a tenth as many; two lists holding a
  third of the contacts, a topic opt-in by default that 10 % left and one opt-out by
  default that 25 % joined, a consent for 40 %; then ``VACUUM ANALYZE`` / ``ANALYZE``;
* each rule bound as the API binds it (``store.audiences.plan_for``) and counted with
  ``store.audiences.count`` — the statement ``GET /v1/audiences/{id}/preview`` runs
  for its count — ``--warmup`` times untimed, then ``--reps`` times; then the
  preview's sample (``store.audiences.sample``, the first 10 by id), timed apart.

It prints per database and rule the count, the count's p50/p95 and the sample's p50
in ms (the :data:`STRESS` rules too, marked), then one line
``audience_count: … worst_pg_p95_ms=…``; exit 1 when a PostgreSQL p95 of one of the
typical :data:`RULES` is over ``--budget-ms`` (1000).

    python bench/audience_count.py [--contacts 1000000] [--sqlite-contacts 100000]
        [--reps 9] [--warmup 2] [--budget-ms 1000] [--skip-sqlite]
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SETTINGS = {"maintenance_work_mem": "256MB", "max_wal_size": "4GB"}

RULES = [
    ("all active", 'status == "active"'),
    ("plan", 'attributes.plan == "pro"'),
    ("issue example",
     'attributes.plan == "pro" and in_list("beta") and not topic_opted_out("news")'),
    ("number range", "attributes.age >= 30 and attributes.age < 45"),
    ("selective equality", 'attributes.country == "SE" and attributes.vip == true'),
    ("list item", 'attributes.tags contains "t3"'),
    ("date", 'attributes.renewal >= "2026-06-01"'),
    ("domain", 'domain == "d7.example"'),
    ("created", 'created_at > "2026-01-01"'),
    ("consent and topic", 'has_consent("marketing") and topic_opted_in("offers")'),
    ("or of lists",
     'in_list("beta") or in_list("gamma") or attributes.plan in ["team", "enterprise"]'),
    ("five terms", 'attributes.plan != "free" and attributes.age > 25 and not in_list("gamma")'
                   ' and email.endswith(".example") and has_consent("marketing")'),
]  # fmt: skip

#: Beyond the typical: measured and printed, not held to the budget (six comparisons
#: of attributes cost about 0.5 µs each per contact; docs/performance.md).
STRESS = [
    ("many attributes", "attributes.age > 20 and attributes.age < 75 and attributes.score >= 0"
     ' and attributes.plan != "x" and attributes.country != "ZZ"'
     ' and attributes.renewal > "2025-01-01" and has_consent("marketing")'
     ' and not in_list("gamma")'),
]  # fmt: skip

PG_LOAD = """
INSERT INTO tenants (id, name, created_at, disabled, settings, allowed_pools)
VALUES (1, 'measured', now(), false, '{{}}', '[]'), (2, 'other', now(), false, '{{}}', '[]');
INSERT INTO attribute_defs (tenant_id, name, type, created_at) VALUES
  (1, 'plan', 'string', now()), (1, 'age', 'number', now()), (1, 'vip', 'boolean', now()),
  (1, 'country', 'string', now()), (1, 'renewal', 'date', now()), (1, 'tags', 'list', now()),
  (1, 'score', 'number', now());
INSERT INTO contacts (tenant_id, email, name, status, attributes, created_at, updated_at)
SELECT CASE WHEN g > {n} THEN 2 ELSE 1 END,
  'user' || g || '@d' || (g % 50) || '.example', 'User ' || g,
  CASE WHEN g % 20 = 0 THEN 'unsubscribed' WHEN g % 50 = 1 THEN 'bounced' ELSE 'active' END,
  jsonb_build_object('plan', (ARRAY['free','pro','team','enterprise'])[1 + (g % 7) % 4],
    'age', 18 + (g::bigint * 7919) % 60, 'vip', (g % 13 = 0),
    'country', (ARRAY['DE','FR','US','GB','NL','SE'])[1 + g % 6],
    'renewal', to_char(date '2026-01-01' + (g % 400), 'YYYY-MM-DD'),
    'tags', jsonb_build_array('t' || (g % 10), 't' || (g % 17 + 10)), 'score', (g % 1000) / 10.0),
  now() - ((g % 700) || ' days')::interval, now()
FROM generate_series(1, {total}) g;
INSERT INTO lists (id, tenant_id, name, description, created_at, updated_at)
VALUES (1, 1, 'beta', '', now(), now()), (2, 1, 'gamma', '', now(), now());
INSERT INTO list_members (list_id, contact_id, tenant_id, added_at)
SELECT 1 + (id % 2), id, 1, now() FROM contacts WHERE tenant_id = 1 AND id % 3 = 0;
INSERT INTO topics (id, tenant_id, name, description, default_opt_in, created_at, updated_at)
VALUES (1, 1, 'news', '', true, now(), now()), (2, 1, 'offers', '', false, now(), now());
INSERT INTO topic_subscriptions (topic_id, contact_id, tenant_id, opted_in, changed_at)
SELECT 1, id, 1, false, now() FROM contacts WHERE tenant_id = 1 AND id % 10 = 0;
INSERT INTO topic_subscriptions (topic_id, contact_id, tenant_id, opted_in, changed_at)
SELECT 2, id, 1, true, now() FROM contacts WHERE tenant_id = 1 AND id % 4 = 0;
INSERT INTO consents (tenant_id, contact_id, source, wording_version, purpose, at, created_at)
SELECT 1, id, 'form', 'v1', 'marketing', now(), now() FROM contacts
WHERE tenant_id = 1 AND id % 5 < 2;
"""

SQLITE_CONTACTS = """
WITH RECURSIVE s(g) AS (SELECT 1 UNION ALL SELECT g + 1 FROM s WHERE g < {total})
INSERT INTO contacts (tenant_id, email, name, status, attributes, created_at, updated_at)
SELECT CASE WHEN g > {n} THEN 2 ELSE 1 END,
  'user' || g || '@d' || (g % 50) || '.example', 'User ' || g,
  CASE WHEN g % 20 = 0 THEN 'unsubscribed' WHEN g % 50 = 1 THEN 'bounced' ELSE 'active' END,
  json_object(
    'plan', json_extract('["free","pro","team","enterprise"]', '$[' || ((g % 7) % 4) || ']'),
    'age', 18 + (g * 7919) % 60, 'vip', json(CASE WHEN g % 13 = 0 THEN 'true' ELSE 'false' END),
    'country', json_extract('["DE","FR","US","GB","NL","SE"]', '$[' || (g % 6) || ']'),
    'renewal', date('2026-01-01', '+' || (g % 400) || ' days'),
    'tags', json_array('t' || (g % 10), 't' || (g % 17 + 10)), 'score', (g % 1000) / 10.0),
  datetime('now', '-' || (g % 700) || ' days'), datetime('now')
FROM s
"""


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


Result = tuple[str, int, float, float, float]


async def _measure(url: str, reps: int, warmup: int) -> list[Result]:
    from postwarden.store.audiences import count, plan_for, sample
    from postwarden.store.db import create_engine, sessionmaker

    engine = create_engine(url)
    out = []
    try:
        sessions = sessionmaker(engine)
        for name, rule in RULES + STRESS:
            times, samples = [], []
            found = 0
            for rep in range(warmup + reps):
                async with sessions() as s:
                    t0 = time.perf_counter()
                    plan = await plan_for(s, 1, rule)
                    found = await count(s, 1, plan)
                    t1 = time.perf_counter()
                    await sample(s, 1, plan, 10)
                    t2 = time.perf_counter()
                if rep >= warmup:
                    times.append((t1 - t0) * 1000)
                    samples.append((t2 - t1) * 1000)
            out.append(
                (
                    name,
                    found,
                    statistics.median(times),
                    pct(times, 0.95),
                    statistics.median(samples),
                )
            )
    finally:
        await engine.dispose()
    return out


def _report(db: str, n: int, load_s: float, results: list[Result]) -> None:
    print(f"\n{db}: {n} contacts of the measured tenant, loaded in {load_s:.1f}s")
    print(f"  {'rule':<20} {'count':>9} {'p50 ms':>8} {'p95 ms':>8} {'sample p50':>10}")
    for i, (name, found, p50, p95, samp) in enumerate(results):
        mark = " (stress: not budgeted)" if i >= len(RULES) else ""
        print(f"  {name:<20} {found:>9} {p50:>8.1f} {p95:>8.1f} {samp:>10.1f}{mark}")


async def _pg_load(server: Any, n: int) -> tuple[str, float]:
    import asyncpg

    from postwarden.store.db import upgrade

    server._sql("CREATE DATABASE bench")
    url = server.url("bench")
    await upgrade(url)
    conn = await asyncpg.connect(host="127.0.0.1", port=server.port, user="pw", database="bench")
    t0 = time.perf_counter()
    try:
        await conn.execute(PG_LOAD.format(n=n, total=n + n // 10))
        await conn.execute("VACUUM ANALYZE")
    finally:
        await conn.close()
    return url, time.perf_counter() - t0


async def _sqlite_load(path: Path, n: int) -> tuple[str, float]:
    import sqlite3

    from postwarden.store.db import upgrade

    url = f"sqlite+aiosqlite:///{path}"
    await upgrade(url)
    t0 = time.perf_counter()
    db = sqlite3.connect(path)
    try:
        pg = PG_LOAD.split("INSERT INTO contacts")[0].replace("now()", "datetime('now')")
        db.executescript(pg.replace("{{}}", "{}").replace("false", "0").replace("true", "1"))
        db.execute(SQLITE_CONTACTS.format(n=n, total=n + n // 10))
        rest = "INSERT INTO lists" + PG_LOAD.split("INSERT INTO lists", 1)[1]
        rest = rest.replace("now()", "datetime('now')").replace("true", "1").replace("false", "0")
        db.executescript(rest)
        db.commit()
        db.execute("ANALYZE")
    finally:
        db.close()
    return url, time.perf_counter() - t0


async def run(args: argparse.Namespace, scratch: Path) -> int:
    from tests.pg import start_cluster, stop_server

    worst = 0.0
    if not args.skip_sqlite:
        url, took = await _sqlite_load(scratch / "bench.db", args.sqlite_contacts)
        results = await _measure(url, args.reps, args.warmup)
        _report("SQLite", args.sqlite_contacts, took, results)
    if not glob.glob("/usr/lib/postgresql/*/bin/initdb"):
        raise SystemExit("bench: PostgreSQL not found: apt-get install postgresql")
    server = start_cluster(SETTINGS, prefix="pw-audbench-")
    try:
        url, took = await _pg_load(server, args.contacts)
        results = await _measure(url, args.reps, args.warmup)
        _report("PostgreSQL", args.contacts, took, results)
        worst = max(r[3] for r in results[: len(RULES)])
    finally:
        stop_server(server)
    ok = worst <= args.budget_ms
    print(f"\naudience_count: rules={len(RULES)} contacts={args.contacts}"
          f" worst_pg_p95_ms={worst:.0f} budget_ms={args.budget_ms:.0f} pass={ok}")  # fmt: skip
    return 0 if ok else 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--contacts", type=int, default=1_000_000)
    p.add_argument("--sqlite-contacts", type=int, default=100_000)
    p.add_argument("--reps", type=int, default=9)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--budget-ms", type=float, default=1000.0)
    p.add_argument("--skip-sqlite", action="store_true")
    args = p.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="pw-audbench-"))
    try:
        return asyncio.run(run(args, scratch))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
