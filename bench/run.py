"""Rough end-to-end benchmark: Postwarden (a child process) → lab sink MX hosts.

Not a test. Starts the lab (DNS + 3 sink MX hosts) in this process, runs
``postwarden serve`` in a child process with DKIM rsa-sha256 signing and normal fsync
durability, drives N messages of ~5 KB over S concurrent reused SMTP sessions to 50
recipient domains, and prints acceptance and end-to-end rates and acceptance latency
percentiles. The side-by-side run against Postfix comes with the throughput issue.

    python bench/run.py [--messages 5000] [--sessions 20] [--size 5000]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiosmtplib

from postwarden.lab import Lab
from postwarden.mta.dkim import generate_key, load_key


def free_port() -> int:
    with contextlib.closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def main(args: argparse.Namespace) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="pw-bench-"))
    async with Lab() as lab:
        for i in range(50):
            lab.add_domain(f"d{i}.bench.test", hosts=[i % 3])
        key_file = tmp / "rsa.pem"
        key_file.write_bytes(generate_key("rsa-sha256"))
        key = load_key("sender.bench.test", "b1", key_file, "rsa-sha256")
        lab.dns.add("b1._domainkey.sender.bench.test", "TXT", key.public_txt())
        port, ctl = free_port(), free_port()
        cfg = tmp / "bench.toml"
        cfg.write_text(f"""
[server]
hostname = "bench.postwarden.test"
[smtp]
listen = ["127.0.0.1:{port}"]
[control]
listen = "127.0.0.1:{ctl}"
[spool]
path = "{tmp / "spool"}"
[dns]
nameservers = ["{lab.nameserver}"]
[delivery]
mx_port = {lab.mx_port}
[[dkim.keys]]
domain = "sender.bench.test"
selector = "b1"
key_file = "{key_file}"
""")
        proc = subprocess.Popen(
            [sys.executable, "-m", "postwarden.cli", "serve", "--config", str(cfg)],
            stderr=open(tmp / "serve.log", "wb"),
        )
        try:
            for _ in range(200):
                with contextlib.suppress(OSError):
                    socket.create_connection(("127.0.0.1", port), 0.2).close()
                    break
                await asyncio.sleep(0.05)
            body = b"x" * 76 + b"\r\n"
            pad = body * max(1, args.size // len(body))
            latencies: list[float] = []
            counter = iter(range(args.messages))
            t0 = time.perf_counter()

            async def session() -> None:
                async with aiosmtplib.SMTP(
                    hostname="127.0.0.1", port=port, start_tls=False, timeout=60
                ) as smtp:
                    for n in counter:
                        rcpt = f"u{n}@d{n % 50}.bench.test"
                        msg = (
                            f"From: b@sender.bench.test\r\nTo: {rcpt}\r\nSubject: bench {n}\r\n\r\n"
                        ).encode() + pad
                        s = time.perf_counter()
                        await smtp.sendmail("b@sender.bench.test", [rcpt], msg)
                        latencies.append(time.perf_counter() - s)

            await asyncio.gather(*(session() for _ in range(args.sessions)))
            t_accept = time.perf_counter() - t0
            await lab.wait_for_messages(args.messages, timeout=600)
            t_e2e = time.perf_counter() - t0
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
    n = args.messages
    print(
        f"postwarden: messages={n} size={len(pad)}B sessions={args.sessions} "
        f"dkim=rsa-sha256 fsync=on"
    )
    print(
        f"  accept   {n / t_accept:8.1f} msgs/s   e2e {n / t_e2e:8.1f} msgs/s "
        f"({n / t_e2e * 3600 / 1e6:.2f}M/hour)"
    )
    print(
        f"  accept latency ms: p50={pct(latencies, 0.5) * 1e3:.1f} "
        f"p95={pct(latencies, 0.95) * 1e3:.1f} p99={pct(latencies, 0.99) * 1e3:.1f} "
        f"mean={statistics.mean(latencies) * 1e3:.1f}"
    )
    print(
        f"bench: accept_rate={n / t_accept:.1f} e2e_rate={n / t_e2e:.1f} "
        f"p99_ms={pct(latencies, 0.99) * 1e3:.1f}"
    )
    if os.environ.get("BENCH_KEEP") != "1":
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--messages", type=int, default=5000)
    ap.add_argument("--sessions", type=int, default=20)
    ap.add_argument("--size", type=int, default=5000)
    ap.add_argument("--profile", default="default", help="reserved for the Postfix bench")
    asyncio.run(main(ap.parse_args()))
