"""How fast ``GET /v1/events`` answers over a long history on PostgreSQL (not a test).

One run:

* a private PostgreSQL (Debian's binaries under /usr/lib/postgresql/*/bin, a scratch
  directory, 127.0.0.1 and a free port, fsync off: a throwaway cluster; the defaults
  otherwise, shared_buffers 128 MB as Debian ships it), or the empty database named by
  ``--db-url``; the schema by the migrations;
* 1 000 000 events of the measured tenant and 500 000 of another (so that tenant scoping
  matters), over the 90 days before now (``database.event_retention``), loaded by COPY
  then VACUUM ANALYZE: transactional mail through the day, busiest in the last hour;
  a weekly newsletter of 12 000 messages within an hour; outcomes as a sending appliance
  sees them (delivered, deferred then delivered, bounced, dropped, expired, complained);
  tags per message; two seed addresses on 2 % of the mail; ids in the order events are
  copied (times a little out of order across shards, late ones);
* every documented filter alone, with a cursor (middle, deep, at the end: polling) and
  with ``limit`` up to 1000, and the combinations docs/api.md shows (plus three that it
  does not, shown but not judged), each run ``--warmup`` times untimed then ``--reps``
  times, three ways at once: ``sql`` is the statement the endpoint runs, as the driver
  sees it (run, rows fetched and decoded); ``handler`` is ``list_events`` itself (the
  query, the rows, the page's JSON); ``api`` is ``GET /v1/events``
  through the ASGI app in this process (key check, validation, query, JSON). ``server``
  is PostgreSQL's own execution time of that statement (EXPLAIN ANALYZE, median of 5).

It prints, per case, the rows returned, server, p50/p95 of the three, whether sql and
api p95 are within ``--budget-ms`` (20), then one line ``events_query: cases=…
sql_pass=… api_pass=… worst_sql_p95_ms=… worst_api_p95_ms=…``; it exits 1 when a
judged case's sql p95 is over budget. It uses only the endpoint's code, so it measures
an older checkout too (``PYTHONPATH=<its src>``).

    python bench/events_query.py [--events 1000000] [--other 500000] [--reps 40]
        [--warmup 5] [--budget-ms 20] [--db-url URL] [--load-revision REV] [--explain]
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
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# tests/pg.py starts the server: the repository's root on the path.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

DAY = 86400.0
SPAN_DAYS = 90
# The benchmark's server: tests/pg.py's throwaway cluster, with room to build the
# indexes of 1.5M rows in one pass; queries run on the defaults otherwise
# (shared_buffers 128MB, as Debian installs it).
SETTINGS = {"maintenance_work_mem": "256MB", "max_wal_size": "4GB"}


def start_postgres() -> Any:
    if not glob.glob("/usr/lib/postgresql/*/bin/initdb"):
        raise SystemExit("bench: PostgreSQL not found: apt-get install postgresql")
    from tests.pg import start_cluster

    return start_cluster(SETTINGS, prefix="pw-evbench-")


async def _sql(port: int, db: str, sql: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(host="127.0.0.1", port=port, user="pw", database=db)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


# ---------------------------------------------------------------- the history

TRANSACTIONAL_TAGS = [  # (tag, share of transactional messages)
    ("orders", 0.35),
    ("receipts", 0.20),
    ("welcome", 0.05),
    ("password-reset", 0.03),
    ("invoice-overdue", 0.005),
]
CAMPAIGN_SIZE = 12_000
SEEDS = ["seed1@monitor.example.com", "seed2@monitor.example.com"]
MX = ["mx1.example.net", "mx2.example.org", "gmail-smtp-in.l.google.com", "mx.outlook.test"]


@dataclass
class History:
    """Events as COPY rows (id order), and what the cases query."""

    rows: list[tuple[Any, ...]] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)  # the measured tenant's, once loaded
    counts: dict[int, int] = field(default_factory=dict)
    campaign_tags: list[str] = field(default_factory=list)
    campaign_starts: list[float] = field(default_factory=list)
    busy_recipient: str = ""
    some_recipient: str = ""
    some_message: str = ""
    now: float = 0.0


def _diurnal(rng: random.Random) -> float:
    """Seconds back from the time of day the run starts: mail peaks then (so that the
    last hour is a busy one) and is a quarter of that at the other side of the clock."""
    while True:
        s = rng.random() * DAY
        hours_off_peak = min(s, DAY - s) / 3600
        if rng.random() < 0.25 + 0.75 * max(0.0, 1 - hours_off_peak / 9):
            return s


def _detail(rng: random.Random, kind: str, tries: int = 0) -> str:
    mx = rng.choice(MX)
    if kind == "accepted":
        d: dict[str, Any] = {"size": rng.randint(3000, 60000), "client_ip": "10.0.0.7"}
    elif kind == "delivered":
        d = {"response": f"250 2.0.0 Ok: queued as {rng.getrandbits(40):x}", "mx": mx,
             "ip": "192.0.2.10", "tls": True, "source": "pool-a"}  # fmt: skip
    elif kind == "deferred":
        d = {"response": "421 4.7.0 Try again later", "mx": mx, "ip": "192.0.2.10",
             "tls": True, "next_attempt": 0, "attempt": tries}  # fmt: skip
    elif kind == "bounced":
        d = {"category": "user_unknown", "hard": True, "status": "5.1.1", "mx": mx,
             "response": "550 5.1.1 <x>: Recipient address rejected: User unknown"}  # fmt: skip
    elif kind == "expired":
        d = {"category": "expired", "reason": "queue lifetime exceeded"}
    elif kind == "dropped":
        d = {"reason": "suppressed: hard_bounce"}
    elif kind == "complained":
        d = {"feedback_type": "abuse", "user_agent": "Yahoo!-Mail-Feedback/2.0"}
    else:
        d = {"by": "operator"}
    return json.dumps(d, separators=(",", ":"))


def _recipient_events(
    rng: random.Random, t: float, campaign: bool
) -> Iterator[tuple[float, str, int]]:
    """(ts, type, deferrals so far) of one recipient from its acceptance at ``t``."""
    yield t, "accepted", 0
    r = rng.random()
    if r < 0.003:
        yield t + 0.01, "dropped", 0
        return
    deferrals = 0
    if 0.90 < r < 0.95 or 0.985 < r:
        deferrals = rng.randint(1, 3) if r < 0.998 else 5
    at = t
    for i in range(deferrals):
        at += 300 * (6**i)
        yield at, "deferred", i + 1
    at += rng.expovariate(1 / 1.5)
    if r >= 0.998:
        yield t + 5 * DAY, "expired", deferrals
    elif r >= 0.97:
        yield at, "bounced", deferrals
    else:
        yield at, "delivered", deferrals
        if campaign and rng.random() < 0.002:
            yield at + rng.uniform(600, 2 * DAY), "complained", 0


def _tenant_events(
    rng: random.Random, tenant: int, target: int, now: float, hist: History, probe: bool
) -> list[tuple[float, int, str, str, str, str, str, int]]:
    """About ``target`` events of one tenant: (ts, tenant, type, msg, rid, rcpt, tags, n)."""
    out: list[tuple[float, int, str, str, str, str, str, int]] = []
    start = now - SPAN_DAYS * DAY
    weeks = SPAN_DAYS // 7
    campaign_events = int(weeks * CAMPAIGN_SIZE * 2.1)
    scale = min(1.0, target / max(1, campaign_events) / 3)  # campaigns: a third at most
    list_size = max(10, int(CAMPAIGN_SIZE * scale))
    audience = [f"subscriber{i}@{rng.choice(['example.com', 'example.net', 'example.org'])}"
                for i in range(list_size)]  # fmt: skip
    customers = [f"customer{i}@shop{i % 97}.example" for i in range(max(10, target // 8))]
    seq = 0

    def message(t: float, tags: list[str], rcpts: list[str], campaign: bool) -> None:
        nonlocal seq
        seq += 1
        msg = f"{int(t * 1000):012x}{tenant:02x}{seq:08x}"
        tag_text = "," + ",".join(tags) + "," if tags else ""
        for i, rcpt in enumerate(rcpts):
            for ts, kind, n in _recipient_events(rng, t, campaign):
                if ts <= now:
                    out.append((ts, tenant, kind, msg, f"{msg}.{i + 1}", rcpt, tag_text, n))

    for week in range(weeks):
        tag = f"news-{dt.datetime.fromtimestamp(start + (week + 0.5) * 7 * DAY, dt.UTC):%Y-%m-%d}"
        begin = start + (week * 7 + 3) * DAY + 10 * 3600
        if probe:
            hist.campaign_tags.append(tag)
            hist.campaign_starts.append(begin)
        for rcpt in audience:
            message(begin + rng.random() * 3600, ["newsletter", tag], [rcpt], True)
    while len(out) < target:
        t = now - rng.randrange(SPAN_DAYS) * DAY - _diurnal(rng)
        tags = [tag for tag, share in TRANSACTIONAL_TAGS if rng.random() < share][:3]
        n = 1 if rng.random() < 0.9 else rng.randint(2, 3)
        rcpts = [customers[int(len(customers) * rng.random() ** 2)] for _ in range(n)]
        if rng.random() < 0.02:
            rcpts.append(rng.choice(SEEDS))
        message(t, tags, rcpts, False)
        if not probe and rng.random() < 0.002:  # the other tenant's operator holds mail
            out.append((t + 1, tenant, "held", f"{int(t * 1000):012x}", "", "", "", 0))
    if probe:
        hist.busy_recipient = SEEDS[0]
        hist.some_recipient = out[len(out) // 3][5]
        hist.some_message = out[len(out) // 2][3]
    return out


def history(events: int, other: int, seed: int = 7) -> History:
    rng = random.Random(seed)
    hist = History(now=time.time())
    raw = _tenant_events(rng, 1, events, hist.now, hist, True)
    raw += _tenant_events(rng, 2, other, hist.now, hist, False)
    # Ids follow the order the copier wrote them: each worker's shard is copied in
    # batches, so times are a little out of order across shards.
    order = sorted(range(len(raw)), key=lambda i: raw[i][0] + rng.random() * 2)
    utc = dt.UTC
    for new_id, i in enumerate(order, 1):
        ts, tenant, kind, msg, rid, rcpt, tags, n = raw[i]
        hist.rows.append((
            new_id, tenant, dt.datetime.fromtimestamp(ts, utc), kind, msg, rid or None,
            rcpt or None, tags, _detail(rng, kind, n),
        ))  # fmt: skip
        hist.counts[tenant] = hist.counts.get(tenant, 0) + 1
    return hist


COLUMNS = ["id", "tenant_id", "ts", "type", "message_id", "recipient_id", "recipient", "tags",
           "detail"]  # fmt: skip


async def load(url: str, hist: History) -> float:
    """COPY the history into ``events``; seconds taken (VACUUM ANALYZE included)."""
    import asyncpg
    from sqlalchemy.engine import make_url

    u = make_url(url)
    conn = await asyncpg.connect(
        host=u.host, port=u.port, user=u.username, password=u.password, database=u.database
    )
    t0 = time.perf_counter()
    try:
        await conn.execute("TRUNCATE events")
        chunk = 200_000
        for i in range(0, len(hist.rows), chunk):
            await conn.copy_records_to_table(
                "events", records=hist.rows[i : i + chunk], columns=COLUMNS
            )
        await conn.execute(
            "SELECT setval(pg_get_serial_sequence('events', 'id'), (SELECT max(id) FROM events))"
        )
        await conn.execute("VACUUM ANALYZE events")
    finally:
        await conn.close()
    return time.perf_counter() - t0


# ---------------------------------------------------------------- the cases


@dataclass
class Case:
    name: str
    params: dict[str, str]
    extra: bool = False  # a combination the API does not document: shown, not judged


def _ago(hist: History, seconds: float) -> str:
    return dt.datetime.fromtimestamp(hist.now - seconds, dt.UTC).isoformat()


def _at(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.UTC).isoformat()


def cases(hist: History, ids: list[int]) -> list[Case]:
    """Every documented filter, alone, with a cursor and with ``limit`` up to 1000, and
    the combinations docs/api.md shows. ``ids`` are the measured tenant's, in order."""
    from postwarden.control.schemas import encode_cursor

    def cursor(fraction: float) -> str:
        return encode_cursor(ids[min(len(ids) - 1, int(fraction * len(ids)))])

    mid = len(hist.campaign_tags) // 2
    campaign, begin = hist.campaign_tags[mid], hist.campaign_starts[mid]
    return [
        Case("no filter", {}),
        Case("limit=1000", {"limit": "1000"}),
        Case("cursor 50%, limit=1000", {"cursor": cursor(0.5), "limit": "1000"}),
        Case("cursor 99% (deep page)", {"cursor": cursor(0.99)}),
        Case("cursor at the end (polling)", {"cursor": cursor(1.0)}),
        Case("type=held (none here; the other tenant has some)", {"type": "held"}),
        Case("type=complained (rare)", {"type": "complained"}),
        Case("type=bounced", {"type": "bounced"}),
        Case("type=bounced, cursor 50%", {"type": "bounced", "cursor": cursor(0.5)}),
        Case("type=delivered, limit=1000", {"type": "delivered", "limit": "1000"}),
        Case("type=bounced, cursor at the end", {"type": "bounced", "cursor": cursor(1.0)}),
        Case("since=1h ago", {"since": _ago(hist, 3600)}),
        Case("since=1h ago, limit=1000", {"since": _ago(hist, 3600), "limit": "1000"}),
        Case("since=1d ago, limit=1000", {"since": _ago(hist, DAY), "limit": "1000"}),
        Case("since=7d ago", {"since": _ago(hist, 7 * DAY)}),
        Case("since=45d ago", {"since": _ago(hist, 45 * DAY)}),
        Case("since=45d ago, cursor 99%", {"since": _ago(hist, 45 * DAY), "cursor": cursor(0.99)}),
        Case("since=in a campaign's last minutes", {"since": _at(begin + 3300)}),
        Case("since=in the future", {"since": _ago(hist, -3600)}),
        Case("until=80d ago", {"until": _ago(hist, 80 * DAY)}),
        Case("until=80d ago, cursor 50%", {"until": _ago(hist, 80 * DAY), "cursor": cursor(0.5)}),
        Case(
            "since+until: one day 45d ago, limit=1000",
            {"since": _ago(hist, 45 * DAY), "until": _ago(hist, 44 * DAY), "limit": "1000"},
        ),
        Case(
            "type=bounced since=45d ago limit=500 (docs)",
            {"type": "bounced", "since": _ago(hist, 45 * DAY), "limit": "500"},
        ),
        Case("tag=orders", {"tag": "orders"}),
        Case("tag=orders, limit=1000", {"tag": "orders", "limit": "1000"}),
        Case("tag=orders, cursor 50% (docs)", {"tag": "orders", "cursor": cursor(0.5)}),
        Case("tag=invoice-overdue (rare)", {"tag": "invoice-overdue"}),
        Case(f"tag={campaign} (one campaign, mid-history)", {"tag": campaign}),
        Case("tag=nosuchtag (no match)", {"tag": "nosuchtag"}),
        Case("tag=orders since=1d ago", {"tag": "orders", "since": _ago(hist, DAY)}),
        Case("recipient=busy seed address", {"recipient": hist.busy_recipient}),
        Case(
            "recipient=busy seed, limit=1000",
            {"recipient": hist.busy_recipient, "limit": "1000"},
        ),
        Case("recipient=a customer", {"recipient": hist.some_recipient}),
        Case("recipient=nobody (no match)", {"recipient": "nobody@nowhere.example"}),
        Case("message_id", {"message_id": hist.some_message}),
        Case("tag=newsletter type=bounced", {"tag": "newsletter", "type": "bounced"}, True),
        Case(f"tag={campaign} type=delivered", {"tag": campaign, "type": "delivered"}, True),
        Case(
            "recipient=busy seed type=delivered since=7d",
            {"recipient": hist.busy_recipient, "type": "delivered", "since": _ago(hist, 7 * DAY)},
            True,
        ),
    ]


