"""Durable before acknowledged, shown from the outside.

* strace: every ``250`` to DATA is written after the fsyncs that cover that message
  (its segment record and the index WAL) have *completed*.
* crash: SIGKILL the appliance while it accepts and delivers a few thousand messages,
  restart it, and check every acknowledged message reached a lab MX; duplicates are
  counted and bounded by what the spool reports as recovered in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest

from postwarden.lab import Lab
from tests.peers import require_binary

# Timing-sensitive (rates, group commit): `make test` runs these at normal CPU priority,
# three at a time, alongside the rest at the lowest.
pytestmark = pytest.mark.serial

PY = sys.executable


async def wait_port(port: int, proc: asyncio.subprocess.Process, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.returncode is not None:
            raise AssertionError(f"appliance exited early with {proc.returncode}")
        try:
            _, w = await asyncio.open_connection("127.0.0.1", port)
            w.close()
            return
        except OSError:
            await asyncio.sleep(0.05)
    raise AssertionError("appliance did not open its port")


@contextlib.asynccontextmanager
async def serve(
    argv_prefix: list[str], config: Path, port: int, log: Path, *args: str
) -> AsyncIterator[asyncio.subprocess.Process]:
    """``postwarden serve [ARGS]`` in a process group of its own, until ``port`` (any
    TCP port it opens: SMTP, or the control listener) answers; stopped on exit."""
    with log.open("ab") as fh:
        proc = await asyncio.create_subprocess_exec(
            *argv_prefix,
            PY,
            "-m",
            "postwarden.cli",
            "serve",
            *args,
            "--config",
            str(config),
            stdout=fh,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            # Its own process group: with a tracer in front (strace), the signal must
            # reach the appliance too, or strace detaches and leaves it running.
            start_new_session=True,
        )
    try:
        await wait_port(port, proc)
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), 20)
        except TimeoutError:
            proc.kill()
            await proc.wait()
        # Whatever is left of the group (the appliance under a tracer) goes too.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


# ---------------------------------------------------------------------- strace

_LINE = re.compile(r"^(\d+)\s+(.*)$")
_CALL = re.compile(r"^(\w+)\((\d+)<([^>]*)>")


def parse_trace(text: str) -> list[tuple[int, str, str, str, str]]:
    """(position, pid, syscall, fd path, line) for each syscall *completion*.

    A call split by ``-f`` into ``<unfinished ...>`` and ``<... x resumed>`` counts
    where it resumed, i.e. when it returned.
    """
    pending: dict[str, tuple[str, str, str]] = {}
    out = []
    for pos, raw in enumerate(text.splitlines()):
        m = _LINE.match(raw)
        if not m:
            continue
        pid, rest = m.groups()
        if rest.startswith("<..."):
            call = pending.pop(pid, None)
            if call:
                out.append((pos, pid, call[0], call[1], call[2] + rest))
            continue
        c = _CALL.match(rest)
        if not c:
            continue
        name, _fd, path = c.groups()
        if rest.endswith("<unfinished ...>"):
            pending[pid] = (name, path, rest)
        else:
            out.append((pos, pid, name, path, rest))
    return out


async def test_each_250_follows_the_fsyncs_covering_its_message(
    tmp_path: Path, lab: Lab, subprocess_config: Callable[..., tuple[Path, int]]
) -> None:
    strace = require_binary("strace")
    lab.add_domain("inbox.test")
    config, port = subprocess_config()
    trace = tmp_path / "trace.txt"
    prefix = [
        strace,
        "-f",
        "-y",
        "-s",
        "512",
        "-e",
        "trace=fsync,fdatasync,write,writev,sendto,sendmsg",
        "-o",
        str(trace),
    ]
    ids: list[str] = []
    async with serve(prefix, config, port, tmp_path / "serve.log"):

        async def one(i: int, together: asyncio.Barrier | None = None) -> str:
            async with aiosmtplib.SMTP(
                hostname="127.0.0.1", port=port, start_tls=False, timeout=30
            ) as smtp:
                body = f"Subject: {i}\r\n\r\nbody {i}\r\n".encode()
                await smtp.mail("a@sender.test")
                await smtp.rcpt(f"r{i}@inbox.test")
                if together is not None:  # every session's DATA at the same moment
                    await together.wait()
                resp = (await smtp.data(body)).message
                return resp.rsplit(" ", 1)[-1]

        for i in range(3):  # one at a time
            ids.append(await one(i))
        together = asyncio.Barrier(10)
        ids += await asyncio.gather(*(one(i, together) for i in range(3, 13)))  # sharing fsyncs
        await lab.wait_for_messages(13, timeout=30)
    calls = parse_trace(await asyncio.to_thread(trace.read_text, errors="replace"))
    assert calls, "strace recorded nothing"
    checked = 0
    for msg_id in ids:
        seg_write = next(
            p
            for p, _, n, path, line in calls
            if n in ("write", "writev") and path.endswith(".seg") and msg_id in line
        )
        reply = next(
            p
            for p, _, n, path, line in calls
            if n in ("write", "writev", "sendto", "sendmsg")
            and path.startswith("socket:")
            and f"queued as {msg_id}" in line
        )
        seg_sync = [
            p
            for p, _, n, path, _ in calls
            if n in ("fsync", "fdatasync") and path.endswith(".seg") and seg_write < p < reply
        ]
        wal_sync = [
            p
            for p, _, n, path, _ in calls
            if n in ("fsync", "fdatasync")
            and path.endswith("index.db-wal")
            and seg_write < p < reply
        ]
        assert seg_sync, f"{msg_id}: no segment fsync between its write and its 250"
        assert wal_sync, f"{msg_id}: no index WAL fsync between its write and its 250"
        checked += 1
    assert checked == 13
    # Group commit: the ten concurrent messages did not need ten fsyncs each way.
    concurrent = set(ids[3:])
    seg_writes = {
        p
        for p, _, n, path, line in calls
        if n in ("write", "writev") and path.endswith(".seg") and any(i in line for i in concurrent)
    }
    assert len(seg_writes) < 10


# ---------------------------------------------------------------------- crash


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as resp:
        text: str = resp.read().decode()
        return text


async def metric(control: str, name: str) -> float:
    """The value of ``name`` on the control listener's /metrics (the blocking client
    in a thread, so the test's loop, which runs the lab MX, keeps serving)."""
    deadline = time.monotonic() + 10
    while True:  # the control plane may open a moment after the SMTP port
        try:
            text = await asyncio.to_thread(_get, f"http://{control}/metrics")
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


