"""Side-by-side benchmark: Postwarden and Debian's Postfix under the same load.

Not a test. One run, per repetition and per MTA:

* three ``smtp-sink`` processes (Postfix's fast sink) on 127.0.2.1-3 are the MX hosts
  of 50 recipient domains;
* the MTA under test starts fresh: Postwarden (``postwarden serve``, DKIM rsa-sha256
  2048-bit signing on, fsync before every ``250``, MX lookups against a DNS server in
  this process) or a private Postfix instance as Debian installs it (relaying through
  a transport map, no DNS, no signing);
* 20 concurrent reused sessions submit the messages: 19 are Postfix's ``smtp-source``,
  the 20th a small Python client that times each transaction (MAIL FROM to the
  ``250`` after DATA) for the latency percentiles;
* acceptance ends when every client is done; end to end when the MTA has delivered
  every recipient (Postwarden's delivered counter, Postfix's ``status=sent`` log
  lines); acceptance-to-delivery comes from Postwarden's event log and Postfix's
  ``delay=``; CPU and peak memory (PSS summed over processes) are those of the MTA's whole process
  tree.

Then, for Postwarden only, the memory run: 200 000 messages queued and deferred (their
destination refuses connections) and the appliance's peak RSS while it works through
them. Medians of the repetitions are printed, then the ratios, then one line
``bench: accept_ratio=… e2e_ratio=… p99_ms=… rss_mb=…``.

    python bench/run.py [--profile default|large] [--reps 3] [--mta both|postwarden|postfix]
    python bench/run.py --soak-minutes 15        # make bench-soak
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import aiosmtplib
from procstat import TreeMonitor

from peers import (
    PrivatePostfix,
    SinkFarm,
    ensure_postfix,
    smtp_source_argv,
)
from postwarden.lab.dnsserver import DNSServer
from postwarden.mta.dkim import generate_key, load_key

PROFILES = {
    "default": {"messages": 20_000, "size": 5_000},
    "large": {"messages": 5_000, "size": 100_000},
}
SESSIONS = 20
DOMAINS = 50
SINK_HOSTS = ["127.0.2.1", "127.0.2.2", "127.0.2.3"]
DOWN_HOST = "127.0.2.250"  # nothing listens there: the memory run's dead destination
SENDER = "bench@sender.bench.test"
CHUNK = 200  # messages per smtp-source invocation (one reused connection, one domain)


def free_port(host: str = "127.0.0.1") -> int:
    with contextlib.closing(socket.socket()) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def free_port_on_all(hosts: list[str]) -> int:
    for _ in range(50):
        port = free_port(hosts[0])
        try:
            for h in hosts[1:]:
                with contextlib.closing(socket.socket()) as s:
                    s.bind((h, port))
            return port
        except OSError:
            continue
    raise RuntimeError("no port free on all sink addresses")


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def domain(i: int) -> str:
    return f"d{i}.bench.test"


@dataclass
class Result:
    mta: str
    messages: int
    accept_s: float
    e2e_s: float
    latencies: list[float]
    delays: list[float]
    cpu_s: float
    peak_rss: int
    notes: list[str] = field(default_factory=list)

    @property
    def accept_rate(self) -> float:
        return self.messages / self.accept_s

    @property
    def e2e_rate(self) -> float:
        return self.messages / self.e2e_s


# ---------------------------------------------------------------------- the MTAs


class Postwarden:
    name = "postwarden"

    def __init__(self, scratch: Path, dns: DNSServer, sink_port: int, key_file: Path) -> None:
        self.scratch = scratch
        self.port = free_port()
        self.control = free_port()
        self.dns = dns
        self.sink_port = sink_port
        self.key_file = key_file
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def spool(self) -> Path:
        return self.scratch / "spool"

    def config(self, extra: str = "") -> Path:
        path = self.scratch / "postwarden.toml"
        path.write_text(
            f"""