# ---------------------------------------------------------------- the run


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def prepare_tenants(url: str, names: dict[int, str]) -> str:
    """The tenants' rows and a read key of the measured one (tenant 1); its plaintext."""
    from postwarden.store.db import create_engine, sessionmaker
    from postwarden.store.models import ApiKey, Tenant
    from postwarden.store.secrets import new_api_key

    engine = create_engine(url)
    new = new_api_key()
    try:
        async with sessionmaker(engine)() as s:
            for tid, name in names.items():
                s.add(Tenant(id=tid, name=name))
            await s.flush()
            s.add(ApiKey(tenant_id=1, prefix=new.prefix, secret_hash=new.secret_hash,
                         name="bench", scopes="read"))  # fmt: skip
            await s.commit()
    finally:
        await engine.dispose()
    return new.plaintext


async def measure(args: argparse.Namespace, url: str, hist: History, scratch: Path) -> int:
    import httpx

    from postwarden.config import load_config
    from postwarden.control.app import create_app
    from postwarden.control.auth import Principal
    from postwarden.control.event_list import EventQuery, list_events
    from postwarden.control.plane import ControlPlane
    from postwarden.control.routing import Call
    from postwarden.dns.resolver import Resolver

    key = await prepare_tenants(url, {1: "measured", 2: "other"})
    cfg = load_config(overrides={
        "database": {"url": url},
        "control": {"encryption_key_file": str(scratch / "control.key"),
                    "rate_limit": 1e9, "rate_burst": 10**9},
    })  # fmt: skip
    plane = ControlPlane(cfg, Resolver(["127.0.0.1"]))
    await plane.start()
    app = create_app(lambda: b"", lambda: (True, {}), plane)
    principal = Principal(0, "bench", 1, "measured", frozenset({"read"}))
    clock = SqlClock(plane.engine.sync_engine)
    results: list[tuple[Case, int, dict[str, list[float]]]] = []
    transport = httpx.ASGITransport(app=app)
    headers = {"Authorization": f"Bearer {key}"}
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://bench") as client:
            for case in cases(hist, hist.ids):
                query = EventQuery.model_validate(case.params)
                call = Call(None, plane, principal, query=query)  # type: ignore[arg-type]
                times: dict[str, list[float]] = {"sql": [], "handler": [], "api": []}
                found = 0
                for rep in range(args.reps + args.warmup):
                    clock.last = 0.0
                    t0 = time.perf_counter()
                    page = await list_events(call)
                    t1 = time.perf_counter()
                    sql_s = clock.last
                    r = await client.get("/v1/events", params=case.params, headers=headers)
                    t2 = time.perf_counter()
                    if r.status_code != 200:
                        raise SystemExit(f"bench: {case.name}: {r.status_code} {r.text[:300]}")
                    data = json.loads(page.body)["data"]
                    found = len(data)
                    if [e["id"] for e in r.json()["data"]] != [e["id"] for e in data]:
                        raise SystemExit(f"bench: {case.name}: the API and the handler disagree")
                    if rep >= args.warmup:
                        times["sql"].append(sql_s * 1000)
                        times["handler"].append((t1 - t0) * 1000)
                        times["api"].append((t2 - t1) * 1000)
                if args.explain:
                    print(f"-- {case.name}")
                times["server"] = [await server_ms(plane, clock.statement, args.explain)]
                results.append((case, found, times))
    finally:
        await plane.stop()
    return report(results, args.budget_ms)