async def load(
    port: int, acked: set[int], stop: asyncio.Event, errors: list[str], sessions: int = 10
) -> None:
    seq = iter(range(10**9))

    async def worker(w: int) -> None:
        while not stop.is_set():
            try:
                async with aiosmtplib.SMTP(
                    hostname="127.0.0.1", port=port, start_tls=False, timeout=10
                ) as smtp:
                    while not stop.is_set():
                        n = next(seq)
                        domain = f"d{n % 3}.test"
                        body = (
                            f"From: a@sender.test\r\nTo: r{n}@{domain}\r\nX-Seq: {n}\r\n"
                            f"Subject: crash {n}\r\n\r\n" + ("z" * 76 + "\r\n") * 26
                        ).encode()
                        await smtp.sendmail("a@sender.test", [f"r{n}@{domain}"], body)
                        acked.add(n)
            except (aiosmtplib.SMTPException, OSError) as exc:
                # Expected once the appliance is killed; kept to explain a failure.
                errors.append(repr(exc))
                await asyncio.sleep(0.05)

    await asyncio.gather(*(worker(w) for w in range(sessions)))


@pytest.mark.timeout(240)
async def test_sigkill_loses_no_acknowledged_message(
    tmp_path: Path, lab: Lab, subprocess_config: Callable[..., tuple[Path, int]]
) -> None:
    for i in range(2):
        lab.add_domain(f"d{i}.test", hosts=[i])
    # A third of the mail is greylisted: at the kill it sits deferred in the spool.
    lab.add_domain("d2.test", hosts=[2], behaviour="greylist")
    overrides: dict[str, Any] = {
        "delivery": {"max_connections_per_domain": 4},
        "queue": {"retry_initial": "2s", "retry_max": "2s"},
    }
    config, port = subprocess_config(overrides)
    import tomllib

    control = tomllib.loads(config.read_text())["control"]["listen"]
    acked: set[int] = set()
    errors: list[str] = []
    log = tmp_path / "serve.log"
    async with serve([], config, port, log) as proc:
        stop = asyncio.Event()
        loader = asyncio.create_task(load(port, acked, stop, errors))
        deadline = time.monotonic() + 60
        # Kill while both accepting and delivering are under way.
        while (len(acked) < 1500 or len(lab.messages) < 200) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        proc.kill()
        await proc.wait()
        stop.set()
        await loader
    acked_at_kill = set(acked)
    delivered_before_restart = len(lab.messages)
    assert len(acked_at_kill) >= 1500, f"load generator too slow; errors: {errors[:5]}"
    assert delivered_before_restart < len(acked_at_kill), "everything delivered before the kill"

    async with serve([], config, port, log):
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            seen = {
                int(m.group(1))
                for msg in lab.messages
                if (m := re.search(rb"X-Seq: (\d+)", msg.data))
            }
            if acked_at_kill <= seen:
                break
            await asyncio.sleep(0.2)
        # Read once every worker has recovered its shard (they start after the port).
        recovered = await metric(control, "postwarden_spool_recovered_inflight_total")
    counts = Counter(
        int(m.group(1)) for msg in lab.messages if (m := re.search(rb"X-Seq: (\d+)", msg.data))
    )
    lost = acked_at_kill - set(counts)
    duplicates = sum(c - 1 for c in counts.values() if c > 1)
    print(
        f"crash test: acknowledged={len(acked_at_kill)} delivered_before_kill="
        f"{delivered_before_restart} lost={len(lost)} duplicates={duplicates} "
        f"recovered_inflight={recovered:.0f}"
    )
    assert not lost, f"{len(lost)} acknowledged messages lost, e.g. {sorted(lost)[:10]}"
    # Only recipients that were in flight at the kill may arrive twice.
    assert duplicates <= recovered
