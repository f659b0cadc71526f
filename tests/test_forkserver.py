"""Workers forked by the fork server (src/postwarden/forkserver.py) are the
supervisor's children as exec'd ones were: found by their command line, restarted when
they die, killed with the supervisor; without the fork server, workers are exec'd
(and with ``server.fork_workers = false``: tests/test_appliance.py, the SIGTERM test)."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import tomllib
from collections.abc import Callable
from pathlib import Path

import aiosmtplib

from postwarden.lab import Lab
from tests.queue.test_durability import serve
from tests.test_appliance import http_get, wait_log
from tests.waiting import eventually


async def children(parent: int, pattern: str) -> list[int]:
    """Pids of ``parent``'s children whose command line matches ``pattern``."""
    proc = await asyncio.create_subprocess_exec(
        "pgrep", "-P", str(parent), "-f", pattern, stdout=subprocess.PIPE
    )
    out, _ = await proc.communicate()
    return [int(p) for p in out.split()]


def parent_of(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[1])


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


async def send(port: int, n: int) -> None:
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False) as s:
        await s.sendmail("a@sender.test", [f"f{n}@inbox.test"], b"Subject: f\r\n\r\nx\r\n")


async def test_forked_workers_are_the_supervisors_and_exec_takes_over(
    tmp_path: Path, lab: Lab, subprocess_config: Callable[..., tuple[Path, int]]
) -> None:
    lab.add_domain("inbox.test")
    config, port = subprocess_config({"server": {"workers": 2}})
    control = tomllib.loads(config.read_text())["control"]["listen"]
    log = tmp_path / "serve.log"
    async with serve([], config, port, log) as proc:
        text = await wait_log(
            log,
            r"worker=0 event=started(?s:.*)worker=1 event=started|"
            r"worker=1 event=started(?s:.*)worker=0 event=started",
        )
        # Both forked (the supervisor says so, with their pids), and both its children
        # under the command line an exec'd worker has.
        forked = {
            int(i): int(p)
            for i, p in re.findall(r"event=worker_forked worker=(\d) pid=(\d+)", text)
        }
        assert set(forked) == {0, 1}, text[-3000:]
        for index, pid in forked.items():
            assert await children(proc.pid, f"postwarden.cli worker --index {index} ") == [pid]
            assert parent_of(pid) == proc.pid
        [server] = await children(proc.pid, "postwarden.cli forkserver")
        assert server not in forked.values()
        await asyncio.gather(*(send(port, n) for n in range(4)))
        await lab.wait_for_messages(4)

        # The fork server dies: a worker that dies then is started by exec, and mail
        # still flows through both.
        os.kill(server, signal.SIGKILL)
        os.kill(forked[1], signal.SIGKILL)
        await wait_log(log, r"event=worker_died worker=1")

        async def back() -> bool:
            return '"workers_alive":2' in http_get(f"http://{control}/healthz")[1]

        await eventually(back, 20, "worker 1 started again")
        [again] = await children(proc.pid, "postwarden.cli worker --index 1 ")
        assert again != forked[1]
        assert "event=worker_execd worker=1" in log.read_text()
        await asyncio.gather(*(send(port, n) for n in range(4, 10)))
        await lab.wait_for_messages(10)

        # A kill -9 of the supervisor alone is one crash: the workers go with it.
        workers = [forked[0], again]
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
        await eventually(lambda: not any(alive(p) for p in workers), 10, "the workers gone")