class SqlClock:
    """How long the driver took for the last statement (run, and its rows fetched and
    decoded: the asyncpg dialect fetches them all in execute), and that statement."""

    def __init__(self, engine: Any) -> None:
        from sqlalchemy import event

        self.last = 0.0
        self.statement: tuple[str, Any] = ("", ())
        event.listen(engine, "before_cursor_execute", self._before)
        event.listen(engine, "after_cursor_execute", self._after)

    def _before(self, _conn: Any, _cur: Any, _sql: str, _p: Any, ctx: Any, _many: bool) -> None:
        ctx._bench_t0 = time.perf_counter()

    def _after(self, _conn: Any, _cur: Any, sql: str, params: Any, ctx: Any, _m: bool) -> None:
        self.last = time.perf_counter() - ctx._bench_t0
        self.statement = (sql, params)


async def server_ms(plane: Any, statement: tuple[str, Any], show: bool) -> float:
    """PostgreSQL's own execution time for the statement (median of 5 EXPLAIN ANALYZE
    runs, same parameters); its plan printed when ``show``."""
    sql, params = statement
    runs = []
    async with plane.engine.connect() as conn:
        for _ in range(5):
            out = await conn.exec_driver_sql("EXPLAIN (ANALYZE, FORMAT JSON) " + sql, params)
            doc = out.scalar_one()
            runs.append(
                float((json.loads(doc) if isinstance(doc, str) else doc)[0]["Execution Time"])
            )
        if show:
            out = await conn.exec_driver_sql("EXPLAIN (ANALYZE, COSTS OFF) " + sql, params)
            print("\n".join(f"   {line}" for line in out.scalars()))
    return statistics.median(runs)


