"""A private PostgreSQL server for the control-plane tests (Debian's binaries).

One server per test run, in a temporary directory, on 127.0.0.1 and a free port,
``fsync=off`` (a throwaway cluster); the migrations run once into a template database
and each test gets ``CREATE DATABASE … TEMPLATE`` of it.
"""

from __future__ import annotations

import asyncio
import glob
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


@dataclass
class PgServer:
    port: int
    datadir: Path
    proc: subprocess.Popen[bytes]
    counter: int = 0
    argv: tuple[str, ...] = ()  # how it was started: :meth:`restart` starts it again

    user: str | None = None  # whom it runs as (initdb refuses root)

    def stop(self) -> None:
        """A fast shutdown (``pg_ctl stop -m fast``: sessions are ended), as an
        operator's restart or a crash of the database host looks to its clients."""
        pg_ctl = str(Path(self.argv[self.argv.index("-D") - 1]).with_name("pg_ctl"))
        _run_as(self.user, [pg_ctl, "stop", "-D", str(self.datadir), "-m", "fast", "-w"])
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

    def new_database(self) -> str:
        """A fresh, migrated database for one test."""
        self.counter += 1
        name = f"t{os.getpid()}_{self.counter}"
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


def start_server() -> PgServer:
    """The tests' server: a cluster with a migrated template database."""
    server = start_cluster()
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


@pytest.fixture(scope="session")
def postgres() -> object:
    server = start_server()
    yield server
    stop_server(server)
