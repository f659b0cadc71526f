"""`postwarden serve` with 2 workers: one session limit per client address for the
appliance (submission and the inbound MX), and one AUTH lockout, whichever worker
takes each connection."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import ssl
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest

from postwarden.lab import Lab
from postwarden.mta.auth import hash_password
from tests.conftest import free_port
from tests.mta.test_auth_guard import auth_plain
from tests.queue.test_durability import serve
from tests.test_appliance import http_get, wait_log


async def greetings(port: int, n: int) -> tuple[list[bytes], list[asyncio.StreamWriter]]:
    """Open ``n`` connections at once: the reply code each was greeted with, and the
    connections (left open)."""
    writers: list[asyncio.StreamWriter] = []

    async def one() -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writers.append(writer)
        return (await asyncio.wait_for(reader.readline(), 30))[:3]

    return list(await asyncio.gather(*(one() for _ in range(n)))), writers


async def worker_pids(supervisor: int) -> list[int]:
    pids = []
    for index in (0, 1):
        proc = await asyncio.create_subprocess_exec(
            "pgrep", "-P", str(supervisor), "-f", f"postwarden.cli worker --index {index}",
            stdout=subprocess.PIPE,
        )  # fmt: skip
        out, _ = await proc.communicate()
        pids.append(int(out.split()[0]))
    return pids


async def split_greetings(port: int, n: int, workers: list[int]) -> list[bytes]:
    """Half of ``n`` connections to each worker: while one is stopped (SIGSTOP) the
    other accepts all (left to the kernel, a burst goes to whichever wakes first)."""
    codes: list[bytes] = []
    writers: list[asyncio.StreamWriter] = []
    try:
        for stopped, count in ((workers[1], n // 2), (workers[0], n - n // 2)):
            os.kill(stopped, signal.SIGSTOP)
            try:
                got, conns = await greetings(port, count)
            finally:
                os.kill(stopped, signal.SIGCONT)
            codes += got
            writers += conns
        return codes
    finally:
        for w in writers:
            w.close()


def no_verify() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


@pytest.mark.timeout(300)
async def test_two_workers_keep_one_session_limit_and_one_auth_lockout(
    tmp_path: Path, lab: Lab, subprocess_config: Any
) -> None:
    limit, inbound_limit, failures = 40, 10, 6
    inbound_port = free_port()
    users = [{"username": "app1", "password_hash": hash_password("right")}]
    config, port = subprocess_config(
        {
            "server": {"workers": 2},
            "smtp": {
                "max_sessions_per_ip": limit,
                "trusted_networks": ["10.0.0.0/8"],
                "users": users,
                "auth_lockout_failures": failures,
            },
            "inbound": {
                "listen": [f"127.0.0.1:{inbound_port}"],
                "max_sessions_per_ip": inbound_limit,
                "domains": ["bounces.test"],
            },
        }
    )
    control = tomllib.loads(config.read_text())["control"]["listen"]
    log = tmp_path / "serve.log"
    async with serve([], config, port, log) as proc:
        await wait_log(log, r"worker=0 event=started", 60)
        await wait_log(log, r"worker=1 event=started", 60)
        workers = await worker_pids(proc.pid)

        # Each worker takes half, more than its share: the appliance greets `limit`.
        codes = await split_greetings(port, limit + 30, workers)
        assert codes.count(b"220") == limit and codes.count(b"421") == 30, codes
        codes = await split_greetings(inbound_port, inbound_limit + 16, workers)
        assert codes.count(b"220") == inbound_limit and codes.count(b"421") == 16, codes

        # AUTH failures from one address, half on each worker (neither sees enough
        # alone): the appliance counts them together, and the lockout is the
        # appliance's, whichever worker takes the next connection.
        got: list[int] = []
        for stopped in (workers[1], workers[0]):
            os.kill(stopped, signal.SIGSTOP)
            try:
                got += await asyncio.gather(
                    *(
                        auth_plain("127.0.0.1", port, "app1", f"wrong{i}", "127.0.0.1")
                        for i in range(failures // 2)
                    )
                )
            finally:
                os.kill(stopped, signal.SIGCONT)
        assert sorted(got) == [421] + [535] * (failures - 1), got
        for stopped in (workers[1], workers[0]):
            os.kill(stopped, signal.SIGSTOP)
            try:
                assert await auth_plain("127.0.0.1", port, "app1", "right", "127.0.0.1") == 421
            finally:
                os.kill(stopped, signal.SIGCONT)
        text = log.read_text()
        for w in ("0", "1"):
            assert re.search(rf"worker={w} .*event=auth_failed", text), w
        _, metrics = http_get(f"http://{control}/metrics")
        assert "postwarden_auth_lockouts_total 1.0" in metrics
        # The failure that started the lockout was answered 421 too.
        assert 'postwarden_smtp_rejected_total{reason="auth_locked"} 3.0' in metrics
        assert 'postwarden_smtp_rejected_total{reason="too_many_sessions"} 30.0' in metrics
        assert 'postwarden_session_guard_local_total{check="sessions"} 0.0' in metrics