def report(results: list[tuple[Case, int, dict[str, list[float]]]], budget: float) -> int:
    """The table, and the last line; 0 when every judged case's p95 is in budget."""
    kinds = ("sql", "handler", "api")
    print(
        f"\n{'case (ms: server; p50/p95 of the rest)':52} {'rows':>5} {'server':>6} {'sql':>13}"
        f" {'handler':>13} {'api':>13}  p95<={budget:g}ms sql, api"
    )
    passed = {k: 0 for k in kinds}
    judged = 0
    for case, found, times in results:
        ok = {k: pct(times[k], 0.95) <= budget for k in kinds}
        cells = " ".join(
            f"{statistics.median(times[k]):6.1f}/{pct(times[k], 0.95):6.1f}" for k in kinds
        )
        verdict = " ".join("pass" if ok[k] else "FAIL" for k in ("sql", "api"))
        if case.extra:
            verdict = f"({verdict}: not judged)"
        else:
            judged += 1
            for k in kinds:
                passed[k] += ok[k]
        print(f"{case.name[:52]:52} {found:5d} {times['server'][0]:6.1f} {cells}  {verdict}")
    worst = {k: max(pct(t[k], 0.95) for c, _, t in results if not c.extra) for k in ("sql", "api")}
    print(
        f"events_query: cases={judged} sql_pass={passed['sql']} api_pass={passed['api']}"
        f" worst_sql_p95_ms={worst['sql']:.1f} worst_api_p95_ms={worst['api']:.1f}"
        f" budget_ms={budget:g}"
    )
    return 0 if passed["sql"] == judged else 1


