"""A private PostgreSQL server for the control-plane tests (Debian's binaries).

One server per test run, in a temporary directory, on 127.0.0.1 and a free port,
``fsync=off`` (a throwaway cluster); the migrations run once into a template database
and each test gets ``CREATE DATABASE … TEMPLATE`` of it (named after its process, so
that the workers of a run share the server).

Under pytest-xdist the run's workers share one server: the first that needs it starts
it and writes where it is in the directory the controller named (:data:`SHARED`), the
others read it there; the controller stops it when the run ends
(:func:`stop_shared`). Alone (no xdist), a process starts and stops its own.
"""

from __future__ import annotations

import asyncio
import fcntl
import glob
import itertools
import json
import os
import pwd
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from postwarden.store.db import upgrade_sync
from tests.peers import require_binary


def _bindir() -> str | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return str(Path(found[-1]).parent) if found else None


def _run_as(user: str | None, argv: list[str], **kw: object) -> subprocess.CompletedProcess[bytes]:
    if user:
        argv = [require_binary("runuser"), "-u", user, "--", *argv]
    return subprocess.run(argv, check=True, capture_output=True, **kw)  # type: ignore[call-overload,no-any-return]


_DATABASES = itertools.count(1)


@dataclass
class PgServer:
    port: int
    datadir: Path
    proc: subprocess.Popen[bytes]
    argv: tuple[str, ...] = ()  # how it was started: :meth:`restart` starts it again

    user: str | None = None  # whom it runs as (initdb refuses root)

    def stop(self) -> None:
        """A fast shutdown (``pg_ctl stop -m fast``: sessions are ended), as an
        operator's restart or a crash of the database host looks to its clients."""
        pg_ctl = str(Path(self.argv[self.argv.index("-D") - 1]).with_name("pg_ctl"))
        _run_as(self.user, [pg_ctl, "stop", "-D", str(self.datadir), "-m", "fast", "-w"])
        if self.proc is not None:  # None: another process started it (shared_server)
            self.proc.wait(30)

    def restart(self) -> None:
        """Start it again on the same port and data, and wait until it answers."""
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.wait_ready()

    def wait_ready(self) -> None:
        deadline = time.monotonic() + 30
        while True:
            try:
                self._sql("SELECT 1")
                return
            except Exception:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                    raise RuntimeError(f"postgres did not start: {err[-2000:]}") from None
                time.sleep(0.1)

    def url(self, db: str) -> str:
        return f"postgresql+asyncpg://pw@127.0.0.1:{self.port}/{db}"

    def _sql(self, sql: str) -> None:
        import asyncpg

        async def go() -> None:
            conn = await asyncpg.connect(
                host="127.0.0.1", port=self.port, user="pw", database="postgres"
            )
            try:
                await conn.execute(sql)
            finally:
                await conn.close()

        errors: list[BaseException] = []

        def run() -> None:
            try:
                asyncio.run(go())
            except BaseException as exc:
                errors.append(exc)

        t = threading.Thread(target=run)
        t.start()
        t.join()
        if errors:
            raise errors[0]

    def empty_database(self, prefix: str) -> str:
        """A new database with nothing in it (not even Alembic's table): its name."""
        name = f"{prefix}_{os.getpid()}_{next(_DATABASES)}"
        self._sql(f'CREATE DATABASE "{name}"')
        return name

    def new_database(self) -> str:
        """A fresh, migrated database for one test."""
        # Numbered in the process, not the server object: several fixtures of one
        # worker (a conftest each) hold the same shared server.
        name = f"t{os.getpid()}_{next(_DATABASES)}"
        self._sql(f'CREATE DATABASE "{name}" TEMPLATE pw_template')
        return self.url(name)


#: The server's settings: a throwaway cluster (no fsync), room for parallel tests.
SETTINGS = {
    "listen_addresses": "127.0.0.1",
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": "200",
}


