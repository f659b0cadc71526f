"""Issue 24's metrics from `postwarden serve` as a process, through real scrapes of
/metrics: with a supervisor and two workers (the supervisor's own values summed with
the workers', a worker killed and started again) and with one process; and the run
marker's verdict on the previous stop: after a ``kill -9``, 0; after a clean stop, 1."""

from __future__ import annotations

import os
import re
import signal
import tomllib
from collections.abc import Callable
from pathlib import Path

import aiosmtplib
import httpx
import pytest

from postwarden.lab import Lab
from tests.queue.test_durability import serve
from tests.test_metrics_appliance import value
from tests.waiting import eventually

#: The names issue 24 adds (the contract with the dashboards and alerts).
NEW = (
    "postwarden_event_loop_lag_seconds",
    "postwarden_queue_oldest_seconds",
    "postwarden_delivery_attempts",
    "postwarden_delivery_connections",
    "postwarden_process_resident_memory_bytes",
    "postwarden_process_cpu_seconds",
    "postwarden_process_open_fds",
    "postwarden_process_max_fds",
    "postwarden_workers",
    "postwarden_workers_alive",
    "postwarden_worker_restarts",
    "postwarden_start_time_seconds",
    "postwarden_previous_stop_clean",
    "postwarden_spool_disk_free_bytes",
    "postwarden_spool_disk_size_bytes",
    "postwarden_tls_certificate_expiry_timestamp_seconds",
    "postwarden_http_requests",
    "postwarden_http_request_seconds",
)


async def scrape(control: str) -> str:
    async with httpx.AsyncClient(timeout=10) as c:
        r = await c.get(f"http://{control}/metrics")
    assert r.status_code == 200
    return r.text


def rss(pid: int) -> int:
    """A process's resident memory now, from /proc (bytes)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def fork_servers(parent: int) -> list[int]:
    """The supervisor's fork server (its child running ``postwarden.cli forkserver``)."""
    found = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            stat = (p / "stat").read_text()
            cmd = (p / "cmdline").read_bytes()  # one string once setproctitle ran
        except OSError:
            continue
        ppid = int(stat.rpartition(")")[2].split()[1])
        if ppid == parent and b" forkserver " in cmd.replace(b"\0", b" "):
            found.append(int(p.name))
    return found


def all_names(text: str) -> bool:
    return all(re.search(rf"^# TYPE {n}(_total)? \w+$", text, re.M) for n in NEW)


async def ready(control: str, workers: int) -> str | None:
    """The scrape once every worker runs and has read its vitals (else None)."""
    try:
        text = await scrape(control)
    except httpx.HTTPError:
        return None
    alive = value(text, "postwarden_workers_alive")
    lag = value(text, "postwarden_event_loop_lag_seconds_count") or 0
    if alive == workers and lag >= workers and all_names(text):
        return text
    return None


def worker_pids(log: Path) -> dict[int, int]:
    """The newest pid of each worker, from the supervisor's log."""
    pids = {}
    for m in re.finditer(r"event=worker_\w+ worker=(\d+) pid=(\d+)", log.read_text()):
        pids[int(m.group(1))] = int(m.group(2))
    return pids


