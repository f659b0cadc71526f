"""Soak: Postwarden at a steady 1M messages/hour for a while; are memory, queue and
storage flat?

Not a test. Paced Python sessions submit at ``--rate`` messages/s (default 278, i.e.
1 000 000 an hour) for ``--minutes`` (default 15) to the 50 benchmark domains on three
``smtp-sink`` MX hosts; every 10 s the appliance's memory (PSS of its process tree),
its queue depth and what it has delivered are sampled. It prints the samples, then
``soak: rate=… delivered_rate=… rss_first_mb=… rss_last_mb=… queue_last=… p50_ms=…
p99_ms=… flat=yes|no`` (acceptance latency of every transaction at that rate):
flat means memory in the last quarter is within 10 % (or 20 MB) of the second quarter
and the queue does not grow. Storage is sampled too: the spool's event rows and index
files (every shard) and the control database's event rows and file. The run sets
short retention (``--retention``, default 2 minutes, for the spool's copied events
and the control database's events and messages) so that pruning happens within the
soak; ``storage_flat`` says whether rows and files stopped growing once the retention
horizon was reached (the last quarter within 10 % of the third; run for several times
the retention).

    python bench/soak.py [--minutes 15] [--rate 278] [--sessions 20] [--retention 120]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sqlite3
import statistics
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import aiosmtplib
from procstat import TreeMonitor
from run import (
    DOMAINS,
    SENDER,
    SINK_HOSTS,
    Postwarden,
    bench_world,
    body_of,
    domain,
    free_port_on_all,
    pct,
)

from peers import SinkFarm


def metric(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        total = 0.0
        for line in r.read().decode().splitlines():
            if line.startswith(name) and not line.startswith("#"):
                total += float(line.rsplit(" ", 1)[1])
        return total


def storage(scratch: Path) -> tuple[int, int, int, int]:
    """(spool event rows, spool index bytes, control event rows, control db bytes)."""

    def rows(db: Path, table: str) -> int:
        if not db.exists():
            return 0
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
        try:
            return int(con.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])
        except sqlite3.Error:
            return 0
        finally:
            con.close()

    def size(db: Path) -> int:
        return sum(p.stat().st_size for p in db.parent.glob(db.name + "*") if p.is_file())

    indexes = list((scratch / "spool").rglob("index.db"))
    control = scratch / "control.db"
    return (
        sum(rows(i, "events") for i in indexes),
        sum(size(i) for i in indexes),
        rows(control, "events"),
        size(control),
    )


async def paced_session(
    port: int,
    rate: float,
    until: float,
    offset: int,
    step: int,
    sent: list[int],
    latencies: list[float],
) -> None:
    body = {d: body_of(5_000, f"s@{domain(d)}", d) for d in range(DOMAINS)}
    interval = 1.0 / rate
    n = offset
    next_at = time.monotonic()
    async with aiosmtplib.SMTP(
        hostname="127.0.0.1", port=port, start_tls=False, timeout=120
    ) as smtp:
        while time.monotonic() < until:
            d = n % DOMAINS
            started = time.perf_counter()
            await smtp.sendmail(SENDER, [f"s{n}@{domain(d)}"], body[d])
            latencies.append(time.perf_counter() - started)
            sent[0] += 1
            n += step
            next_at += interval
            delay = next_at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)


async def main(args: argparse.Namespace) -> int:
    base, dns, key = await bench_world()
    scratch = base / "soak"
    scratch.mkdir()
    sink_port = free_port_on_all(SINK_HOSTS)
    sinks = SinkFarm(SINK_HOSTS, sink_port)
    sinks.start(scratch)
    pw = Postwarden(scratch, dns, sink_port, key)
    keep = f"{args.retention:g}s"
    for name, value in (
        ("SPOOL__EVENT_RETENTION", keep),
        ("SPOOL__UPKEEP_INTERVAL", "5s"),
        ("DATABASE__EVENT_RETENTION", keep),
        ("DATABASE__MESSAGE_RETENTION", keep),
        ("DATABASE__PRUNE_INTERVAL", "20s"),
    ):
        os.environ[f"POSTWARDEN_{name}"] = value
    samples: list[tuple[float, float, float, float]] = []
    stored: list[tuple[int, int, int, int]] = []
    sent = [0]
    latencies: list[float] = []
    try:
        pid = await pw.start()
        monitor = TreeMonitor(pid, interval=1.0)
        monitor.start()
        t0 = time.monotonic()
        until = t0 + args.minutes * 60
        per_session = args.rate / args.sessions
        load = asyncio.gather(
            *(
                paced_session(pw.port, per_session, until, i, args.sessions, sent, latencies)
                for i in range(args.sessions)
            )
        )
        print(
            f"soak: {args.minutes} min at {args.rate}/s over {args.sessions} sessions", flush=True
        )
        print(
            f"{'t s':>6} {'sent':>8} {'delivered':>10} {'queue':>7} {'PSS MB':>7} "
            f"{'spool ev':>9} {'index MB':>8} {'ctl ev':>8} {'ctl MB':>7}",
            flush=True,
        )
        while not load.done():
            await asyncio.wait([load], timeout=10)
            delivered = await asyncio.to_thread(
                metric, pw.control, "postwarden_recipients_delivered_total"
            )
            queue = await asyncio.to_thread(metric, pw.control, "postwarden_queue_recipients")
            rss = (monitor.last.rss_bytes if monitor.last else 0) / 2**20
            t = time.monotonic() - t0
            samples.append((t, delivered, queue, rss))
            st = await asyncio.to_thread(storage, scratch)
            stored.append(st)
            print(
                f"{t:6.0f} {sent[0]:8d} {delivered:10.0f} {queue:7.0f} {rss:7.0f} "
                f"{st[0]:9d} {st[1] / 2**20:8.1f} {st[2]:8d} {st[3] / 2**20:7.1f}",
                flush=True,
            )
        load.result()
        await monitor.stop()
    finally:
        await pw.stop()
        sinks.stop()
        await dns.stop()
        shutil.rmtree(base, ignore_errors=True)
    if len(samples) < 4:
        print("soak: too short to judge")
        return 1
    q = len(samples) // 4
    second = statistics.mean(s[3] for s in samples[q : 2 * q])
    last = statistics.mean(s[3] for s in samples[-q:])
    queue_second = statistics.mean(s[2] for s in samples[q : 2 * q])
    queue_last = statistics.mean(s[2] for s in samples[-q:])
    flat_mem = last <= max(second * 1.10, second + 20)
    flat_queue = queue_last <= max(queue_second * 1.5, 100)
    duration = samples[-1][0]
    grown = [
        statistics.mean(x[i] for x in stored[-q:])
        > 1.10 * max(1, statistics.mean(x[i] for x in stored[2 * q : 3 * q]))
        for i in range(4)
    ]
    print(
        f"soak: rate={sent[0] / duration:.1f} delivered_rate={samples[-1][1] / duration:.1f} "
        f"rss_first_mb={second:.0f} rss_last_mb={last:.0f} queue_last={queue_last:.0f} "
        f"p50_ms={pct(latencies, 0.5) * 1e3:.1f} p99_ms={pct(latencies, 0.99) * 1e3:.1f} "
        f"flat={'yes' if flat_mem and flat_queue else 'no'} "
        f"spool_events_last={stored[-1][0]} control_events_last={stored[-1][2]} "
        f"storage_flat={'no' if any(grown) else 'yes'}"
    )
    return 0


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=15)
    ap.add_argument("--rate", type=float, default=278)
    ap.add_argument("--sessions", type=int, default=20)
    ap.add_argument("--retention", type=float, default=120, help="seconds of events kept")
    sys.exit(asyncio.run(main(ap.parse_args())))