[server]
hostname = "postwarden.bench.test"
[smtp]
listen = ["127.0.0.1:{self.port}"]
[control]
listen = "127.0.0.1:{self.control}"
encryption_key_file = "{self.scratch / "control.key"}"
[database]
url = "sqlite+aiosqlite:///{self.scratch / "control.db"}"
auto_upgrade = true
[spool]
path = "{self.spool}"
[dns]
nameservers = ["{self.dns.nameserver}"]
[delivery]
mx_port = {self.sink_port}
allowed_private_networks = ["127.0.0.0/8"]
[[dkim.keys]]
domain = "sender.bench.test"
selector = "bench"
key_file = "{self.key_file}"
algorithm = "rsa-sha256"
{extra}
"""
        )
        return path

    async def start(self, extra: str = "") -> int:
        cfg = self.config(extra)
        log = (self.scratch / "serve.log").open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "postwarden.cli", "serve", "--config", str(cfg)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "POSTWARDEN_SERVER__LOG_LEVEL": "warning"},
        )
        await wait_port(self.port, self.proc)
        await wait_port(self.control, self.proc)
        return self.proc.pid

    def delivered(self) -> int:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.control}/metrics", timeout=5) as r:
            for line in r.read().decode().splitlines():
                if line.startswith("postwarden_recipients_delivered_total "):
                    return int(float(line.split()[1]))
        return 0

    def delays(self) -> list[float]:
        from postwarden.queue.shards import shard_paths

        out: list[float] = []
        for shard in shard_paths(self.spool):  # one per worker
            db = sqlite3.connect(shard / "index.db")
            try:
                rows = db.execute(
                    "SELECT d.ts - a.ts FROM events d JOIN events a"
                    " ON a.rcpt_id = d.rcpt_id AND a.msg_id = d.msg_id AND a.type = 'accepted'"
                    " WHERE d.type = 'delivered'"
                ).fetchall()
            finally:
                db.close()
            out += [r[0] for r in rows]
        return out

    async def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.to_thread(self.proc.wait, 60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Postfix:
    name = "postfix"

    def __init__(self, scratch: Path, sink_port: int, domains: int) -> None:
        self.port = free_port()
        routes = {domain(i): f"{SINK_HOSTS[i % 3]}:{sink_port}" for i in range(domains)}
        self.pf = PrivatePostfix(scratch / "postfix", self.port, routes)

    async def start(self) -> int:
        await asyncio.to_thread(self.pf.setup)
        await asyncio.to_thread(self.pf.start)
        assert self.pf.proc is not None
        return self.pf.proc.pid

    def delivered(self) -> int:
        return self.pf.maillog_text().count("status=sent")

    def delays(self) -> list[float]:
        return self.pf.delivery_delays()

    async def stop(self) -> None:
        await asyncio.to_thread(self.pf.stop)


async def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}")
        try:
            _, w = await asyncio.open_connection("127.0.0.1", port)
            w.close()
            return
        except OSError:
            await asyncio.sleep(0.05)
    raise RuntimeError(f"port {port} did not open")


# ---------------------------------------------------------------------- the load


def split_load(messages: int) -> tuple[list[list[tuple[str, int]]], list[str]]:
    """Chunks (domain, count) for each of the 19 smtp-source sessions; the Python
    session's recipient list. Every domain gets its share."""
    per_session = messages // SESSIONS
    extra = messages - per_session * SESSIONS
    plans: list[list[tuple[str, int]]] = []
    slot = 0
    for w in range(SESSIONS - 1):
        left = per_session + (1 if w < extra else 0)
        chunks = []
        while left > 0:
            n = min(CHUNK, left)
            chunks.append((domain(slot % DOMAINS), n))
            slot += 1
            left -= n
        plans.append(chunks)
    n_py = messages - sum(n for plan in plans for _, n in plan)
    py_rcpts = [f"t{i}@{domain(i % DOMAINS)}" for i in range(n_py)]
    return plans, py_rcpts