@pytest.mark.long(30)
async def test_two_workers_sum_and_a_worker_restart(
    tmp_path: Path, lab: Lab, subprocess_config: Callable[..., tuple[Path, int]]
) -> None:
    lab.add_domain("one.test")
    config, port = subprocess_config({"server": {"workers": 2}})
    control = tomllib.loads(config.read_text())["control"]["listen"]
    log = tmp_path / "serve.log"
    async with serve([], config, port, log) as proc:
        text = await eventually(lambda: ready(control, 2), 60, "two workers' metrics")
        assert value(text, "postwarden_workers") == 2
        assert value(text, "postwarden_worker_restarts_total") == 0
        assert value(text, "postwarden_previous_stop_clean") == 1  # a fresh spool
        assert (value(text, "postwarden_start_time_seconds") or 0) > 0
        assert (value(text, "postwarden_spool_disk_size_bytes") or 0) > 0
        # Summed over the supervisor, its fork server and the workers (each read within
        # the last few seconds, idle meanwhile): about what /proc says of them now.
        pids = [proc.pid, *fork_servers(proc.pid), *worker_pids(log).values()]
        assert len(pids) == 4, pids

        async def summed() -> bool:  # each process reads itself every 5 s
            text = await scrape(control)
            got = value(text, "postwarden_process_resident_memory_bytes") or 0
            return 0.9 < got / sum(map(rss, pids)) < 1.1

        await eventually(summed, 20, "the RSS of all four processes summed")
        assert (value(text, "postwarden_process_max_fds") or 0) > 0

        # One delivery over STARTTLS to the lab, counted by whichever worker made it.
        async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False) as smtp:
            await smtp.sendmail("a@sender.test", ["r@one.test"], b"Subject: m\r\n\r\nx\r\n")
        await lab.wait_for_messages(1)

        async def counted() -> str | None:
            text = await scrape(control)
            done = value(
                text, "postwarden_delivery_attempts_total", result="delivered", site="other"
            )
            return text if done == 1 else None

        text = await eventually(counted, what="the delivery counted")
        assert value(text, "postwarden_delivery_connections_total", site="other", tls="yes") == 1
        assert value(text, "postwarden_delivery_connections_total", site="other", tls="no") == 0
        assert (value(text, "postwarden_http_requests_total", route="/metrics", method="GET",
                      status="2xx") or 0) >= 1  # fmt: skip
        cpu = value(text, "postwarden_process_cpu_seconds_total") or 0
        assert cpu > 0

        # A worker dies: the supervisor starts it again, and says so.
        os.kill(worker_pids(log)[1], signal.SIGKILL)

        async def restarted() -> str | None:
            text = await scrape(control)
            if value(text, "postwarden_worker_restarts_total") != 1:
                return None
            return await ready(control, 2)

        text = await eventually(restarted, 60, "the worker restarted")
        # The dead worker's CPU stays counted: the counter never goes back.
        assert (value(text, "postwarden_process_cpu_seconds_total") or 0) >= cpu
        assert (
            value(text, "postwarden_delivery_attempts_total", result="delivered", site="other") == 1
        )

        # kill -9 of the service: the workers die with the supervisor.
        proc.kill()
        await proc.wait()

    async with serve([], config, port, log):
        text = await eventually(lambda: ready(control, 2), 60, "two workers' metrics")
        assert value(text, "postwarden_previous_stop_clean") == 0
    # The clean stop above (SIGTERM) is seen at the next start.
    async with serve([], config, port, log):
        text = await eventually(lambda: ready(control, 2), 60, "two workers' metrics")
        assert value(text, "postwarden_previous_stop_clean") == 1


@pytest.mark.long(15)
async def test_one_process_has_every_metric_and_the_run_marker(
    tmp_path: Path, lab: Lab, subprocess_config: Callable[..., tuple[Path, int]]
) -> None:
    config, port = subprocess_config({"server": {"workers": 1}})
    data = tomllib.loads(config.read_text())
    control, spool = data["control"]["listen"], Path(data["spool"]["path"])
    log = tmp_path / "serve.log"
    async with serve([], config, port, log) as proc:
        text = await eventually(lambda: ready(control, 1), 30, "the process's metrics")
        assert value(text, "postwarden_workers") == 1
        assert value(text, "postwarden_previous_stop_clean") == 1
        assert (spool / "run-state").read_text() == "running\n"
        proc.kill()  # kill -9
        await proc.wait()
    assert (spool / "run-state").read_text() == "running\n"
    async with serve([], config, port, log):
        text = await eventually(lambda: ready(control, 1), 30, "the process's metrics")
        assert value(text, "postwarden_previous_stop_clean") == 0
    assert (spool / "run-state").read_text() == "stopped\n"
    async with serve([], config, port, log):
        text = await eventually(lambda: ready(control, 1), 30, "the process's metrics")
        assert value(text, "postwarden_previous_stop_clean") == 1
