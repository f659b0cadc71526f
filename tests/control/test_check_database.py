"""``database.url`` checked before anything runs on it (issue 18, item 3).

Each way an operator's URL can be wrong gives its kind (``check_database``) and the
same one line from ``postwarden check-config`` and ``postwarden db current`` (exit 2
only when the database is down), never a traceback and never the password. The
PostgreSQL cases run against a real private server (tests/pg.py): a wrong password, a
closed port, a missing database, no schema, an older and a newer schema. ``db
upgrade|downgrade|history`` move and show the revision; ``serve`` stops on a database
that needs a person, and starts on one that is down.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from postwarden.config import load_config
from postwarden.control import ControlPlaneError
from postwarden.store.check import DbCheck, check_database, redact, shipped_revisions
from postwarden.store.db import create_engine, current_revision, head_revision, upgrade_sync
from postwarden.supervisor import DB_CHECKED_ENV, prepare_control
from tests.conftest import cli_here, free_port, write_toml
from tests.pg import PgServer

SECRET = "Sekr1t-pa55"  # in every PostgreSQL URL here: it must never be printed


def config(tmp_path: Path, url: str, **more: Any) -> Path:
    return write_toml(
        tmp_path / "postwarden.toml",
        {
            "database": {"url": url, **more},
            "spool": {"path": str(tmp_path / "spool")},
            "control": {"encryption_key_file": str(tmp_path / "control.key")},
        },
    )


async def cli(path: Path, *args: str, hide: str | None = None) -> tuple[int, str]:
    """The CLI against ``path``; ``hide``: a module made not installed for it (as
    ``importlib.util.find_spec`` sees one that is absent)."""
    if hide is None:
        code, out, err = await asyncio.to_thread(cli_here, *args, "--config", str(path))
        return code, out + err
    code = (
        f"import sys; sys.modules[{hide!r}] = None; from postwarden.cli import main;"
        " sys.exit(main())"
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, *args, "--config", str(path),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode or 0, out.decode()


async def assert_reported(path: Path, check: DbCheck, hide: str | None = None) -> None:
    """check-config and db current print ``check.line`` alone, with the right code."""
    assert not check.ok and "\n" not in check.line and SECRET not in check.line
    code, out = await cli(path, "check-config", hide=hide)
    assert (code, out.strip()) == (1, check.line), out
    code, out = await cli(path, "db", "current", hide=hide)
    assert (code, out.strip()) == (2 if check.kind == "unreachable" else 1, check.line), out


def pg_url(server: PgServer, db: str, user: str = "pw", port: int | None = None) -> str:
    return f"postgresql+asyncpg://{user}:{SECRET}@127.0.0.1:{port or server.port}/{db}"


async def empty_database(server: PgServer) -> str:
    """A database with nothing in it: no Postwarden tables, no Alembic revision."""
    return await asyncio.to_thread(server.empty_database, "bare")


# ------------------------------------------------------------------ URLs and drivers


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("not a url", "'not a url' is not a database URL"),
        (
            f"postgres://pw:{SECRET}@db.invalid/mail",
            "names no driver Postwarden uses: write postgresql+asyncpg://pw:***@db.invalid/mail",
        ),
        (
            f"postgresql://pw:{SECRET}@db.invalid:5433/mail",
            "write postgresql+asyncpg://pw:***@db.invalid:5433/mail",
        ),
        ("sqlite:///var/pw.db", "write sqlite+aiosqlite:///var/pw.db"),
        (f"mysql+aiomysql://pw:{SECRET}@db.invalid/mail", "unsupported scheme 'mysql+aiomysql'"),
    ],
)
async def test_a_url_that_is_not_one_we_use_is_bad_url(tmp_path: Path, url: str, says: str) -> None:
    check = await check_database(url)
    assert check.kind == "bad_url" and says in check.line, check.line
    await assert_reported(config(tmp_path, url), check)


async def test_more_urls_that_are_not_usable_are_bad_url() -> None:
    for url, says in [
        ("", "is not a database URL (it is empty)"),
        (f"postgresql+asyncpg://pw:{SECRET}@db.invalid:99999/mail", "port 99999"),
        (f"postgresql+asyncpg://pw:{SECRET}@db.invalid:port/mail", "is not a database URL"),
        (f"postgresql+asyncpg://pw:{SECRET}@db.invalid", "names no database"),
    ]:
        check = await check_database(url)
        assert check.kind == "bad_url" and says in check.line, check.line
        assert SECRET not in check.line


async def test_a_driver_not_installed_is_no_driver(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"postgresql+asyncpg://pw:{SECRET}@db.invalid/mail"
    monkeypatch.setitem(sys.modules, "asyncpg", None)  # as find_spec sees a missing one
    check = await check_database(url)
    monkeypatch.undo()
    assert check.kind == "no_driver" and "'asyncpg'" in check.line, check.line
    await assert_reported(config(tmp_path, url), check, hide="asyncpg")


def test_redact_hides_the_password_wherever_it_is() -> None:
    assert redact(f"postgresql+asyncpg://pw:{SECRET}@h/db") == "postgresql+asyncpg://pw:***@h/db"
    assert SECRET not in redact(f"postgresql+asyncpg://pw@h/db?password={SECRET}")
    assert SECRET not in redact(f"postgresql+asyncpg://pw:{SECRET}@h:port/db")  # no URL
    assert redact("sqlite+aiosqlite:///./var/pw.db") == "sqlite+aiosqlite:///./var/pw.db"


# ------------------------------------------------------------------ PostgreSQL


@pytest.fixture
async def password_role(postgres: PgServer) -> AsyncIterator[str]:
    """A role that must give its password (scram-sha-256): the private server trusts
    every other role, so a rule for this one alone goes first in its pg_hba.conf."""
    hba = postgres.datadir / "pg_hba.conf"
    rule = "host all pw_pass 127.0.0.1/32 scram-sha-256\n"
    if not hba.read_text().startswith(rule):
        hba.write_text(rule + hba.read_text())
        await asyncio.to_thread(postgres._sql, "CREATE ROLE pw_pass LOGIN PASSWORD 'right'")
        await asyncio.to_thread(postgres._sql, "SELECT pg_reload_conf()")
    deadline = time.monotonic() + 30
    while True:  # the reload is asynchronous: wait until the rule is in force
        try:
            conn = await asyncpg.connect(
                host="127.0.0.1", port=postgres.port, user="pw_pass", password="wrong",
                database="postgres",
            )  # fmt: skip
        except asyncpg.InvalidPasswordError:
            break
        await conn.close()
        assert time.monotonic() < deadline, "pg_hba.conf reload not in force"
        await asyncio.sleep(0.05)
    yield "pw_pass"


async def test_a_wrong_password_is_auth(
    postgres: PgServer, password_role: str, tmp_path: Path
) -> None:
    url = pg_url(postgres, "postgres", user=password_role)
    check = await check_database(url)
    assert check.kind == "auth", check.line
    assert "password authentication failed for user" in check.line
    await assert_reported(config(tmp_path, url), check)


async def test_a_role_that_does_not_exist_is_auth(postgres: PgServer) -> None:
    check = await check_database(pg_url(postgres, "postgres", user="nobody_here"))
    assert check.kind == "auth" and "nobody_here" in check.line, check.line


async def test_a_closed_port_is_unreachable_and_db_current_exits_2(
    postgres: PgServer, tmp_path: Path
) -> None:
    url = pg_url(postgres, "postgres", port=free_port())  # nothing listens there
    check = await check_database(url)
    assert check.kind == "unreachable" and "connection refused" in check.line, check.line
    await assert_reported(config(tmp_path, url), check)


async def test_a_server_that_never_answers_is_unreachable_after_the_timeout() -> None:
    # The kernel completes the TCP handshake (the backlog); nobody ever reads.
    with socket.create_server(("127.0.0.1", 0)) as silent:
        port = silent.getsockname()[1]
        url = f"postgresql+asyncpg://pw:{SECRET}@127.0.0.1:{port}/mail"
        check = await check_database(url, timeout=0.5)
    assert check.kind == "unreachable" and "no answer" in check.line, check.line


async def test_a_missing_database_is_no_database(postgres: PgServer, tmp_path: Path) -> None:
    url = pg_url(postgres, "no_such_db")
    check = await check_database(url)
    assert check.kind == "no_database" and "'no_such_db' does not exist" in check.line
    await assert_reported(config(tmp_path, url), check)


async def test_schema_none_older_and_newer_are_reported_and_current_is_ok(
    postgres: PgServer, tmp_path: Path
) -> None:
    url = pg_url(postgres, await empty_database(postgres))
    path = config(tmp_path, url)
    check = await check_database(url)
    assert check.kind == "unmigrated" and "run `postwarden db upgrade`" in check.line
    await assert_reported(path, check)

    await asyncio.to_thread(upgrade_sync, url, "0002")
    check = await check_database(url)
    assert (check.kind, check.revision) == ("behind", "0002"), check.line
    assert f"at revision 0002, this version needs {head_revision()}" in check.line
    assert "run `postwarden db upgrade`" in check.line
    await assert_reported(path, check)

    await asyncio.to_thread(upgrade_sync, url)
    check = await check_database(url)
    assert check == DbCheck(
        True, "ok", f"database ok: {redact(url)} at revision {head_revision()}", head_revision()
    )
    code, out = await cli(path, "check-config")
    assert code == 0 and out.splitlines() == [f"config ok: {path}", check.line], out
    code, out = await cli(path, "db", "current")
    assert (code, out.strip()) == (0, check.line)

    # A newer Postwarden upgraded it: a revision this version does not ship.
    engine = create_engine(url)
    try:
        async with engine.begin() as conn:
            await conn.exec_driver_sql("UPDATE alembic_version SET version_num = 'f00d'")
    finally:
        await engine.dispose()
    check = await check_database(url)
    assert (check.kind, check.revision) == ("ahead", "f00d"), check.line
    assert "upgraded by a newer Postwarden" in check.line
    await assert_reported(path, check)
    code, out = await cli(path, "db", "upgrade")  # never over a schema it does not know
    assert (code, out.strip()) == (1, check.line)
    assert await current_revision(url) == "f00d"


# ------------------------------------------------------------------ SQLite


async def test_sqlite_missing_file_is_unmigrated_and_is_not_created(tmp_path: Path) -> None:
    db = tmp_path / "var" / "pw.db"
    url = f"sqlite+aiosqlite:///{db}"
    check = await check_database(url)
    assert check.kind == "unmigrated" and "does not exist yet" in check.line
    await assert_reported(config(tmp_path, url), check)
    assert not db.exists() and not db.parent.exists()  # a check writes nothing


async def test_sqlite_file_that_is_not_a_database_is_connect(tmp_path: Path) -> None:
    db = tmp_path / "pw.db"
    db.write_bytes(b"these are not the tables you are looking for" * 100)
    url = f"sqlite+aiosqlite:///{db}"
    check = await check_database(url)
    assert check.kind == "connect" and "not a database" in check.line, check.line
    await assert_reported(config(tmp_path, url), check)


async def test_check_config_accepts_an_old_schema_when_auto_upgrade_is_on(
    tmp_path: Path,
) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'pw.db'}"
    await asyncio.to_thread(upgrade_sync, url, "0001")
    code, out = await cli(config(tmp_path, url, auto_upgrade=True), "check-config")
    assert code == 0, out
    assert f"at revision 0001: database.auto_upgrade upgrades it to {head_revision()}" in out


# ------------------------------------------------------------------ db upgrade, downgrade, history


@pytest.fixture(params=["sqlite", "postgresql"])
async def bare_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "postgresql":
        server = request.getfixturevalue("postgres")
        return pg_url(server, await empty_database(server))
    return f"sqlite+aiosqlite:///{tmp_path / 'var' / 'pw.db'}"


async def test_db_upgrade_downgrade_and_history(bare_url: str, tmp_path: Path) -> None:
    url, path, head = bare_url, config(tmp_path, bare_url), head_revision()
    shipped = [rev for rev, _doc in shipped_revisions()]
    assert shipped[0] == "0001" and shipped[-1] == head and len(shipped) >= 5
    before_head = shipped[-2]
    code, out = await cli(path, "db", "history")
    lines = out.splitlines()
    assert code == 0 and lines[1:6] == [
        "  0001  control plane: tenants, keys, domains, suppressions, messages, events",
        "  0002  pools made through the API; a tenant's default and allowed pools (issue 7)",
        "  0003  indexes on the time columns that retention prunes by (issue 15, item 20)",
        "  0004  indexes for listing messages (issue 18, item 5)",
        "  0005  indexes for the event filters; PostgreSQL's hour and tag rollups (issue 18,"
        " item 6)" + (" (newest)" if head == "0005" else ""),
    ]
    newest = [ln for ln in lines if ln.endswith("(newest)")]
    assert len(newest) == 1 and newest[0].startswith(f"  {head}  ")
    assert "run `postwarden db upgrade`" in lines[-1]

    code, out = await cli(path, "db", "upgrade", "0002")
    assert (code, out.strip()) == (0, "database upgraded: none -> 0002"), out
    code, out = await cli(path, "db", "history")
    assert code == 0 and [ln for ln in out.splitlines() if ln.startswith("*")] == [
        "* 0002  pools made through the API; a tenant's default and allowed pools (issue 7)"
    ]

    code, out = await cli(path, "db", "upgrade")
    assert code == 0, out
    assert out.splitlines() == [
        f"database upgraded: 0002 -> {head}",
        f"database ok: {redact(url)} at revision {head}",
    ]
    assert SECRET not in out

    code, out = await cli(path, "db", "downgrade")
    assert code == 1 and "needs a REVISION" in out
    code, out = await cli(path, "db", "downgrade", "-1")
    assert code == 0 and out.startswith(f"database downgraded: {head} -> {before_head}"), out
    code, out = await cli(path, "db", "downgrade", "0002")
    assert code == 0 and out.startswith(f"database downgraded: {before_head} -> 0002"), out
    assert await current_revision(url) == "0002"
    code, out = await cli(path, "db", "downgrade", "0003")
    assert code == 1 and "is above the database's revision 0002" in out
    code, out = await cli(path, "db", "downgrade", "nope")
    assert code == 1 and "no revision 'nope'" in out
    code, out = await cli(path, "db", "upgrade", "nope")
    assert code == 1 and "no revision 'nope'" in out
    code, out = await cli(path, "db", "downgrade", "base")  # every table: not by accident
    assert code == 1 and "--drop-all" in out
    assert await current_revision(url) == "0002"
    code, out = await cli(path, "db", "downgrade", "base", "--drop-all")
    assert code == 0 and out.startswith("database downgraded: 0002 -> none"), out
    assert await current_revision(url) is None
    code, out = await cli(path, "db", "upgrade")
    assert code == 0 and out.splitlines()[-1] == f"database ok: {redact(url)} at revision {head}"


# ------------------------------------------------------------------ at start


async def test_prepare_control_goes_on_when_the_database_is_down(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    url = f"postgresql+asyncpg://pw:{SECRET}@127.0.0.1:{free_port()}/mail"  # closed port
    path = config(tmp_path, url)
    monkeypatch.setenv(DB_CHECKED_ENV, "")
    monkeypatch.delenv(DB_CHECKED_ENV)
    with caplog.at_level(logging.WARNING, logger="postwarden.supervisor"):
        await prepare_control(load_config(path), str(path))  # returns: no raise
    assert DB_CHECKED_ENV not in os.environ  # the workers check when it comes
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith("event=database_unavailable at=start action=current")
    assert "connection refused" in warnings[0] and SECRET not in warnings[0]


async def test_prepare_control_stops_with_the_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"postgres://pw:{SECRET}@127.0.0.1/mail"
    path = config(tmp_path, url)
    monkeypatch.setenv(DB_CHECKED_ENV, "")
    monkeypatch.delenv(DB_CHECKED_ENV)
    with pytest.raises(ControlPlaneError) as err:
        await prepare_control(load_config(path), str(path))
    assert str(err.value) == (await check_database(url)).line
    assert DB_CHECKED_ENV not in os.environ


async def test_prepare_control_marks_a_current_database_checked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'pw.db'}"
    path = config(tmp_path, url, auto_upgrade=True)
    monkeypatch.setenv(DB_CHECKED_ENV, "")
    monkeypatch.delenv(DB_CHECKED_ENV)
    await prepare_control(load_config(path), str(path))
    assert os.environ[DB_CHECKED_ENV] == "1"
    assert await current_revision(url) == head_revision()


async def test_serve_on_an_unmigrated_database_exits_with_one_clear_line(
    postgres: PgServer, tmp_path: Path
) -> None:
    url = pg_url(postgres, await empty_database(postgres))
    path = write_toml(
        tmp_path / "serve.toml",
        {
            "server": {"workers": 2, "hostname": "postwarden.test"},
            "smtp": {"listen": [f"127.0.0.1:{free_port()}"]},
            "control": {
                "listen": f"127.0.0.1:{free_port()}",
                "encryption_key_file": str(tmp_path / "control.key"),
            },
            "spool": {"path": str(tmp_path / "spool")},
            "database": {"url": url},
            "dns": {"nameservers": ["127.0.0.1:1"]},
        },
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "postwarden.cli", "serve", "--config", str(path),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        env={**os.environ, "TMPDIR": str(tmp_path)},  # its metrics directory: here
    )  # fmt: skip
    out = (await asyncio.wait_for(proc.communicate(), 60))[0].decode()
    code = proc.returncode
    check = await check_database(url)
    assert check.kind == "unmigrated"
    assert code != 0 and "Traceback" not in out and SECRET not in out, out
    assert [ln for ln in out.splitlines() if "database" in ln] == [f"postwarden: {check.line}"]
    assert out.count("postwarden db upgrade") == 1