async def smtp_source_session(port: int, plan: list[tuple[str, int]], size: int) -> None:
    for dom, n in plan:
        argv = smtp_source_argv(
            f"127.0.0.1:{port}", messages=n, size=size, sender=SENDER, rcpt=f"u@{dom}"
        )
        proc = await asyncio.create_subprocess_exec(
            *argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        _, err = await proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"smtp-source failed: {err.decode()[-500:]}")


def body_of(size: int, rcpt: str, n: int) -> bytes:
    head = (
        f"From: <{SENDER}>\r\nTo: <{rcpt}>\r\nSubject: bench {n}\r\n"
        f"Message-Id: <py{n}.{time.time_ns()}@load.bench.test>\r\n\r\n"
    ).encode()
    line = b"La la la la la la la la la la la la la la la la la la la la la la la la la\r\n"
    return head + line * max(1, (size - len(head)) // len(line))


async def timed_session(port: int, rcpts: list[str], size: int, out: list[float]) -> None:
    async with aiosmtplib.SMTP(
        hostname="127.0.0.1", port=port, start_tls=False, timeout=120
    ) as smtp:
        for n, rcpt in enumerate(rcpts):
            msg = body_of(size, rcpt, n)
            started = time.perf_counter()
            await smtp.sendmail(SENDER, [rcpt], msg)
            out.append(time.perf_counter() - started)


async def run_load(port: int, messages: int, size: int) -> tuple[float, list[float]]:
    plans, py_rcpts = split_load(messages)
    latencies: list[float] = []
    t0 = time.perf_counter()
    await asyncio.gather(
        *(smtp_source_session(port, plan, size) for plan in plans),
        timed_session(port, py_rcpts, size, latencies),
    )
    return time.perf_counter() - t0, latencies


# ---------------------------------------------------------------------- one run


async def one_run(mta: Any, messages: int, size: int, timeout: float = 900) -> Result:
    pid = await mta.start()
    # Sampled once a second: a walk of /proc costs a few ms of this process's GIL, which
    # the timed session shares.
    monitor = TreeMonitor(pid, interval=1.0)
    monitor.start()
    try:
        t0 = time.perf_counter()
        accept_s, latencies = await run_load(mta.port, messages, size)
        deadline = time.monotonic() + timeout
        while (done := await asyncio.to_thread(mta.delivered)) < messages:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{mta.name}: {done}/{messages} delivered in {timeout} s")
            await asyncio.sleep(0.05)
        e2e_s = time.perf_counter() - t0
        await monitor.stop()
        delays = await asyncio.to_thread(mta.delays)
    finally:
        await mta.stop()
    return Result(
        mta.name, messages, accept_s, e2e_s, latencies, delays, monitor.cpu_s, monitor.peak_rss
    )


async def memory_run(
    scratch: Path, dns: DNSServer, sink_port: int, key: Path, n: int
) -> dict[str, Any]:
    """Peak RSS of Postwarden with ``n`` messages queued for a destination that is down."""
    from postwarden.queue.spool import Spool
    from postwarden.values import Envelope

    spool_dir = scratch / "spool"
    spool = Spool(spool_dir, fsync=False)
    await spool.open()
    body = body_of(2_000, "x@down.bench.test", 0)
    t0 = time.perf_counter()
    pending: set[asyncio.Future[Any]] = set()
    for i in range(n):
        env = Envelope(mail_from=SENDER, rcpt_tos=[f"r{i}@down.bench.test"])
        pending.add(asyncio.ensure_future(spool.store(env, body)))
        if len(pending) >= 2000:
            _done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
    await asyncio.gather(*pending)
    await spool.close()
    fill_s = time.perf_counter() - t0
    dns.add("down.bench.test", "MX", "10 down.lab.test")
    dns.add("down.lab.test", "A", DOWN_HOST)
    pw = Postwarden(scratch, dns, sink_port, key)
    pid = await pw.start('[queue]\nretry_initial = "1h"\n')
    monitor = TreeMonitor(pid, interval=0.5)
    monitor.start()
    attempted = 0
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            await asyncio.sleep(2)
            attempted = await asyncio.to_thread(deferred_count, spool_dir)
            if attempted >= n:
                break
        await asyncio.sleep(3)  # steady state with everything deferred
        await monitor.stop()
    finally:
        await pw.stop()
    return {"queued": n, "fill_s": fill_s, "deferred": attempted, "peak_rss": monitor.peak_rss}


def deferred_count(spool_dir: Path) -> int:
    db = sqlite3.connect(spool_dir / "index.db", timeout=30)
    try:
        return int(
            db.execute("SELECT COUNT(*) FROM recipients WHERE state = 'deferred'").fetchone()[0]
        )
    finally:
        db.close()


# ---------------------------------------------------------------------- report


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def summarize(results: list[Result]) -> dict[str, float]:
    return {
        "accept_rate": median([r.accept_rate for r in results]),
        "e2e_rate": median([r.e2e_rate for r in results]),
        "p50_ms": median([pct(r.latencies, 0.50) * 1e3 for r in results]),
        "p95_ms": median([pct(r.latencies, 0.95) * 1e3 for r in results]),
        "p99_ms": median([pct(r.latencies, 0.99) * 1e3 for r in results]),
        "a2d_p50_s": median([pct(r.delays, 0.50) for r in results]),
        "a2d_p95_s": median([pct(r.delays, 0.95) for r in results]),
        "rss_mb": median([r.peak_rss / 2**20 for r in results]),
        "cpu_s": median([r.cpu_s for r in results]),
    }


def print_table(rows: dict[str, dict[str, float]]) -> None:
    cols = [
        ("accept_rate", "accept msg/s", "{:.0f}"),
        ("e2e_rate", "e2e msg/s", "{:.0f}"),
        ("p50_ms", "p50 ms", "{:.1f}"),
        ("p95_ms", "p95 ms", "{:.1f}"),
        ("p99_ms", "p99 ms", "{:.1f}"),
        ("a2d_p50_s", "a→d p50 s", "{:.2f}"),
        ("a2d_p95_s", "a→d p95 s", "{:.2f}"),
        ("rss_mb", "peak PSS MB", "{:.0f}"),
        ("cpu_s", "CPU s", "{:.1f}"),
    ]
    print(f"{'':<12}" + "".join(f"{title:>13}" for _, title, _ in cols))
    for name, s in rows.items():
        print(f"{name:<12}" + "".join(f"{fmt.format(s[key]):>13}" for key, _, fmt in cols))


def with_sinks(scratch: Path) -> tuple[Path, SinkFarm]:
    """A new scratch directory others may write in, and sinks started on the three
    sink addresses (one port) with their logs there."""
    scratch.mkdir()
    os.chmod(scratch, 0o755)  # smtp-sink and Postfix drop to other users
    sinks = SinkFarm(SINK_HOSTS, free_port_on_all(SINK_HOSTS))
    sinks.start(scratch)
    return scratch, sinks


async def bench_world() -> tuple[Path, DNSServer, Path]:
    """Scratch directory, a DNS server publishing the 50 domains' MX, and a DKIM key."""
    base = Path(tempfile.mkdtemp(prefix="pw-bench-"))
    os.chmod(base, 0o755)  # smtp-sink and Postfix drop to other users
    dns = DNSServer("127.0.1.53")
    await dns.start()
    for i in range(DOMAINS):
        dns.add(domain(i), "MX", f"10 mx{i % 3 + 1}.sink.bench.test", ttl=3600)
    for i, host in enumerate(SINK_HOSTS):
        dns.add(f"mx{i + 1}.sink.bench.test", "A", host, ttl=3600)
    key = base / "dkim-rsa.pem"
    key.write_bytes(generate_key("rsa-sha256"))
    dns.add("bench._domainkey.sender.bench.test", "TXT",
            load_key("sender.bench.test", "bench", key, "rsa-sha256").public_txt())  # fmt: skip
    return base, dns, key


async def main(args: argparse.Namespace) -> int:
    prof = PROFILES[args.profile]
    messages = args.messages or prof["messages"]
    size = prof["size"]
    if args.mta in ("both", "postfix"):
        ensure_postfix()
    base, dns, key = await bench_world()
    print(
        f"bench: profile={args.profile} messages={messages} size={size}B sessions={SESSIONS} "
        f"(19 smtp-source + 1 timed Python) domains={DOMAINS} sinks={len(SINK_HOSTS)} "
        f"reps={args.reps}; postwarden: DKIM rsa-sha256 2048, fsync on; postfix: as installed",
        flush=True,
    )
    results: dict[str, list[Result]] = {"postwarden": [], "postfix": []}
    mtas = ["postwarden", "postfix"] if args.mta == "both" else [args.mta]
    try:
        for rep in range(args.reps):
            for name in mtas if rep % 2 == 0 else reversed(mtas):
                scratch, sinks = with_sinks(base / f"{name}-{rep}")
                sink_port = sinks.port
                try:
                    mta: Any = (
                        Postwarden(scratch, dns, sink_port, key)
                        if name == "postwarden"
                        else Postfix(scratch, sink_port, DOMAINS)
                    )
                    r = await one_run(mta, messages, size)
                finally:
                    sinks.stop()
                results[name].append(r)
                print(
                    f"  rep {rep + 1} {name:<10} accept {r.accept_rate:7.1f}/s  "
                    f"e2e {r.e2e_rate:7.1f}/s  p99 {pct(r.latencies, 0.99) * 1e3:6.1f} ms  "
                    f"cpu {r.cpu_s:6.1f} s  rss {r.peak_rss / 2**20:5.0f} MB",
                    flush=True,
                )
        mem: dict[str, Any] | None = None
        if args.memory_messages and "postwarden" in mtas:
            scratch = base / "memory"
            scratch.mkdir()
            mem = await memory_run(scratch, dns, free_port(), key, args.memory_messages)
            print(
                f"  memory run: {mem['queued']} queued (filled in {mem['fill_s']:.0f} s), "
                f"{mem['deferred']} deferred, peak RSS {mem['peak_rss'] / 2**20:.0f} MB",
                flush=True,
            )
    finally:
        await dns.stop()
        if os.environ.get("BENCH_KEEP") != "1":
            shutil.rmtree(base, ignore_errors=True)
    rows = {name: summarize(rs) for name, rs in results.items() if rs}
    print()
    print_table(rows)
    pw, pf = rows.get("postwarden"), rows.get("postfix")
    accept_ratio = pw["accept_rate"] / pf["accept_rate"] if pw and pf else float("nan")
    e2e_ratio = pw["e2e_rate"] / pf["e2e_rate"] if pw and pf else float("nan")
    print(f"\nratios postwarden/postfix: accept {accept_ratio:.2f}  e2e {e2e_ratio:.2f}")
    rss_mb = mem["peak_rss"] / 2**20 if mem else float("nan")
    p99 = pw["p99_ms"] if pw else float("nan")
    print(
        f"bench: accept_ratio={accept_ratio:.2f} e2e_ratio={e2e_ratio:.2f} "
        f"p99_ms={p99:.1f} rss_mb={rss_mb:.0f}"
    )
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {"rows": rows, "memory": mem, "accept_ratio": accept_ratio, "e2e_ratio": e2e_ratio},
                indent=1,
            )
        )
    return 0


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", choices=sorted(PROFILES), default="default")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--mta", choices=["both", "postwarden", "postfix"], default="both")
    ap.add_argument("--messages", type=int, default=0, help="override the profile's count")
    ap.add_argument("--memory-messages", type=int, default=200_000,
                    help="messages queued for the memory run (0 skips it)")  # fmt: skip
    ap.add_argument("--json", help="also write the medians to this file")
    sys.exit(asyncio.run(main(ap.parse_args())))
