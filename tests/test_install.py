"""``postwarden install`` and ``uninstall`` into a temporary root (``--root``): the
files, their modes and owners (the uid and gid systemd-sysusers gave in the root's own
passwd), a second run that changes nothing, an operator's configuration kept, an
upgrade that migrates the database, and an uninstall that keeps the data unless
``--purge``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from postwarden.commands.install import (
    INCOMING_SESSIONS,
    MAX_NOFILE,
    MIN_NOFILE,
    OWN_FILES,
    InstallError,
    limit_nofile,
    render_unit,
    shipped,
)
from postwarden.store.check import check_database
from postwarden.store.db import head_revision
from tests.peers import require_binary

BIN = os.path.join(sys.prefix, "bin", "postwarden")


@pytest.fixture(autouse=True)
def _tools() -> None:
    require_binary("systemd-sysusers")
    require_binary("systemd-tmpfiles")
    if os.geteuid() != 0:
        pytest.skip("install makes a user and sets owners: run as root")


def postwarden(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("POSTWARDEN_")}
    return subprocess.run(
        [sys.executable, "-m", "postwarden.cli", *args],
        capture_output=True, text=True, env=env, timeout=120, check=False,
    )  # fmt: skip


def install(root: Path, *args: str) -> str:
    proc = postwarden("install", "--root", str(root), *args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def ids(root: Path, table: str, name: str) -> int:
    for line in (root / "etc" / table).read_text().splitlines():
        fields = line.split(":")
        if fields[0] == name:
            return int(fields[2])
    raise AssertionError(f"no {name} in {root}/etc/{table}")


def tree(root: Path) -> dict[str, tuple[int, int, int, int, bytes]]:
    """Every path under ``root``: mode, owner, group, mtime, content."""
    found = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        data = path.read_bytes() if path.is_file() else b""
        found[str(path.relative_to(root))] = (
            st.st_mode,
            st.st_uid,
            st.st_gid,
            st.st_mtime_ns,
            data,
        )
    return found


def stat(path: Path) -> tuple[int, int, int]:
    st = path.stat()
    return st.st_mode & 0o7777, st.st_uid, st.st_gid


def test_install_lays_out_the_host_and_a_second_run_changes_nothing(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    out = install(root)
    uid, gid = ids(root, "passwd", "postwarden"), ids(root, "group", "postwarden")
    assert uid != 0 and gid != 0 and uid < 1000  # a system user, made in the root
    assert "postwarden:x:" in (root / "etc/passwd").read_text()
    passwd = next(ln for ln in (root / "etc/passwd").read_text().splitlines()
                  if ln.startswith("postwarden:"))  # fmt: skip
    assert passwd.endswith(":/var/lib/postwarden:/usr/sbin/nologin")

    unit = (root / "etc/systemd/system/postwarden.service").read_text()
    assert f"\nExecStart={BIN} serve\n" in unit
    assert f"\nExecStartPre={BIN} check-config --no-database\n" in unit
    assert "/opt/postwarden/.venv/bin/postwarden check-config" not in unit
    assert f"\nLimitNOFILE={MIN_NOFILE}\n" in unit
    assert stat(root / "etc/systemd/system/postwarden.service") == (0o644, 0, 0)
    assert (root / "usr/lib/sysusers.d/postwarden.conf").read_text() == shipped(
        "postwarden.sysusers"
    )
    assert (root / "usr/lib/tmpfiles.d/postwarden.conf").read_text() == shipped(
        "postwarden.tmpfiles"
    )
    # The configuration: the service reads it, only root writes it.
    assert stat(root / "etc/postwarden") == (0o750, 0, gid)
    assert stat(root / "etc/postwarden/tls") == (0o750, 0, gid)
    assert stat(root / "etc/postwarden/postwarden.toml") == (0o640, 0, gid)
    assert (root / "etc/postwarden/postwarden.toml").read_text() == shipped("postwarden.toml")
    assert stat(root / "etc/postwarden/control.key") == (0o640, 0, gid)
    assert len((root / "etc/postwarden/control.key").read_bytes().strip()) == 44  # Fernet
    # The state directory: the service's own, no other user lists it.
    assert stat(root / "var/lib/postwarden") == (0o750, uid, gid)
    for line in ("wrote", "systemd-sysusers", "systemd-tmpfiles", "next: "):
        assert line in out, out
    assert "systemctl daemon-reload" not in out  # --root: never systemctl

    before = tree(root)
    again = install(root)
    assert "nothing to change" in again and "wrote" not in again, again
    assert tree(root) == before


def test_install_keeps_an_operators_configuration_and_key(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "etc/postwarden").mkdir(parents=True)
    config = root / "etc/postwarden/postwarden.toml"
    mine = '[server]\nhostname = "mta9.example.com"\n\n[delivery]\nmax_connections = 100000\n'
    config.write_text(mine)
    (root / "etc/postwarden/control.key").write_text("the operator's key\n")
    out = install(root)
    assert config.read_text() == mine
    assert (root / "etc/postwarden/control.key").read_text() == "the operator's key\n"
    # Made from an older shipped file or by hand: the shipped one is put beside it.
    assert (root / "etc/postwarden/postwarden.toml.new").read_text() == shipped("postwarden.toml")
    assert "kept " in out and "postwarden.toml.new" in out, out
    # LimitNOFILE from the operator's delivery.max_connections.
    unit = (root / "etc/systemd/system/postwarden.service").read_text()
    assert f"\nLimitNOFILE={100000 + INCOMING_SESSIONS + OWN_FILES}\n" in unit

    # The next run: the shipped file has not changed since, nothing is said or written.
    (root / "etc/postwarden/postwarden.toml.new").unlink()
    before = tree(root)
    again = install(root)
    assert "nothing to change" in again and "postwarden.toml.new" not in again, again
    assert tree(root) == before
    # A version that ships another file: beside it again.
    (root / "usr/share/postwarden/postwarden.toml").write_text("# an older shipped file\n")
    out = install(root)
    assert "postwarden.toml.new" in out and config.read_text() == mine


def test_a_bad_configuration_stops_the_install_before_anything_is_written(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "etc/postwarden").mkdir(parents=True)
    (root / "etc/postwarden/postwarden.toml").write_text("[delivery]\nmax_conections = 5\n")
    proc = postwarden("install", "--root", str(root))
    assert proc.returncode == 1
    assert "delivery.max_conections" in proc.stderr and "postwarden.toml" in proc.stderr
    assert not (root / "etc/systemd").exists() and not (root / "usr").exists()


def test_a_prefix_without_the_program_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    proc = postwarden("install", "--root", str(root), "--prefix", "/opt/postwarden/.venv")
    assert proc.returncode == 1
    assert f"{root}/opt/postwarden/.venv/bin/postwarden: no postwarden program" in proc.stderr
    # Given there (an image being built), the unit runs it from its place on the target.
    venv_bin = root / "opt/postwarden/.venv/bin"
    venv_bin.mkdir(parents=True)
    (venv_bin / "postwarden").symlink_to(BIN)
    install(root, "--prefix", "/opt/postwarden/.venv")
    unit = (root / "etc/systemd/system/postwarden.service").read_text()
    assert "\nExecStart=/opt/postwarden/.venv/bin/postwarden serve\n" in unit


def test_render_unit_refuses_a_path_systemd_would_split() -> None:
    for bad in ("/opt/post warden/bin/postwarden", "bin/postwarden", '/opt/"x"/postwarden'):
        with pytest.raises(InstallError, match="must be absolute"):
            render_unit(bad)
    assert "ExecStart=/opt/50%%/bin/postwarden serve" in render_unit("/opt/50%/bin/postwarden")


def test_limit_nofile_formula() -> None:
    assert limit_nofile(400) == MIN_NOFILE == 65536
    assert limit_nofile(40000) == 40000 + 32768 + 1024
    assert limit_nofile(10**7) == MAX_NOFILE == 1048576


def test_upgrade_migrates_the_database(tmp_path: Path) -> None:
    """An install already there: ``install`` runs ``db upgrade`` on the configured
    database (the shipped SQLite file, under the root) and moves its revision."""
    root = tmp_path / "root"
    root.mkdir()
    install(root)
    db = root / "var/lib/postwarden/postwarden.db"
    url = f"sqlite+aiosqlite:///{db}"
    setup = tmp_path / "setup.toml"
    setup.write_text(f'[database]\nurl = "{url}"\n')
    made = postwarden("--config", str(setup), "db", "upgrade", "0001")
    assert made.returncode == 0, made.stdout + made.stderr
    import asyncio

    assert asyncio.run(check_database(url)).revision == "0001"

    out = install(root)
    assert f"database upgraded: 0001 -> {head_revision()}" in out, out
    after = asyncio.run(check_database(url))
    assert after.ok and after.revision == head_revision()
    assert stat(db)[1:] == (ids(root, "passwd", "postwarden"), ids(root, "group", "postwarden"))
    # At its newest: the next run has nothing to do.
    assert "nothing to change" in install(root)


def test_uninstall_keeps_the_data_and_purge_removes_it(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    install(root)
    spool = root / "var/lib/postwarden/spool"
    spool.mkdir()
    (spool / "mail").write_text("not yet delivered")
    wants = root / "etc/systemd/system/multi-user.target.wants"
    wants.mkdir()
    (wants / "postwarden.service").symlink_to("/etc/systemd/system/postwarden.service")

    proc = postwarden("uninstall", "--root", str(root))
    assert proc.returncode == 0, proc.stderr
    for gone in ("etc/systemd/system/postwarden.service", "usr/lib/sysusers.d/postwarden.conf",
                 "usr/lib/tmpfiles.d/postwarden.conf",
                 "etc/systemd/system/multi-user.target.wants/postwarden.service"):  # fmt: skip
        assert not (root / gone).is_symlink() and not (root / gone).exists(), gone
    assert (spool / "mail").read_text() == "not yet delivered"
    assert (root / "etc/postwarden/postwarden.toml").exists()
    assert (root / "etc/postwarden/control.key").exists()
    assert "--purge removes them" in proc.stdout
    assert "nothing to remove" in postwarden("uninstall", "--root", str(root)).stdout

    proc = postwarden("uninstall", "--root", str(root), "--purge")
    assert proc.returncode == 0, proc.stderr
    assert not (root / "etc/postwarden").exists() and not (root / "var/lib/postwarden").exists()
    assert "postwarden:x:" in (root / "etc/passwd").read_text()  # the user stays
