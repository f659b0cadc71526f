"""The supervisor: N worker processes sharing the listeners, and the control plane.

See docs/decisions/0004-process-model.md. The supervisor binds every ``smtp.listen``
address once and hands the sockets to ``postwarden worker`` processes (inherited file
descriptors): the kernel gives each new connection to whichever worker accepts it
first. Each worker is a whole appliance with its own spool shard. The supervisor
serves ``control.listen`` (metrics summed over the workers through prometheus-client's
multiprocess mode), forwards SIGTERM and SIGHUP, and restarts a worker that dies —
its shard then recovers exactly as after a crash. If the supervisor itself is killed,
the kernel kills the workers too (``PR_SET_PDEATHSIG``), so a ``kill -9`` of the
service is one crash, never orphaned workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ipaddress
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from typing import Any

from postwarden.config import Config, ConfigError, load_config, parse_hostport

log = logging.getLogger("postwarden.supervisor")

RESTART_DELAY = 1.0
PR_SET_PDEATHSIG = 1


def worker_count(cfg: Config) -> int:
    """``server.workers``, with 0 meaning one per CPU."""
    return cfg.server.workers or os.cpu_count() or 1


def bind_listeners(cfg: Config) -> list[socket.socket]:
    """One listening socket per ``smtp.listen`` address, inheritable by workers."""
    sockets = []
    for i, spec in enumerate(cfg.smtp.listen):
        host, port = parse_hostport(spec, f"smtp.listen[{i}]")
        family = socket.AF_INET
        with contextlib.suppress(ValueError):
            if ipaddress.ip_address(host).version == 6:
                family = socket.AF_INET6
        sock = socket.create_server((host, port), family=family, backlog=1024)
        sock.setblocking(False)
        sock.set_inheritable(True)
        sockets.append(sock)
    return sockets


def die_with_parent(parent: int) -> None:
    """In a worker: be killed when the supervisor dies; exit if it already has."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:
        os._exit(1)


class Supervisor:
    """Starts, watches and stops the workers; serves the control plane."""

    def __init__(self, cfg: Config, config_path: str | None, count: int) -> None:
        self.cfg = cfg
        self.config_path = config_path
        self.count = count
        self.sockets: list[socket.socket] = []
        self.procs: dict[int, asyncio.subprocess.Process] = {}
        self.restarts = 0
        self._stopping = False
        self._stopped = asyncio.Event()
        self._watchers: set[asyncio.Task[None]] = set()
        self._http: Any = None
        self.metrics_dir = ""

    async def run(self) -> int:
        from postwarden.appliance import ensure_tls_files

        # Set before any worker starts: each one then keeps its metric values in files
        # here that /metrics adds up.
        self.metrics_dir = tempfile.mkdtemp(prefix="postwarden-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = self.metrics_dir
        ensure_tls_files(self.cfg)  # once, before workers race to create it
        self.sockets = bind_listeners(self.cfg)
        for k in range(self.count):
            await self._spawn(k)
        await self._start_http()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda: asyncio.ensure_future(self.stop()))
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        log.info(
            "event=supervisor_started workers=%d smtp=%s control=%s loop=%s",
            self.count,
            ",".join("{}:{}".format(*s.getsockname()[:2]) for s in self.sockets),
            "{}:{}".format(*self._http.address) if self._http else "-",
            type(loop).__module__.split(".")[0],
        )
        await self._stopped.wait()
        return 0

    async def _spawn(self, index: int) -> None:
        fds = [s.fileno() for s in self.sockets]
        argv = [
            sys.executable, "-m", "postwarden.cli", "worker",
            "--index", str(index), "--count", str(self.count),
            "--fds", ",".join(map(str, fds)), "--parent", str(os.getpid()),
        ]  # fmt: skip
        if self.config_path:
            argv += ["--config", self.config_path]
        proc = await asyncio.create_subprocess_exec(*argv, pass_fds=fds)
        self.procs[index] = proc
        task = asyncio.create_task(self._watch(index, proc))
        self._watchers.add(task)
        task.add_done_callback(self._watchers.discard)

    async def _watch(self, index: int, proc: asyncio.subprocess.Process) -> None:
        code = await proc.wait()
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(proc.pid, self.metrics_dir)
        if self._stopping:
            return
        self.restarts += 1
        log.error("event=worker_died worker=%d pid=%d code=%s restart_in=%.0fs",
                  index, proc.pid, code, RESTART_DELAY)  # fmt: skip
        await asyncio.sleep(RESTART_DELAY)
        if not self._stopping:
            await self._spawn(index)

    async def _start_http(self) -> None:
        from postwarden.control.app import create_app
        from postwarden.control.server import HttpServer
        from postwarden.metrics import render_multiprocess

        def health() -> tuple[bool, dict[str, Any]]:
            alive = sum(1 for p in self.procs.values() if p.returncode is None)
            return not self._stopping and alive == self.count, {
                "workers": self.count,
                "workers_alive": alive,
                "worker_restarts": self.restarts,
            }

        host, port = parse_hostport(self.cfg.control.listen, "control.listen")
        self._http = HttpServer(create_app(render_multiprocess, health), host, port)
        await self._http.start()

    def reload(self) -> None:
        """Check the file, then let every worker reload it (each applies it itself)."""
        if self.config_path is None:
            log.info("event=reload_skipped reason=no_config_file")
            return
        try:
            load_config(self.config_path)
        except ConfigError as exc:
            log.error("event=reload_refused error=%r", str(exc))
            return
        for proc in self.procs.values():
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGHUP)

    async def stop(self) -> None:
        if self._stopping:
            return
        self._stopping = True
        log.info("event=stopping workers=%d", self.count)
        for proc in self.procs.values():
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.cfg.server.shutdown_grace + 10
        for proc in self.procs.values():
            try:
                await asyncio.wait_for(proc.wait(), max(0.1, deadline - time.monotonic()))
            except TimeoutError:
                log.error("event=worker_kill pid=%d reason=shutdown_timeout", proc.pid)
                proc.kill()
                await proc.wait()
        for task in list(self._watchers):
            task.cancel()
        if self._http is not None:
            await self._http.stop()
        for sock in self.sockets:
            sock.close()
        shutil.rmtree(self.metrics_dir, ignore_errors=True)
        log.info("event=stopped")
        self._stopped.set()