def start_cluster(settings: dict[str, str] | None = None, prefix: str = "pw-pg-") -> PgServer:
    """A new cluster in a temporary directory, started on 127.0.0.1 and a free port
    with :data:`SETTINGS` (and ``settings`` over them), user ``pw`` trusted; returns
    once it answers. Also used by bench/events_query.py."""
    bindir = _bindir()
    if bindir is None:
        require_binary("pg_ctlcluster")  # skips, or fails in CI, with the package name
        raise AssertionError("unreachable")
    user = None
    if os.geteuid() == 0:  # initdb refuses root
        user = "postgres" if _has_user("postgres") else "nobody"
    root = Path(tempfile.mkdtemp(prefix=prefix))
    datadir = root / "data"
    datadir.mkdir()
    if user:
        pw = pwd.getpwnam(user)
        for p in (root, datadir):
            os.chown(p, pw.pw_uid, pw.pw_gid)
    _run_as(
        user,
        [f"{bindir}/initdb", "-D", str(datadir), "-U", "pw", "--auth=trust", "-E", "UTF8",
         "--no-sync"],
    )  # fmt: skip
    from tests.conftest import free_port

    port = free_port()
    argv = [f"{bindir}/postgres", "-D", str(datadir), "-k", str(root), "-p", str(port)]
    for k, v in {**SETTINGS, **(settings or {})}.items():
        argv += ["-c", f"{k}={v}"]
    if user:
        argv = [require_binary("runuser"), "-u", user, "--", *argv]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    server = PgServer(port, datadir, proc, argv=tuple(argv), user=user)
    try:
        server.wait_ready()
    except BaseException:
        stop_server(server)
        raise
    return server


def start_server(settings: dict[str, str] | None = None) -> PgServer:
    """The tests' server: a cluster with a migrated template database."""
    server = start_cluster(settings)
    server._sql("CREATE DATABASE pw_template")
    upgrade_sync(server.url("pw_template"))
    return server


def stop_server(server: PgServer) -> None:
    server.proc.terminate()
    try:
        server.proc.wait(10)
    except subprocess.TimeoutExpired:
        server.proc.kill()
    shutil.rmtree(server.datadir.parent, ignore_errors=True)


def _has_user(name: str) -> bool:
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


#: The environment variable naming the directory where a run's shared server is
#: described (set by the xdist controller, tests/conftest.py).
SHARED = "POSTWARDEN_TEST_PG_SHARED"


def shared_server(root: Path) -> PgServer:
    """The run's shared server: started by the first worker to ask (under a lock),
    found by the others in ``root/server.json``."""
    with open(root / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        info = root / "server.json"
        if info.exists():
            d = json.loads(info.read_text())
            return PgServer(d["port"], Path(d["datadir"]), None, argv=tuple(d["argv"]),  # type: ignore[arg-type]
                            user=d["user"])  # fmt: skip
        # Its log into files of its own (the logging collector): the worker holding
        # the other end of its stderr may finish first.
        server = start_server({"logging_collector": "on"})
        info.write_text(json.dumps({"port": server.port, "datadir": str(server.datadir),
                                    "argv": list(server.argv), "user": server.user}))  # fmt: skip
        return server


def stop_shared(root: Path) -> None:
    """Stop the run's shared server, if a worker started one (the controller, at the
    end of the run)."""
    info = root / "server.json"
    if info.exists():
        d = json.loads(info.read_text())
        server = PgServer(d["port"], Path(d["datadir"]), None, argv=tuple(d["argv"]),  # type: ignore[arg-type]
                          user=d["user"])  # fmt: skip
        try:
            server.stop()
        except (subprocess.CalledProcessError, OSError):
            pass  # already gone: its directory still goes
        shutil.rmtree(server.datadir.parent, ignore_errors=True)
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres() -> object:
    root = os.environ.get(SHARED)
    if root:
        yield shared_server(Path(root))  # the controller stops it
        return
    server = start_server()
    yield server
    stop_server(server)