async def sizes(url: str) -> str:
    from sqlalchemy import text

    from postwarden.store.db import create_engine

    engine = create_engine(url)
    try:
        async with engine.connect() as conn:
            rows = (await conn.execute(text(
                "SELECT relname, pg_total_relation_size(oid) FROM pg_class"
                " WHERE relname IN ('events', 'event_hours', 'event_tags') ORDER BY relname"
            ))).all()  # fmt: skip
    finally:
        await engine.dispose()
    return " ".join(f"{name}={size / 2**20:.0f}MB" for name, size in rows)


async def run(args: argparse.Namespace, url: str, scratch: Path) -> int:
    from postwarden.store.db import head_revision, upgrade

    t0 = time.perf_counter()
    hist = history(args.events, args.other)
    print(
        f"bench: history of {hist.counts.get(1, 0)} events (+{hist.counts.get(2, 0)} of another"
        f" tenant) made in {time.perf_counter() - t0:.1f}s"
    )
    await upgrade(url, args.load_revision or "head")
    print(f"bench: loaded in {await load(url, hist):.1f}s (COPY, then VACUUM ANALYZE)")
    # Millions of tuples would make every full collection of the cyclic GC a pause of
    # hundreds of milliseconds in the middle of the timings.
    hist.ids = [r[0] for r in hist.rows if r[1] == 1]
    hist.rows.clear()
    gc.collect()
    gc.freeze()
    if args.load_revision:
        t0 = time.perf_counter()
        await upgrade(url)
        print(f"bench: upgraded {args.load_revision} -> {head_revision()} in"
              f" {time.perf_counter() - t0:.1f}s")  # fmt: skip
        await load_analyze(url)
    print(f"bench: revision {head_revision()}; sizes {await sizes(url)}")
    return await measure(args, url, hist, scratch)


