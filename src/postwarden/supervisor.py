"""The supervisor: N worker processes sharing the listeners, and the control plane.

See docs/decisions/0004-process-model.md. The supervisor binds every ``smtp.listen``
address once and hands the sockets to ``postwarden worker`` processes (inherited file
descriptors): the kernel gives each new connection to whichever worker accepts it
first. The inbound MX's (``inbound.listen``) are handed over the same way, their
descriptors named in the worker's environment (``POSTWARDEN_INBOUND_FDS``). Each
worker is a whole appliance with its own spool shard, and serves the control plane
on the ``control.listen`` socket, bound here once too (docs/decisions/0005): metrics
are summed over the workers through prometheus-client's multiprocess
mode, and ``/healthz`` adds what the supervisor writes to its status file. The
supervisor forwards SIGTERM and SIGHUP, and restarts a worker that dies —
its shard then recovers exactly as after a crash. If the supervisor itself is killed,
the kernel kills the workers too (``PR_SET_PDEATHSIG``), so a ``kill -9`` of the
service is one crash, never orphaned workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ipaddress
import json
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
from postwarden.files import replace_file
from postwarden.notify import (
    BEAT_ENV,
    Notifier,
    beat_age,
    ready_pid,
    reloaded,
    write_reload_generation,
)

log = logging.getLogger("postwarden.supervisor")

RESTART_DELAY = 1.0
#: Seconds a worker being (re)started may take before the watchdog counts it as stalled.
START_GRACE = 120.0
#: Seconds the supervisor waits for every worker to confirm a reload before it tells
#: systemd READY=1 anyway (naming the workers that did not, in STATUS= and the log).
RELOAD_WAIT = 60.0
PR_SET_PDEATHSIG = 1


def worker_count(cfg: Config) -> int:
    """``server.workers``, with 0 meaning one per CPU."""
    return cfg.server.workers or os.cpu_count() or 1


def bind(spec: str, path: str) -> socket.socket:
    """A listening socket for ``host:port``, inheritable by workers."""
    host, port = parse_hostport(spec, path)
    family = socket.AF_INET
    with contextlib.suppress(ValueError):
        if ipaddress.ip_address(host).version == 6:
            family = socket.AF_INET6
    sock = socket.create_server((host, port), family=family, backlog=1024)
    sock.setblocking(False)
    sock.set_inheritable(True)
    return sock


def bind_listeners(cfg: Config) -> list[socket.socket]:
    """One listening socket per ``smtp.listen`` address, inheritable by workers."""
    return [bind(spec, f"smtp.listen[{i}]") for i, spec in enumerate(cfg.smtp.listen)]


def bind_inbound(cfg: Config) -> list[socket.socket]:
    """One listening socket per ``inbound.listen`` address, inheritable by workers."""
    return [bind(spec, f"inbound.listen[{i}]") for i, spec in enumerate(cfg.inbound.listen)]


INBOUND_FDS_ENV = "POSTWARDEN_INBOUND_FDS"


def inherited_inbound_sockets() -> tuple[socket.socket, ...]:
    """In a worker: the inbound MX's listening sockets the supervisor passed."""
    fds = os.environ.get(INBOUND_FDS_ENV, "")
    return tuple(socket.socket(fileno=int(fd)) for fd in fds.split(",") if fd.strip())


METRICS_FD_ENV = "POSTWARDEN_METRICS_FD"


def inherited_metrics_socket() -> socket.socket | None:
    """In a worker: the metrics.listen socket the supervisor bound, if any. Every
    worker serves it; each answer is the sum over all workers (multiprocess mode)."""
    fd = os.environ.get(METRICS_FD_ENV, "").strip()
    return socket.socket(fileno=int(fd)) if fd else None


def metrics_token(cfg: Config) -> bytes | None:
    """The SHA-256 /metrics needs (metrics.bearer_token_*); ConfigError naming the key
    when its file cannot be read."""
    from postwarden.metrics import token_digest

    try:
        return token_digest(cfg.metrics)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"metrics.bearer_token_file: {exc}") from exc


