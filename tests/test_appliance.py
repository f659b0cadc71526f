"""`postwarden serve` as a process: uvloop, metrics, SIGHUP reload, SIGTERM shutdown."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
import tomllib
import urllib.request
from collections.abc import Callable
from pathlib import Path

import aiosmtplib
import pytest

from postwarden.lab import Lab
from postwarden.queue.admin import QueueAdmin
from tests.conftest import tenant_key_via_cli, write_toml
from tests.queue.test_durability import serve

METRICS = (  # metric families documented in docs/operations.md
    "postwarden_messages_received",
    "postwarden_recipients_delivered",
    "postwarden_recipients_deferred",
    "postwarden_recipients_bounced",
    "postwarden_recipients_expired",
    "postwarden_queue_recipients",
    "postwarden_acceptance_seconds",
    "postwarden_delivery_seconds",
    "postwarden_connections_open",
)


def http_get(url: str) -> tuple[int, str]:
    deadline = time.monotonic() + 10
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                return resp.status, resp.read().decode()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


async def wait_log(log: Path, pattern: str, timeout: float = 40) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace")
        if re.search(pattern, text):
            return text
        await asyncio.sleep(0.05)
    raise AssertionError(f"{pattern!r} not in log:\n{log.read_text(errors='replace')[-3000:]}")


async def rcpt_replies(port: int, n: int) -> list[int]:
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False) as smtp:
        await smtp.mail("a@sender.test")
        codes = []
        for i in range(n):
            try:
                codes.append((await smtp.rcpt(f"r{i}@inbox.test"))[0])
            except aiosmtplib.SMTPRecipientRefused as exc:
                codes.append(exc.code)
        await smtp.rset()
    return codes


async def test_serve_uses_uvloop_serves_metrics_and_reloads_on_sighup(
    tmp_path: Path, lab: Lab, subprocess_config: Callable[..., tuple[Path, int]]
) -> None:
    lab.add_domain("inbox.test")
    config, port = subprocess_config({"server": {"workers": 2}})
    data = tomllib.loads(config.read_text())
    control = data["control"]["listen"]
    log = tmp_path / "serve.log"
    async with serve([], config, port, log) as proc:
        text = await wait_log(log, r"event=started .* loop=(\w+)")
        assert re.search(r"event=started .* loop=uvloop", text)
        # Both workers up before the SIGHUP below: one still importing would die of it
        # (and be restarted) instead of reloading.
        await wait_log(
            log,
            r"worker=0 event=started(?s:.*)worker=1 event=started|"
            r"worker=1 event=started(?s:.*)worker=0 event=started",
        )

        async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False) as smtp:
            await smtp.sendmail("a@sender.test", ["r@inbox.test"], b"Subject: m\r\n\r\nx\r\n")
        await lab.wait_for_messages(1)
        status, health = http_get(f"http://{control}/healthz")
        assert status == 200 and '"status":"ok"' in health
        deadline = time.monotonic() + 10
        while True:
            _, metrics = http_get(f"http://{control}/metrics")
            if re.search(r"^postwarden_recipients_delivered_total 1\.0$", metrics, re.M):
                break
            assert time.monotonic() < deadline, metrics
            await asyncio.sleep(0.1)
        for name in METRICS:
            assert re.search(
                rf"^# TYPE {name}(_total)? (counter|gauge|histogram)$", metrics, re.M
            ), name
        assert 'postwarden_messages_received_total{source="smtp"} 1.0' in metrics
        # Bounded labels: no recipient domain ever appears in the metrics.
        assert "inbox.test" not in metrics

        assert await rcpt_replies(port, 3) == [250, 250, 250]
        data["smtp"]["max_recipients"] = 2
        write_toml(config, data)
        proc.send_signal(signal.SIGHUP)
        # Each worker reloads on its own: the next connection may reach either.
        await wait_log(log, r"worker=0 event=reloaded")
        await wait_log(log, r"worker=1 event=reloaded")
        assert await rcpt_replies(port, 3) == [250, 250, 452]

        # A bad file is refused with the key's path; the running config stays.
        config.write_text(config.read_text() + "\n[delivery]\nbogus_key = 1\n")
        proc.send_signal(signal.SIGHUP)
        text = await wait_log(log, r"event=reload_refused")
        assert "bogus_key" in text or "not valid TOML" in text
        assert await rcpt_replies(port, 3) == [250, 250, 452]
        assert proc.returncode is None


async def test_sigterm_stops_cleanly_and_keeps_the_queue(
    tmp_path: Path, lab: Lab, subprocess_config: Callable[..., tuple[Path, int]]
) -> None:
    lab.add_domain("later.test", behaviour="tempfail")
    # Two workers started as new interpreters (no fork server: tests/test_forkserver.py
    # has the forked ones), stopped in order as forked ones are.
    config, port = subprocess_config(
        {"queue": {"retry_initial": "1h"}, "server": {"workers": 2, "fork_workers": False}}
    )
    spool = Path(tomllib.loads(config.read_text())["spool"]["path"])
    log = tmp_path / "serve.log"
    async with serve([], config, port, log) as proc:
        text = await wait_log(log, r"event=worker_execd worker=1")
        assert "event=worker_execd worker=0" in text and "worker_forked" not in text
        async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False) as smtp:
            for i in range(5):
                await smtp.sendmail(
                    "a@sender.test", [f"r{i}@later.test"], b"Subject: q\r\n\r\nx\r\n"
                )
        await wait_log(log, r"(?s)(event=temporary.*){5}")
        # A client in the middle of DATA when the signal comes: it never got a 250.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await reader.readline()
        for cmd in (b"HELO c\r\n", b"MAIL FROM:<a@sender.test>\r\n", b"RCPT TO:<x@later.test>\r\n"):
            writer.write(cmd)
            await reader.readline()
        writer.write(b"DATA\r\n")
        assert (await reader.readline()).startswith(b"354")
        writer.write(b"Subject: half\r\n\r\nhalf a message")
        await writer.drain()
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 15) == 0
        assert time.monotonic() - started < 10
        rest = await reader.read()
        assert b"250" not in rest
        writer.close()
    text = log.read_text()
    assert "event=stopping" in text and "event=stopped" in text
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", port)
    # The index was checkpointed: nothing left in the WAL, and the five deferred
    # recipients are still queued, the half message is not.
    wal = spool / "index.db-wal"
    assert not wal.exists() or wal.stat().st_size == 0
    admin = QueueAdmin(spool)
    try:
        assert admin.summary()["deferred"] == 5
        assert admin.summary()["messages"] == 5
    finally:
        admin.close()
    assert sqlite3.connect(spool / "index.db").execute("PRAGMA integrity_check").fetchone() == (
        "ok",
    )


async def test_workers_share_the_listener_and_a_dead_worker_is_restarted(
    tmp_path: Path, lab: Lab, subprocess_config: Callable[..., tuple[Path, int]]
) -> None:
    lab.add_domain("inbox.test")
    config, port = subprocess_config({"server": {"workers": 2}})
    data = tomllib.loads(config.read_text())
    control = data["control"]["listen"]
    log = tmp_path / "serve.log"
    async with serve([], config, port, log) as proc:
        await wait_log(log, r"worker=1 event=started")
        await wait_log(log, r"worker=0 event=started")
        _, health = http_get(f"http://{control}/healthz")
        assert '"workers":2' in health and '"workers_alive":2' in health

        async def send(n: int) -> None:
            async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False) as s:
                await s.sendmail("a@sender.test", [f"r{n}@inbox.test"], b"Subject: w\r\n\r\nx\r\n")

        # Waves of concurrent connections: whichever worker is free accepts each one.
        for wave in range(5):
            await asyncio.gather(*(send(wave * 4 + n) for n in range(4)))
        await lab.wait_for_messages(20)
        # Both workers took connections: both shards have events.
        shards = [tomllib.loads(config.read_text())["spool"]["path"]]
        admin = QueueAdmin(shards[0])
        try:
            per_shard = {e["shard"] for e in admin.events(limit=1000)}
        finally:
            admin.close()
        assert per_shard == {0, 1}, per_shard

        # Kill one worker outright: the supervisor starts it again, mail keeps flowing.
        worker = await asyncio.create_subprocess_exec(
            "pgrep",
            "-P",
            str(proc.pid),
            "-f",
            "postwarden.cli worker --index 1",
            stdout=subprocess.PIPE,
        )
        out, _ = await worker.communicate()
        victim = int(out.split()[0])
        os.kill(victim, signal.SIGKILL)
        await wait_log(log, r"event=worker_died worker=1")
        deadline = time.monotonic() + 15
        while True:
            _, health = http_get(f"http://{control}/healthz")
            if '"workers_alive":2' in health:
                break
            assert time.monotonic() < deadline, health
            await asyncio.sleep(0.1)
        assert '"worker_restarts":1' in health
        await asyncio.gather(*(send(n) for n in range(20, 30)))
        await lab.wait_for_messages(30)
        _, metrics = http_get(f"http://{control}/metrics")
        # Counters of the killed worker are kept: the sum covers all 30 messages.
        assert 'postwarden_messages_received_total{source="smtp"} 30.0' in metrics


async def test_serve_refuses_to_strand_a_shard_that_holds_mail(
    tmp_path: Path, lab: Lab, subprocess_config: Callable[..., tuple[Path, int]]
) -> None:
    from postwarden.queue.shards import shard_path
    from postwarden.queue.spool import Spool
    from postwarden.values import Envelope

    config, _port = subprocess_config({"server": {"workers": 2}})
    root = tomllib.loads(config.read_text())["spool"]["path"]
    shard = Spool(shard_path(root, 2))  # left by an earlier run with three workers
    await shard.open()
    await shard.store(Envelope("a@sender.test", ["x@inbox.test"]), b"Subject: s\r\n\r\nx\r\n")
    await shard.close()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "postwarden.cli",
        "serve",
        "--config",
        str(config),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 2
    assert "shard-2 holds 1 message(s) but only 2 worker(s)" in out.decode()


@pytest.mark.long
async def test_workers_serve_the_api_and_share_its_caches(
    tmp_path: Path, lab: Lab, subprocess_config: Callable[..., tuple[Path, int]]
) -> None:
    """With two workers, every API request may land on either: a key, a domain or a
    suppression made through one is in force in both (the change feed)."""
    import httpx

    lab.add_domain("inbox.test")
    config, port = subprocess_config(
        {"server": {"workers": 2}, "control": {"require_verified_domains": False}}
    )
    control = tomllib.loads(config.read_text())["control"]["listen"]
    log = tmp_path / "serve.log"
    async with serve([], config, port, log):
        await wait_log(log, r"worker=1 event=started")
        await wait_log(log, r"worker=0 event=started")
        # New connections each time: the kernel hands them to either worker.
        base = f"http://{control}"
        key = await tenant_key_via_cli(config, base)
        async with httpx.AsyncClient(
            base_url=base,
            headers={"Authorization": f"Bearer {key}"},
            limits=httpx.Limits(max_keepalive_connections=0),
        ) as c:
            assert (
                await c.post("/v1/suppressions", json={"address": "no@inbox.test"})
            ).status_code == 201
            await asyncio.sleep(3)  # change-feed polls (every 0.2 s here), room for a loaded CI
            ids = []
            for i in range(12):
                r = await c.post(
                    "/v1/messages",
                    json={
                        "from": "a@acme.test",
                        "to": [f"u{i}@inbox.test", "no@inbox.test"],
                        "subject": "s",
                        "text": "t",
                    },
                )
                assert r.status_code == 202, r.text
                got = {x["email"]: x["status"] for x in r.json()["recipients"]}
                assert got == {f"u{i}@inbox.test": "queued", "no@inbox.test": "dropped"}
                ids.append(r.json()["id"])
            for mid in ids:
                for _ in range(300):
                    r = await c.get(f"/v1/messages/{mid}")
                    if r.status_code == 200 and "delivered" in r.text:
                        break
                    await asyncio.sleep(0.1)
                assert r.status_code == 200 and "delivered" in r.text, r.text
        await lab.wait_for_messages(12)
        assert all(m.rcpt_tos != ["no@inbox.test"] for m in lab.messages)
        # Both workers took API requests: both shards have events.
        admin = QueueAdmin(tomllib.loads(config.read_text())["spool"]["path"])
        try:
            assert {e["shard"] for e in admin.events(limit=1000)} == {0, 1}
        finally:
            admin.close()


@pytest.mark.parametrize("workers", [1, 2])
async def test_serve_refuses_a_database_that_is_not_migrated(
    tmp_path: Path, subprocess_config: Callable[..., tuple[Path, int]], workers: int
) -> None:
    empty = tmp_path / "empty.db"
    config, _ = subprocess_config(
        {"server": {"workers": workers}, "database": {"url": f"sqlite+aiosqlite:///{empty}"}}
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "postwarden.cli",
        "serve",
        "--config",
        str(config),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 2, out.decode()
    assert "postwarden db upgrade" in out.decode()
    if workers == 2:
        return  # what follows does not depend on the workers: once is enough
    # `db upgrade` brings it up to date; `db current` then says so.
    for action, code in (("current", 1), ("upgrade", 0), ("current", 0)):
        p = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "postwarden.cli",
            "db",
            action,
            "--config",
            str(config),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        text = (await p.communicate())[0].decode()
        assert p.returncode == code, (action, text)


async def test_sigterm_while_starting_stops_cleanly(
    tmp_path: Path, subprocess_config: Callable[..., tuple[Path, int]]
) -> None:
    """A signal that arrives mid-start (here: once the spool is open, before the
    listeners are) ends in a clean stop, not a process killed half-way."""
    config, _ = subprocess_config({"server": {"workers": 1}})
    spool = Path(tomllib.loads(config.read_text())["spool"]["path"])
    log = tmp_path / "serve.log"
    with log.open("ab") as fh:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "postwarden.cli",
            "serve",
            "--config",
            str(config),
            stdout=fh,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 30
    while not (spool / "index.db").exists():
        assert proc.returncode is None and time.monotonic() < deadline, log.read_text()
        await asyncio.sleep(0.002)
    proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(proc.wait(), 30) == 0, log.read_text()
    text = log.read_text()
    assert "event=started" in text and "event=stopped" in text, text
    wal = spool / "index.db-wal"
    assert not wal.exists() or wal.stat().st_size == 0