async def load_analyze(url: str) -> None:
    from sqlalchemy import text

    from postwarden.store.db import create_engine

    engine = create_engine(url, isolation_level="AUTOCOMMIT")
    try:
        async with engine.connect() as conn:
            await conn.execute(text("VACUUM ANALYZE"))
    finally:
        await engine.dispose()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", type=int, default=1_000_000, help="the measured tenant's")
    ap.add_argument("--other", type=int, default=500_000, help="another tenant's events")
    ap.add_argument("--reps", type=int, default=40, help="timed runs per case")
    ap.add_argument("--warmup", type=int, default=5, help="untimed runs per case first")
    ap.add_argument("--budget-ms", type=float, default=20.0)
    ap.add_argument("--db-url", default="", help="an empty PostgreSQL database to use")
    ap.add_argument("--load-revision", default="",
                    help="load the events at this revision, then upgrade (times it)")  # fmt: skip
    ap.add_argument("--explain", action="store_true", help="print each case's plan")
    args = ap.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="pw-evq-"))
    server = None
    try:
        if args.db_url:
            url = args.db_url
        else:
            server = start_postgres()
            asyncio.run(_sql(server.port, "postgres", "CREATE DATABASE events_bench"))
            url = server.url("events_bench")
        return asyncio.run(run(args, url, scratch))
    finally:
        if server is not None:
            from tests.pg import stop_server

            stop_server(server)
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
