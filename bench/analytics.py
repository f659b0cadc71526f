"""How fast the analytics answer from the rollups, on PostgreSQL (issue 23; not a test).

One run:

* a private PostgreSQL (tests/pg.py's throwaway cluster, fsync off, Debian's defaults
  otherwise: shared_buffers 128 MB), the schema by the migrations;
* the measured tenant's campaign of ``--recipients`` (1 000 000) send records and
  messages, and its events as delivery and tracking write them, loaded by COPY:
  accepted over the launch's first hours, delivered (97 %, seconds to hours after),
  deferred then delivered, bounced by category, complained, unsubscribed, opened
  (people and machines, first opens marked, a dozen user agents), clicked (a dozen
  links), over four provider sites and four sources, with A/B variants a and b;
* a month of the tenant's other mail (``--month-events``) and another tenant's,
  spread over the 30 days before now;
* the rollups made by the real reader (``store.rollups.Rollups``, batches of 5000, in
  this process): its rate in events per second is printed;
* then each question through the API in this process (httpx's ASGI transport: key
  check, validation, queries, JSON), ``--warmup`` times untimed and ``--reps`` times
  timed: the campaign's analytics (JSON and a CSV table), the tenant's overview, its
  providers and its sending domain over the month; and the campaign's ``/stats``
  (its send records' states: shown, not judged).

It prints p50/p95 per question and one line ``bench-analytics: events=… rollup_eps=…
rows=… campaign_p95_ms=… month_p95_ms=… pass=…``; it exits 1 when the campaign's
p95 is over 100 ms or a month's over 1000 ms (issue 23's targets).

    python bench/analytics.py [--recipients 1000000] [--month-events 300000]
        [--reps 30] [--warmup 5]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import gc
import glob
import json
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from events_query import _sql  # one statement on the private cluster

SETTINGS = {"maintenance_work_mem": "256MB", "max_wal_size": "4GB"}
EVENT_COLUMNS = ["tenant_id", "ts", "type", "message_id", "recipient_id", "recipient", "tags",
                 "detail"]  # fmt: skip
SITES = [("gmail", 0.45, "gmail-smtp-in.l.google.com"), ("outlook", 0.25, "x.outlook.com"),
         ("yahoo", 0.15, "mta5.am0.yahoodns.net"), ("mx:mx.small.example", 0.15,
                                                    "mx.small.example")]  # fmt: skip
SOURCES = ["pool-a-1", "pool-a-2", "pool-b-1", "pool-b-2"]
CATEGORIES = [("user_unknown", True), ("mailbox_full", False), ("policy_blocked", False),
              ("spam_content", False), ("domain_not_found", True)]  # fmt: skip
AGENTS = [
    "Mozilla/5.0 (Windows NT 5.1; rv:11.0) Gecko Firefox/11.0 (via ggpht.com GoogleImageProxy)",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko)",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like"
    " Gecko) Mobile/15E148",
    "Microsoft Office/16.0 (Windows NT 10.0; Microsoft Outlook 16.0.17029; Pro)",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko)"
    " Chrome/120.0.0.0 Safari/537.36",
    "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko)"
    " Chrome/120.0.6099.43 Mobile Safari/537.36",
    "YahooMailProxy; https://help.yahoo.com/kb/yahoo-mail-proxy-SLN28749.html",
    "Mozilla/5.0 (X11; Linux x86_64; rv:115.0) Gecko/20100101 Thunderbird/115.5.0",
]


def start_postgres() -> Any:
    if not glob.glob("/usr/lib/postgresql/*/bin/initdb"):
        raise SystemExit("bench: PostgreSQL not found: apt-get install postgresql")
    from tests.pg import start_cluster

    return start_cluster(SETTINGS, prefix="pw-anbench-")


def _pick(rng: random.Random, weighted: list[tuple[str, float, str]]) -> tuple[str, str]:
    r = rng.random()
    for name, share, mx in weighted:
        r -= share
        if r <= 0:
            return name, mx
    return weighted[-1][0], weighted[-1][2]


def _delivery(rng: random.Random) -> dict[str, Any]:
    site, mx = _pick(rng, SITES)
    return {"mx": mx, "ip": "192.0.2.10", "tls": True, "source": rng.choice(SOURCES),
            "site": site}  # fmt: skip


def campaign_data(
    n: int, tenant: int, campaign: int, launch: dt.datetime, seed: int = 23
) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """(send records, messages, events) of one campaign of ``n`` recipients."""
    rng = random.Random(seed)
    records, messages, events = [], [], []
    sec = dt.timedelta(seconds=1)
    for i in range(n):
        mid = f"c{campaign:04d}{i:010d}"
        email = f"r{i}@example.com"
        variant = "a" if i % 2 else "b"
        at = launch + sec * (i * 4 * 3600 / n)  # fed over four hours
        records.append((tenant, campaign, i + 1, email, "delivered", "", variant, mid, at, at))
        messages.append((mid, tenant, at, "news@news.acme.example", "Our news", "api", "[]",
                         "{}"))  # fmt: skip
        base = (tenant, mid, f"{mid}.1", email, ",news,")
        events.append((base[0], at, "accepted", *base[1:], "{}"))
        r = rng.random()
        d = _delivery(rng)
        after = at + sec * rng.expovariate(1 / 3.0)
        if r < 0.05:  # deferred first
            events.append((base[0], after, "deferred", *base[1:], json.dumps(d)))
            after += sec * 300 * rng.randint(1, 6)
        if r > 0.98:
            cat, hard = rng.choice(CATEGORIES)
            events.append((base[0], after, "bounced", *base[1:],
                           json.dumps(d | {"category": cat, "hard": hard})))  # fmt: skip
            continue
        events.append((base[0], after, "delivered", *base[1:], json.dumps(d)))
        seen = after + sec * rng.expovariate(1 / 7200)
        if rng.random() < 0.2:  # an image proxy or a scanner, at delivery
            events.append((base[0], after + sec * 2, "opened", *base[1:], json.dumps(
                {"machine": True, "reason": "prefetch", "campaign_id": campaign})))  # fmt: skip
        if rng.random() < 0.3:
            ua = rng.choice(AGENTS)
            for k in range(rng.choice((1, 1, 2, 3))):
                events.append((base[0], seen + sec * k * 600, "opened", *base[1:], json.dumps(
                    {"machine": False, "campaign_id": campaign, "user_agent": ua}
                    | ({"first": True} if k == 0 else {}))))  # fmt: skip
            if rng.random() < 0.2:
                link = rng.randrange(12)
                events.append((base[0], seen + sec * 30, "clicked", *base[1:], json.dumps(
                    {"machine": False, "first": True, "campaign_id": campaign,
                     "user_agent": ua, "link_index": link,
                     "url": f"https://acme.example/l/{link}"})))  # fmt: skip
        if rng.random() < 0.003:
            events.append((base[0], seen + sec * 60, "unsubscribed", *base[1:],
                           json.dumps({"method": "POST", "campaign_id": campaign})))  # fmt: skip
        if rng.random() < 0.001:
            events.append((base[0], seen + sec * 90, "complained", *base[1:],
                           json.dumps({"feedback_type": "abuse"})))  # fmt: skip
    events.sort(key=lambda e: e[1])
    return records, messages, events


def month_data(n: int, tenant: int, now: dt.datetime, seed: int) -> list[tuple[Any, ...]]:
    """About ``n`` events of transactional mail over the 30 days before ``now``."""
    rng = random.Random(seed)
    out = []
    for i in range(n // 2):
        at = now - dt.timedelta(seconds=rng.uniform(0, 30 * 86400))
        mid = f"t{tenant:02d}{i:010d}"
        base = (tenant, mid, f"{mid}.1", f"c{i}@shop.example", ",orders,")
        out.append((base[0], at, "accepted", *base[1:], "{}"))
        d = _delivery(rng)
        kind = "delivered" if rng.random() < 0.97 else "deferred"
        out.append((base[0], at + dt.timedelta(seconds=2), kind, *base[1:], json.dumps(d)))
    return out


async def load(url: str, rows: dict[str, tuple[list[str], list[tuple[Any, ...]]]]) -> float:
    import asyncpg
    from sqlalchemy.engine import make_url

    u = make_url(url)
    conn = await asyncpg.connect(host=u.host, port=u.port, user=u.username,
                                 password=u.password, database=u.database)  # fmt: skip
    t0 = time.perf_counter()
    try:
        for table, (columns, records) in rows.items():
            for i in range(0, len(records), 200_000):
                await conn.copy_records_to_table(table, records=records[i : i + 200_000],
                                                 columns=columns)  # fmt: skip
        await conn.execute("VACUUM ANALYZE")
    finally:
        await conn.close()
    return time.perf_counter() - t0


async def launch_counts(url: str, n: int, launch: dt.datetime) -> None:
    """The campaign's ``recipients`` as its launch counts them (store.campaigns writes
    them with store.rollups.add_counts in each batch's transaction): the records here
    are loaded by COPY, not launched."""
    from collections import Counter

    from postwarden.store.db import create_engine, sessionmaker
    from postwarden.store.rollups import add_counts, hour_of

    engine = create_engine(url)
    try:
        async with sessionmaker(engine)() as s:
            await add_counts(s, Counter({(1, "campaign", "1", "", "", hour_of(launch),
                                         "recipients"): n}))  # fmt: skip
            await s.commit()
    finally:
        await engine.dispose()


async def prepare(url: str) -> str:
    from postwarden.store.campaign_models import Campaign
    from postwarden.store.db import create_engine, sessionmaker
    from postwarden.store.models import ApiKey, Tenant
    from postwarden.store.secrets import new_api_key

    engine = create_engine(url)
    new = new_api_key()
    try:
        async with sessionmaker(engine)() as s:
            s.add_all([Tenant(id=1, name="measured"), Tenant(id=2, name="other")])
            await s.flush()
            s.add(ApiKey(tenant_id=1, prefix=new.prefix, secret_hash=new.secret_hash,
                         name="bench", scopes="read"))  # fmt: skip
            s.add(Campaign(id=1, tenant_id=1, name="news", audience_id=1, template_id=1,
                           from_email="news@news.acme.example", state="sent"))  # fmt: skip
            await s.commit()
    finally:
        await engine.dispose()
    return new.plaintext


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def roll_up(url: str) -> tuple[int, float]:
    from postwarden.control.analytics_pass import AnalyticsPass
    from postwarden.store.db import create_engine, sessionmaker

    engine = create_engine(url)
    try:
        analytics = AnalyticsPass(sessionmaker(engine))
        t0 = time.perf_counter()
        n = await analytics.run_once()
        return n, time.perf_counter() - t0
    finally:
        await engine.dispose()


async def measure(args: argparse.Namespace, url: str, key: str, scratch: Path) -> int:
    import httpx

    from postwarden.config import load_config
    from postwarden.control.app import create_app
    from postwarden.control.plane import ControlPlane
    from postwarden.dns.resolver import Resolver

    cfg = load_config(overrides={
        "database": {"url": url},
        "control": {"encryption_key_file": str(scratch / "control.key"),
                    "rate_limit": 1e9, "rate_burst": 10**9},
    })  # fmt: skip
    plane = ControlPlane(cfg, Resolver(["127.0.0.1"]), worker=(1, 2))  # no passes here
    await plane.start()
    app = create_app(lambda: b"", lambda: (True, {}), plane)
    now = dt.datetime.now(dt.UTC).replace(minute=0, second=0, microsecond=0)
    month = {"since": (now - dt.timedelta(days=30)).isoformat(),
             "until": (now + dt.timedelta(hours=1)).isoformat()}  # fmt: skip
    questions = [
        ("campaign", "/v1/campaigns/1/analytics", {}, 100.0),
        ("campaign_day", "/v1/campaigns/1/analytics", {"bucket": "day"}, 100.0),
        ("campaign_csv", "/v1/campaigns/1/analytics", {"format": "csv", "table": "sites"},
         100.0),
        ("overview_month", "/v1/analytics/overview", month, 1000.0),
        ("providers_month", "/v1/analytics/providers", month, 1000.0),
        ("domain_month", "/v1/analytics/domains/news.acme.example", month, 1000.0),
        ("stats_records", "/v1/campaigns/1/stats", {}, 0.0),
    ]  # fmt: skip
    headers = {"Authorization": f"Bearer {key}"}
    worst = {"campaign": 0.0, "month": 0.0}
    ok = True
    transport = httpx.ASGITransport(app=app)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://bench") as client:
            for name, path, params, budget in questions:
                times = []
                for rep in range(args.warmup + args.reps):
                    t0 = time.perf_counter()
                    r = await client.get(path, params=params, headers=headers)
                    elapsed = (time.perf_counter() - t0) * 1000
                    if r.status_code != 200:
                        raise SystemExit(f"bench: {name}: {r.status_code} {r.text[:300]}")
                    if rep >= args.warmup:
                        times.append(elapsed)
                p50, p95 = statistics.median(times), pct(times, 0.95)
                judged = "—" if not budget else ("ok" if p95 <= budget else "OVER")
                print(f"  {name:16s} p50={p50:7.1f}ms p95={p95:7.1f}ms budget={budget or '-'}"
                      f" {judged}  ({len(r.content)} bytes)")  # fmt: skip
                if budget:
                    kind = "month" if budget > 100 else "campaign"
                    worst[kind] = max(worst[kind], p95)
                    ok = ok and p95 <= budget
                if name == "campaign":
                    totals = r.json().get("totals", {})
                    print(f"  campaign totals: {json.dumps(totals)[:400]}")
    finally:
        await plane.stop()
    print(f"bench-analytics: campaign_p95_ms={worst['campaign']:.1f}"
          f" month_p95_ms={worst['month']:.1f} pass={int(ok)}")  # fmt: skip
    return 0 if ok else 1


async def run(args: argparse.Namespace, url: str, scratch: Path) -> int:
    from postwarden.store.db import upgrade

    await upgrade(url)
    key = await prepare(url)
    now = dt.datetime.now(dt.UTC)
    t0 = time.perf_counter()
    launch = now - dt.timedelta(days=2)
    records, messages, events = campaign_data(args.recipients, 1, 1, launch)
    await launch_counts(url, len(records), launch)
    events += month_data(args.month_events, 1, now, 5)
    events += month_data(args.month_events // 2, 2, now, 6)
    print(f"bench: {len(records)} records, {len(events)} events made in"
          f" {time.perf_counter() - t0:.1f}s")  # fmt: skip
    took = await load(url, {
        "send_records": (["tenant_id", "campaign_id", "contact_id", "email", "state",
                          "reason", "variant", "message_id", "sent_at", "updated_at"],
                         records),
        "messages": (["id", "tenant_id", "created_at", "mail_from", "subject", "source",
                      "tags", "meta"], messages),
        "events": (EVENT_COLUMNS, events),
    })  # fmt: skip
    print(f"bench: loaded in {took:.1f}s (COPY, then VACUUM ANALYZE)")
    total = len(events)
    del records, messages, events
    gc.collect()
    n, secs = await roll_up(url)
    print(f"bench: rolled up {n} events in {secs:.1f}s: {n / secs:.0f} events/s")
    rows = await _rows(url)
    print(f"bench: stat_hours has {rows} rows")
    gc.freeze()
    code = await measure(args, url, key, scratch)
    print(f"bench-analytics: events={total} rollup_eps={n / secs:.0f} rows={rows}")
    return code


async def _rows(url: str) -> int:
    from sqlalchemy import text

    from postwarden.store.db import create_engine

    engine = create_engine(url, isolation_level="AUTOCOMMIT")
    try:
        async with engine.connect() as conn:
            await conn.execute(text("VACUUM ANALYZE stat_hours"))
            return int((await conn.execute(text("SELECT count(*) FROM stat_hours"))).scalar())
    finally:
        await engine.dispose()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipients", type=int, default=1_000_000)
    ap.add_argument("--month-events", type=int, default=300_000)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    args = ap.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="pw-anb-"))
    server = start_postgres()
    try:
        asyncio.run(_sql(server.port, "postgres", "CREATE DATABASE analytics_bench"))
        return asyncio.run(run(args, server.url("analytics_bench"), scratch))
    finally:
        from tests.pg import stop_server

        stop_server(server)
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