def check_files(cfg: Config) -> Config:
    """``cfg``, once the operator's files it names that ``load_config`` does not read
    (bounce patterns, shaping rules, verdict rules) are read as serving reads them: a bad one is a
    ConfigError naming its key, at start, at reload and in ``check-config``."""
    from postwarden.bounces.classify import Classifier, PatternsError
    from postwarden.engagement.verdicts import VerdictRulesError
    from postwarden.engagement.verdicts import load_rules as load_verdicts
    from postwarden.shaping.rules import RulesError, load_rules

    if cfg.bounces.patterns_file:
        try:
            Classifier(cfg.bounces.patterns_file)
        except PatternsError as exc:
            raise ConfigError(f"bounces.patterns_file: {exc}") from exc
    if cfg.shaping.rules_file:
        try:
            load_rules(cfg.shaping.rules_file)
        except RulesError as exc:
            raise ConfigError(f"shaping.rules_file: {exc}") from exc
    if cfg.tracking.verdicts_file:
        try:
            load_verdicts(cfg.tracking.verdicts_file)
        except VerdictRulesError as exc:
            raise ConfigError(f"tracking.verdicts_file: {exc}") from exc
    return cfg


STATUS_ENV = "POSTWARDEN_SUPERVISOR_STATUS"


def read_status() -> dict[str, Any]:
    """In a worker: the supervisor's last word on all workers ({} when there is none)."""
    path = os.environ.get(STATUS_ENV)
    if not path:
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data: dict[str, Any] = json.load(f)
            return data
    except (OSError, ValueError):
        return {}


DB_CHECKED_ENV = "POSTWARDEN_DB_CHECKED"


async def prepare_control(cfg: Config, config_path: str | None, forks: Any = None) -> None:
    """Before workers start: apply migrations (``database.auto_upgrade``) or check the
    database is current, and create the encryption key file; a failure stops here, once,
    instead of in every worker. The database work runs in a child process (``postwarden
    db``), so that the supervisor never loads SQLAlchemy and Alembic: it stays small.

    ``db``'s exit code says what to do: 0, the database is ready (the workers need not
    check again); 2, it is down (unreachable): the start goes on, and the workers' control
    planes check it when it comes; 1, it needs a person (wrong URL or password, schema
    out of date): :class:`ControlPlaneError` with the one line ``db`` printed. With a
    ready fork server (``forks``), ``db`` is a fork of it rather than a new
    interpreter."""
    from postwarden.control import ControlPlaneError
    from postwarden.store.secrets import load_box

    try:
        load_box(cfg.control.encryption_key, cfg.control.encryption_key_file)
    except (OSError, ValueError) as exc:
        raise ControlPlaneError(f"control.encryption_key: {exc}") from exc
    action = "upgrade" if cfg.database.auto_upgrade else "current"
    argv = ["db", action]
    if config_path:
        argv += ["--config", config_path]
    code, text = None, ""
    if forks is not None and forks.alive:
        with contextlib.suppress(ConnectionError, OSError, TimeoutError):
            code, text = await forks.run(argv, dict(os.environ), within=3600)
    if code is None:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "postwarden.cli", *argv,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        out, _ = await proc.communicate()
        code, text = proc.returncode, out.decode(errors="replace")
    if code == 0:
        os.environ[DB_CHECKED_ENV] = "1"  # the workers need not check again
        return
    # `db` ends with its verdict on one line (anything before it is a warning at most).
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    line = lines[-1] if lines else f"`postwarden db {action}` exited with {code}"
    if code == 2:
        log.warning("event=database_unavailable at=start action=%s error=%r", action, line)
        return
    raise ControlPlaneError(line)


