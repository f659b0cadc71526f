"""``postwarden serve`` under systemd's notification protocol (issue 24;
docs/decisions/0013), end to end without systemd: the test binds the datagram socket
systemd would and runs ``serve`` with two workers, ``NOTIFY_SOCKET`` and a 1-second
``WATCHDOG_USEC``. READY=1 comes only once a worker greets on the SMTP port; the watchdog is fed
while the workers' loops beat, withheld while one stalls (the test-only fault switch),
fed again after; RELOADING=1 then READY=1 around SIGHUP; STOPPING=1 on SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from postwarden.notify import STALL_ENV
from tests.waiting import eventually


class Manager:
    """systemd's side: every datagram received, with when."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        self.got: list[tuple[float, dict[str, str]]] = []
        asyncio.get_running_loop().add_reader(self.sock.fileno(), self._read)

    def _read(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while True:
                text = self.sock.recv(4096).decode()
                fields = dict(line.split("=", 1) for line in text.split("\n") if "=" in line)
                self.got.append((time.monotonic(), fields))

    def first(self, key: str, after: float = 0.0) -> float | None:
        return next((t for t, f in self.got if key in f and t >= after), None)

    def count(self, key: str, after: float = 0.0) -> int:
        return sum(1 for t, f in self.got if key in f and t >= after)

    def close(self) -> None:
        asyncio.get_running_loop().remove_reader(self.sock.fileno())
        self.sock.close()


def _greets(port: int) -> bool:
    """Whether a worker answers on the SMTP port now: its 220 greeting (a connection
    alone would be taken by the supervisor's listening socket before any worker runs)."""
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1) as c:
        c.settimeout(1)
        return c.recv(512).startswith(b"220")
    return False


@contextlib.asynccontextmanager
async def serving(tmp_path: Path, config: Path, **env: str) -> AsyncIterator[Any]:
    """``postwarden serve`` with ``env`` added, in a process group of its own; killed
    with it on the way out."""
    with (tmp_path / "serve.log").open("ab") as log:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "postwarden.cli", "serve", "--config", str(config),
            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **env},
            start_new_session=True,
        )  # fmt: skip
    try:
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()


@pytest.mark.serial
async def test_ready_watchdog_reload_and_stop(
    tmp_path: Path, subprocess_config: Callable[..., tuple[Path, int]]
) -> None:
    config, smtp = subprocess_config({"server": {"workers": 2}})
    manager = Manager(tmp_path / "notify")
    stall = tmp_path / "stall"
    accepted_at_ready: list[bool] = []
    env = {"NOTIFY_SOCKET": str(tmp_path / "notify"), "WATCHDOG_USEC": "1000000",
           STALL_ENV: str(stall), "PYTHONUNBUFFERED": "1"}  # fmt: skip
    async with serving(tmp_path, config, **env) as proc:

        async def ready() -> bool:
            if manager.first("READY") is None:
                return False
            accepted_at_ready.append(_greets(smtp))
            return True

        await eventually(ready, 60, "READY=1")
        assert accepted_at_ready == [True]  # a worker greets
        # READY=1 was sent after every worker had started (listeners serving, spool
        # shard recovered): the supervisor's line after both workers' in the log.
        lines = (tmp_path / "serve.log").read_text().splitlines()
        started = [ln[:23] for ln in lines if " event=started worker=" in ln]
        told = [ln[:23] for ln in lines if " event=ready workers=2" in ln]
        assert len(started) == 2 and len(told) == 1, lines
        assert told[0] >= max(started), lines
        statuses = [f["STATUS"] for _t, f in manager.got if "STATUS" in f]
        assert statuses[0] == "binding the listeners" and statuses[-1] == "serving: 2 workers"
        assert any(s.startswith("starting 2 workers") for s in statuses), statuses

        # Fed while the workers' loops beat: every half second.
        t0 = manager.first("READY") or 0.0
        await eventually(lambda: manager.count("WATCHDOG", t0) >= 3, 20, "three pings")
        # A stalled worker loop: the pings stop (none for two seconds, four intervals)...
        stall.touch()

        def withheld() -> bool:
            last = max((t for t, f in manager.got if "WATCHDOG" in f), default=0.0)
            return time.monotonic() - last >= 2.0

        await eventually(withheld, 20, "the pings to stop while a loop stalls", interval=0.1)

        # SIGHUP while the workers' loops stall: RELOADING=1 at once, READY=1 only
        # once every worker has applied the new file, which a stalled loop cannot.
        hup = time.monotonic()
        log_text = (tmp_path / "serve.log").read_text
        proc.send_signal(signal.SIGHUP)
        await eventually(lambda: "event=reload_begun generation=1 workers=2" in log_text(), 20,
                         "the supervisor to signal both workers")  # fmt: skip
        await eventually(lambda: manager.first("RELOADING", hup) is not None, 20, "RELOADING=1")
        assert manager.first("READY", hup) is None
        assert "event=reloaded" not in log_text()
        # ...and come back once it answers again: the pings, then READY=1.
        stall.unlink()
        back = time.monotonic()
        await eventually(lambda: manager.count("WATCHDOG", back) >= 2, 20, "the pings to resume")
        await eventually(lambda: manager.first("READY", hup) is not None, 20, "READY after reload")
        assert (manager.first("RELOADING", hup) or 1e18) <= (manager.first("READY", hup) or 0.0)
        assert any("MONOTONIC_USEC" in f for _t, f in manager.got)
        lines = log_text().splitlines()
        reloaded = [i for i, ln in enumerate(lines) if " event=reloaded " in ln]
        done = [i for i, ln in enumerate(lines) if "event=reload_done generation=1 workers=2" in ln]
        assert len(reloaded) == 2 and len(done) == 1 and done[0] > max(reloaded), lines
        assert [f["STATUS"] for _t, f in manager.got if "STATUS" in f][-1] == "serving: 2 workers"

        # SIGTERM: STOPPING=1, and a clean exit.
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 60) == 0
        assert manager.first("STOPPING") is not None
    manager.close()


@pytest.mark.serial
async def test_one_process_speaks_for_itself(
    tmp_path: Path, subprocess_config: Callable[..., tuple[Path, int]]
) -> None:
    """``server.workers = 1``: no supervisor; the appliance's own process says READY=1
    once it serves, feeds the watchdog from its loop, and brackets a reload."""
    config, smtp = subprocess_config({"server": {"workers": 1}})
    manager = Manager(tmp_path / "notify")
    env = {"NOTIFY_SOCKET": str(tmp_path / "notify"), "WATCHDOG_USEC": "1000000",
           "PYTHONUNBUFFERED": "1"}  # fmt: skip
    async with serving(tmp_path, config, **env) as proc:
        await eventually(lambda: manager.first("READY") is not None, 60, "READY=1")
        assert _greets(smtp)
        statuses = [f["STATUS"] for _t, f in manager.got if "STATUS" in f]
        assert statuses[0].startswith("starting") and statuses[-1] == "serving", statuses
        t0 = manager.first("READY") or 0.0
        await eventually(lambda: manager.count("WATCHDOG", t0) >= 3, 20, "three pings")
        hup = time.monotonic()
        proc.send_signal(signal.SIGHUP)
        await eventually(lambda: manager.first("READY", hup) is not None, 20, "READY after reload")
        assert (manager.first("RELOADING", hup) or 1e18) <= (manager.first("READY", hup) or 0.0)
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 60) == 0
        assert manager.first("STOPPING") is not None
    manager.close()