def die_with_parent(parent: int) -> None:
    """In a worker: be killed when the supervisor dies; exit if it already has."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:
        os._exit(1)


class Supervisor:
    """Starts, watches and stops the workers; serves the control plane."""

    def __init__(self, cfg: Config, config_path: str | None, count: int, role: str = "all") -> None:
        self.cfg = cfg
        self.role = role
        self.config_path = config_path
        self.count = count
        self.sockets: list[socket.socket] = []
        self.inbound_sockets: list[socket.socket] = []
        self.procs: dict[int, Any] = {}  # asyncio's Process, or forkserver's ForkedProcess
        self.forks: Any = None  # the fork server, when it runs (forkserver.py)
        self.restarts = 0
        self.reload_gen = 0
        self._stopping = False
        self._stopped = asyncio.Event()
        self._watchers: set[asyncio.Task[None]] = set()
        self.control_sock: socket.socket | None = None
        self.metrics_sock: socket.socket | None = None  # metrics.listen, when given
        self.metrics_dir = ""
        self.status_file = ""
        self.shaping: Any = None
        # systemd's notifications (docs/decisions/0013): only this process speaks; the
        # workers write ready and beat files next to supervisor.json.
        self.notifier = Notifier()
        self.spawned_at: dict[int, float] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.started_at = time.time()
        self.appliance_metrics: Any = None  # metrics.ApplianceMetrics, from _metrics()

    async def run(self) -> int:
        from postwarden.tls import ensure_tls_files

        # Set before any worker starts: each one then keeps its metric values in files
        # here that /metrics adds up.
        watchdog = self.notifier.watchdog
        for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
            os.environ.pop(name, None)  # the workers' own notifications would be refused
        if watchdog is not None:
            os.environ[BEAT_ENV] = str(watchdog / 4)
        self.notifier.status("binding the listeners")
        self.metrics_dir = tempfile.mkdtemp(prefix="postwarden-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = self.metrics_dir
        self.status_file = os.path.join(self.metrics_dir, "supervisor.json")
        os.environ[STATUS_ENV] = self.status_file
        self._metrics()
        ensure_tls_files(self.cfg)  # once, before workers race to create it
        self.sockets = bind_listeners(self.cfg)
        self.inbound_sockets = bind_inbound(self.cfg)
        self.control_sock = bind(self.cfg.control.listen, "control.listen")
        if self.cfg.metrics.listen:
            metrics_token(self.cfg)  # an unreadable token file stops here, once
            self.metrics_sock = bind(self.cfg.metrics.listen, "metrics.listen")
        if self.cfg.server.fork_workers:
            await self._start_fork_server()
        self.notifier.status("checking the control database")
        try:
            # Migrations, key file: once (in a fork of the fork server when it runs).
            await prepare_control(self.cfg, self.config_path, self.forks)
        except BaseException:
            await self._stop_fork_server()
            raise
        # The shaping broker of every worker (docs/decisions/0006); imported only now,
        # so that its metrics are written to the directory set above.
        from postwarden.metrics import ShapingMetrics
        from postwarden.shaping.service import ShapingService

        self.shaping = ShapingService(self.cfg, metrics=ShapingMetrics())
        await self.shaping.start(serve=True)
        self._write_status()
        self.notifier.status(f"starting {self.count} workers (each recovers its spool shard)")
        for k in range(self.count):
            await self._spawn(k)
        self._task(self._readiness())
        if watchdog is not None:
            self._task(self._watchdog(watchdog))
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda: asyncio.ensure_future(self.stop()))
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        log.info(
            "event=supervisor_started workers=%d smtp=%s inbound=%s control=%s loop=%s",
            self.count,
            ",".join("{}:{}".format(*s.getsockname()[:2]) for s in self.sockets),
            ",".join("{}:{}".format(*s.getsockname()[:2]) for s in self.inbound_sockets) or "-",
            "{}:{}".format(*self.control_sock.getsockname()[:2]),
            type(loop).__module__.split(".")[0],
        )
        await self._stopped.wait()
        self._stopped_cleanly()
        return 0

    def _metrics(self) -> None:
        """What the supervisor says for the whole appliance, and its own process's
        readings, in the directory /metrics sums (PROMETHEUS_MULTIPROC_DIR, set just
        before: prometheus-client must not have been imported yet); and the spool's run
        marker (vitals.py): the previous run's verdict, then ``running``."""
        from prometheus_client import values

        from postwarden.metrics import ApplianceMetrics, ProcessMetrics
        from postwarden.vitals import keep_vitals, mark_running

        if values.ValueClass is values.MutexValue:  # imported too early: in memory only
            log.error("event=supervisor_metrics_unsummed reason=prometheus_client_imported_early")
        m = self.appliance_metrics = ApplianceMetrics()
        m.workers.set(self.count)
        m.workers_alive.set(0)
        m.start_time.set(self.started_at)
        clean = mark_running(self.cfg.spool.path)
        m.previous_stop_clean.set(1 if clean else 0)
        if not clean:
            log.warning("event=previous_run_unclean spool=%s", self.cfg.spool.path)
        spool = str(self.cfg.spool.path)
        process = ProcessMetrics(others=self._fork_server_pid)
        self._task(keep_vitals(process, appliance=m, spool_dir=spool))

    def _fork_server_pid(self) -> list[int]:
        """The fork server, read with the supervisor (it writes no metrics itself)."""
        forks = self.forks
        return [forks.proc.pid] if forks is not None and forks.alive else []

    def _count_alive(self) -> None:
        alive = sum(1 for p in self.procs.values() if p.returncode is None)
        self.appliance_metrics.workers_alive.set(alive)

    def _stopped_cleanly(self) -> None:
        from postwarden.vitals import mark_stopped

        mark_stopped(self.cfg.spool.path)

    def _task(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _ready(self, index: int) -> bool:
        """Whether worker ``index`` has started: its ready file names its pid."""
        proc = self.procs.get(index)
        return proc is not None and ready_pid(self.metrics_dir, index) == proc.pid

    async def _readiness(self) -> None:
        """READY=1 once every worker has started (listeners serving, spool shard
        recovered)."""
        while not self._stopping:
            if all(self._ready(k) for k in range(self.count)):
                self.notifier.ready(f"serving: {self.count} workers")
                log.info("event=ready workers=%d", self.count)
                return
            await asyncio.sleep(0.1)

    def alive(self, limit: float, now: float | None = None) -> bool:
        """Whether every worker's event loop answers: each started one beat within
        ``limit`` seconds; one being (re)started is excused for START_GRACE."""
        now = time.time() if now is None else now
        for k, proc in self.procs.items():
            if proc.returncode is not None:
                continue  # dead: its restart is under way
            if not self._ready(k):
                if now - self.spawned_at.get(k, now) < START_GRACE:
                    continue
                return False
            age = beat_age(self.metrics_dir, k, now)
            if age is None or age > limit:
                return False
        return True

    async def _watchdog(self, interval: float) -> None:
        """WATCHDOG=1 every half interval, while every worker's loop beats."""
        quiet = False
        while not self._stopping:
            if self.alive(interval / 2):
                self.notifier.ping()
                quiet = False
            elif not quiet:
                quiet = True
                log.error("event=watchdog_withheld reason=worker_loop_not_beating")
            await asyncio.sleep(interval / 2)

    def _passed_fds(self) -> tuple[list[int], dict[str, str]]:
        """The descriptors a worker inherits, and the environment that names them."""
        assert self.control_sock is not None
        fds = [s.fileno() for s in self.sockets]
        inbound = [s.fileno() for s in self.inbound_sockets]
        env = {**os.environ, INBOUND_FDS_ENV: ",".join(map(str, inbound))}
        extra = []
        if self.metrics_sock is not None:
            extra.append(self.metrics_sock.fileno())
            env[METRICS_FD_ENV] = str(self.metrics_sock.fileno())
        return [*fds, *inbound, self.control_sock.fileno(), *extra], env

    async def _start_fork_server(self) -> None:
        """The fork server (forkserver.py), given every listening socket; its own
        metric files go to a directory /metrics does not read."""
        from postwarden.forkserver import ForkServer

        fds, env = self._passed_fds()
        own = os.path.join(self.metrics_dir, "forkserver")
        os.makedirs(own, exist_ok=True)
        forks = ForkServer()
        try:
            ready = await forks.start(fds, {**env, "PROMETHEUS_MULTIPROC_DIR": own})
        except OSError as exc:
            log.warning("event=fork_server_unavailable why=%r", str(exc))
            ready = False
        if ready:
            self.forks = forks

    async def _stop_fork_server(self) -> None:
        if self.forks is not None:
            forks, self.forks = self.forks, None
            await forks.stop()

    async def _spawn(self, index: int) -> None:
        assert self.control_sock is not None
        argv = [
            "worker",
            "--index", str(index), "--count", str(self.count),
            "--fds", ",".join(str(s.fileno()) for s in self.sockets),
            "--control-fd", str(self.control_sock.fileno()),
            "--parent", str(os.getpid()), "--role", self.role,
        ]  # fmt: skip
        if self.config_path:
            argv += ["--config", self.config_path]
        fds, env = self._passed_fds()
        proc: Any = None
        if self.forks is not None and self.forks.alive:
            try:
                proc = await self.forks.spawn(argv, env)
            except (ConnectionError, OSError, TimeoutError) as exc:
                log.warning("event=fork_failed worker=%d error=%r fallback=exec", index, str(exc))
        how = "forked"
        if proc is None:
            how = "execd"
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "postwarden.cli", *argv, pass_fds=fds, env=env
            )
        log.info("event=worker_%s worker=%d pid=%d", how, index, proc.pid)
        self.procs[index] = proc
        self.spawned_at[index] = time.time()
        self._write_status()
        self._count_alive()
        task = asyncio.create_task(self._watch(index, proc))
        self._watchers.add(task)
        task.add_done_callback(self._watchers.discard)

    async def _watch(self, index: int, proc: Any) -> None:
        code = await proc.wait()
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(proc.pid, self.metrics_dir)
        self._write_status()
        self._count_alive()
        if self._stopping:
            return
        self.restarts += 1
        self.appliance_metrics.worker_restarts.inc()
        log.error("event=worker_died worker=%d pid=%d code=%s restart_in=%.0fs",
                  index, proc.pid, code, RESTART_DELAY)  # fmt: skip
        await asyncio.sleep(RESTART_DELAY)
        if not self._stopping:
            await self._spawn(index)

    def _write_status(self) -> None:
        """What workers add to /healthz: every worker's state, as the supervisor sees it."""
        alive = sum(1 for p in self.procs.values() if p.returncode is None)
        data = {"workers": self.count, "workers_alive": alive,
                "worker_restarts": self.restarts, "stopping": self._stopping}  # fmt: skip
        try:
            replace_file(self.status_file, json.dumps(data))
        except OSError:
            log.warning("event=status_write_failed", exc_info=True)

    def reload(self) -> None:
        """Check the file, then let every worker reload it (each applies it itself);
        systemd hears RELOADING=1 first and READY=1 once every worker has said it
        handled the reload (or RELOAD_WAIT passed)."""
        self.notifier.reloading()
        signalled: dict[int, int] = {}
        try:
            signalled = self._reload()
        finally:
            if not signalled:
                self.notifier.ready(f"serving: {self.count} workers")
        if signalled:
            self._task(self._reloaded(self.reload_gen, signalled))

    def _reload(self) -> dict[int, int]:
        """The workers told to reload: index → pid (none if the file was refused)."""
        if self.config_path is None:
            log.info("event=reload_skipped reason=no_config_file")
            return {}
        try:
            new = check_files(load_config(self.config_path))
        except ConfigError as exc:
            log.error("event=reload_refused error=%r", str(exc))
            return {}
        if self.shaping is not None and self.shaping.reload(new) is not None:
            return {}
        self.cfg = new
        # The generation first, then the signal: a worker reads it when it reloads
        # and writes it back with what came of it.
        self.reload_gen += 1
        if not self.metrics_dir:
            return {}  # not running (no workers to tell)
        write_reload_generation(self.metrics_dir, self.reload_gen)
        signalled: dict[int, int] = {}
        for index, proc in self.procs.items():
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGHUP)
                    signalled[index] = proc.pid
        log.info("event=reload_begun generation=%d workers=%d", self.reload_gen, len(signalled))
        return signalled

    async def _reloaded(self, generation: int, signalled: dict[int, int]) -> None:
        """READY=1 after a reload once each signalled worker confirmed it (a worker
        that died meanwhile is excused: its successor reads the new file at start)."""
        deadline = time.monotonic() + RELOAD_WAIT
        waiting = dict(signalled)
        refused: list[int] = []
        while waiting and time.monotonic() < deadline:
            for index, pid in list(waiting.items()):
                proc = self.procs.get(index)
                if proc is None or proc.pid != pid or proc.returncode is not None:
                    del waiting[index]
                    continue
                said = reloaded(self.metrics_dir, index)
                if said is not None and said[0] == pid and said[1] >= generation:
                    del waiting[index]
                    if not said[2]:
                        refused.append(index)
            if waiting:
                await asyncio.sleep(0.05)
        if generation != self.reload_gen:
            return  # a newer reload is under way: it says READY=1
        status = f"serving: {self.count} workers"
        if waiting or refused:
            log.error("event=reload_unconfirmed generation=%d waiting=%s refused=%s",
                      generation, sorted(waiting), sorted(refused))  # fmt: skip
            status += "; reload not applied by workers " + ",".join(
                str(k) for k in sorted([*waiting, *refused])
            )
        else:
            log.info("event=reload_done generation=%d workers=%d", generation, len(signalled))
        self.notifier.ready(status)

    async def stop(self) -> None:
        if self._stopping:
            return
        self._stopping = True
        self.notifier.stopping()
        for task in list(self._tasks):
            task.cancel()
        self._write_status()
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
        await self._stop_fork_server()
        if self.shaping is not None:
            await self.shaping.stop()
        for sock in self.sockets + self.inbound_sockets:
            sock.close()
        if self.control_sock is not None:
            self.control_sock.close()
        if self.metrics_sock is not None:
            self.metrics_sock.close()
        shutil.rmtree(self.metrics_dir, ignore_errors=True)
        log.info("event=stopped")
        self._stopped.set()
