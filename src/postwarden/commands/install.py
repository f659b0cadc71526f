"""``postwarden install`` and ``uninstall``: lay out (or remove) a host for the systemd
service (docs/production.md sections 1, 5 and 7).

``install`` writes the unit (its ``ExecStart`` pointing at the ``postwarden`` of the
environment that runs the command), the sysusers.d and tmpfiles.d snippets, a commented
configuration when there is none, and the encryption key when there is none; makes the
user, the directories and their owners with ``systemd-sysusers`` and
``systemd-tmpfiles``. On an installed host it is an upgrade: the database migrations
run before the service, if it was running, is started again. Every step is printed; a
second run changes nothing.

``--root DIR`` lays the host out under DIR (tests, image building): the user is made
in DIR's ``/etc/passwd``, owners come from there, and systemctl is never called.
"""

from __future__ import annotations

import argparse
import contextlib
import grp
import importlib.resources
import json
import os
import pwd
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from postwarden.config import ConfigError, load_config

SERVICE = "postwarden.service"
USER = "postwarden"
#: Where the shipped unit runs the program; replaced by the environment's own.
SHIPPED_BIN = "/opt/postwarden/.venv/bin/postwarden"

# Paths on the target system (relative to --root).
UNIT = "etc/systemd/system/postwarden.service"
WANTS = "etc/systemd/system/multi-user.target.wants/postwarden.service"
SYSUSERS = "usr/lib/sysusers.d/postwarden.conf"
TMPFILES = "usr/lib/tmpfiles.d/postwarden.conf"
#: The configuration this version ships, kept to tell whether the next one changed.
SHIPPED_CONFIG = "usr/share/postwarden/postwarden.toml"
CONFIG_DIR = "etc/postwarden"
CONFIG = "etc/postwarden/postwarden.toml"
KEY = "etc/postwarden/control.key"
STATE_DIR = "var/lib/postwarden"

#: Open files per process (the unit's comment): every outgoing connection in one
#: worker, this many incoming sessions, and the worker's own descriptors.
INCOMING_SESSIONS = 32768
OWN_FILES = 1024
MIN_NOFILE = 65536
MAX_NOFILE = 1048576  # the kernel's default fs.nr_open

#: Paths the unit hides from the service (ProtectHome=, PrivateTmp=): a program there
#: cannot start.
_HIDDEN = ("/home", "/root", "/run/user", "/tmp", "/var/tmp")  # noqa: S108 - not used as files


class InstallError(Exception):
    """Something that stops the install, said in one line."""


def limit_nofile(max_connections: int) -> int:
    """``LimitNOFILE`` for ``delivery.max_connections`` (the formula in the unit)."""
    return min(MAX_NOFILE, max(MIN_NOFILE, max_connections + INCOMING_SESSIONS + OWN_FILES))


def shipped(name: str) -> str:
    """A file of ``systemd/`` as this version ships it."""
    return (importlib.resources.files("postwarden") / "systemd" / name).read_text("utf-8")


def render_unit(binary: str, nofile: int = MIN_NOFILE) -> str:
    """The unit with ``binary`` as the program and ``nofile`` as LimitNOFILE."""
    if not binary.startswith("/") or re.search(r"[\s\"'\\;]", binary):
        raise InstallError(
            f"{binary!r}: the program's path must be absolute, without spaces, quotes,"
            " backslashes or semicolons (systemd's ExecStart= would split it)"
        )
    text = shipped("postwarden.service")
    # % starts a specifier in a unit: doubled. A function as replacement: no escapes.
    program = binary.replace("%", "%%")
    text, programs = re.subn(
        rf"^(ExecStartPre=|ExecStart=){re.escape(SHIPPED_BIN)}\b",
        lambda m: m.group(1) + program, text, flags=re.M,
    )  # fmt: skip
    text, limits = re.subn(r"^LimitNOFILE=\d+$", f"LimitNOFILE={nofile}", text, flags=re.M)
    if (programs, limits) != (2, 1):
        raise InstallError("the shipped unit does not have the lines install replaces")
    return text


@dataclass
class Host:
    """The host being laid out: ``/``, or a directory standing for it."""

    root: Path
    changed: list[str] = field(default_factory=list)

    @property
    def live(self) -> bool:
        return self.root == Path("/")

    def path(self, rel: str) -> Path:
        return self.root / rel

    def show(self, rel: str) -> str:
        return "/" + rel if self.live else str(self.root / rel)

    def step(self, text: str) -> None:
        print(text, flush=True)

    # -- users, from the host's own files under --root (systemd-sysusers wrote them)
    def _lookup(self, table: str, name: str) -> int:
        if self.live:
            try:
                if table == "passwd":
                    return pwd.getpwnam(name).pw_uid
                return grp.getgrnam(name).gr_gid
            except KeyError:
                raise InstallError(
                    f"no {table} entry {name!r} (systemd-sysusers failed?)"
                ) from None
        with contextlib.suppress(FileNotFoundError):
            for line in self.path(f"etc/{table}").read_text("utf-8").splitlines():
                fields = line.split(":")
                if len(fields) > 2 and fields[0] == name:
                    return int(fields[2])
        if name == "root":
            return 0
        raise InstallError(f"no entry {name!r} in {self.show('etc/' + table)}")

    def uid(self, name: str) -> int:
        return self._lookup("passwd", name)

    def gid(self, name: str) -> int:
        return self._lookup("group", name)

    # -- files
    def write(self, rel: str, text: str, mode: int, owner: str = "root", group: str = "root",
              what: str = "") -> bool:  # fmt: skip
        """Write ``rel`` if its content, mode or owner differ; say so. True if it did."""
        path = self.path(rel)
        data = text.encode("utf-8")
        uid, gid = self.uid(owner), self.gid(group)
        try:
            st = path.lstat()
            same = path.read_bytes() == data
        except FileNotFoundError:
            st, same = None, False
        if (
            same
            and st is not None
            and (st.st_mode & 0o7777, st.st_uid, st.st_gid) == (mode, uid, gid)
        ):
            return False
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            self._own(tmp, mode, uid, gid)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        verb = "wrote" if st is None else "updated" if not same else "fixed owner/mode of"
        self.step(f"{verb} {self.show(rel)}{f' ({what})' if what else ''}")
        self.changed.append(rel)
        return True

    def _own(self, path: Path, mode: int, uid: int, gid: int) -> None:
        os.chown(path, uid, gid, follow_symlinks=False)
        os.chmod(path, mode)

    def remove(self, rel: str) -> bool:
        path = self.path(rel)
        if not path.is_symlink() and not path.exists():
            return False
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
        self.step(f"removed {self.show(rel)}")
        self.changed.append(rel)
        return True

    # -- programs
    def run(self, argv: list[str], *, check: bool = True, **kw: object) -> int:
        self.step("running: " + " ".join(argv))
        proc = subprocess.run(argv, check=False, **kw)  # type: ignore[call-overload]
        if check and proc.returncode != 0:
            raise InstallError(f"`{' '.join(argv)}` exited with {proc.returncode}")
        return int(proc.returncode)

    def systemctl(self, *args: str, check: bool = True) -> int:
        return self.run([_tool("systemctl"), *args], check=check)

    def active(self) -> bool:
        argv = [_tool("systemctl"), "is-active", "--quiet", SERVICE]
        return subprocess.run(argv, check=False).returncode == 0


def _tool(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin:/sbin:/bin")
    if not found:
        raise InstallError(f"{name} not found: install Debian's systemd package")
    return found


def _binary(args: argparse.Namespace, host: Host) -> str:
    """The ``postwarden`` the unit runs: PREFIX/bin/postwarden (PREFIX on the target
    system: under --root it is looked for there), else this environment's."""
    if args.prefix:
        prefix = Path(args.prefix)
        if not prefix.is_absolute():
            raise InstallError(f"--prefix {args.prefix}: give an absolute path")
        binary = str(prefix / "bin" / "postwarden")
        on_disk = host.path(binary.lstrip("/"))
    else:
        binary = os.path.join(sys.prefix, "bin", "postwarden")
        on_disk = Path(binary)
    if not os.access(on_disk, os.X_OK):
        raise InstallError(
            f"{on_disk}: no postwarden program there (install the package into that"
            " environment, or name another with --prefix)"
        )
    # With --prefix the interpreter is the target's, not this one.
    paths = [binary] if args.prefix else [binary, os.path.realpath(sys.executable)]
    hidden = [p for p in _HIDDEN if any(c == p or c.startswith(p + "/") for c in paths)]
    if hidden:
        msg = (
            f"{binary} (or its interpreter {os.path.realpath(sys.executable)}) is under"
            f" {hidden[0]}, which the unit hides from the service (ProtectHome=,"
            " PrivateTmp=): use an environment elsewhere, e.g. /opt/postwarden/.venv"
        )
        if host.live:
            raise InstallError(msg)
        host.step(f"warning: {msg}")
    return binary


def _config(host: Host) -> int:
    """LimitNOFILE from the host's configuration (the defaults when it has none)."""
    path = host.path(CONFIG)
    try:
        cfg = load_config(path if path.exists() else None, environ={})
    except ConfigError as exc:
        raise InstallError(f"{host.show(CONFIG)}: {exc}") from exc
    return limit_nofile(cfg.delivery.max_connections)


def _key() -> str:
    from cryptography.fernet import Fernet

    return Fernet.generate_key().decode() + "\n"


def _database_url(host: Host) -> str | None:
    """Under --root, a SQLite file of the configuration is the one under DIR (its path
    relative to the state directory, the service's working directory); None: the URL
    as configured (live, or a database server)."""
    from sqlalchemy.engine import make_url

    url = load_config(host.path(CONFIG), environ={}).database.url
    if host.live:
        return None
    try:
        parsed = make_url(url)
    except Exception:  # `db upgrade` says what is wrong with it
        return None
    if not parsed.drivername.startswith("sqlite") or parsed.database in (None, "", ":memory:"):
        return None
    path = Path("/", STATE_DIR, parsed.database)  # on the target system
    return parsed.set(database=str(host.root / path.relative_to("/"))).render_as_string(
        hide_password=False
    )


_CHECK = """
import json, sys
from postwarden.commands.common import run_async
from postwarden.config import load_config
from postwarden.store.check import check_database
check = run_async(check_database(load_config(sys.argv[1]).database.url))
print(json.dumps({"kind": check.kind, "line": check.line}))
"""


class _Db:
    """The configured database, reached as the service reaches it: on a live host as
    its user (its files, its PostgreSQL role), from its working directory."""

    def __init__(self, host: Host) -> None:
        self.host = host
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("POSTWARDEN_")}
        self.url = _database_url(host)
        if self.url is not None:
            self.env["POSTWARDEN_DATABASE__URL"] = self.url
        self.kw: dict[str, object] = {"env": self.env, "cwd": str(host.path(STATE_DIR))}
        if host.live:
            self.kw.update(user=USER, group=USER, extra_groups=[])

    def _run(self, *argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(  # type: ignore[call-overload]
            [sys.executable, *argv], check=False, capture_output=True, text=True, **self.kw
        )

    def behind(self) -> bool:
        """True when the migrations have work to do; False when the database is at
        this version's newest or not set up yet; InstallError for anything else."""
        proc = self._run("-c", _CHECK, str(self.host.path(CONFIG)))
        try:
            check = json.loads(proc.stdout.strip().splitlines()[-1])
        except (IndexError, ValueError):
            raise InstallError(f"the database check failed: {proc.stderr.strip()}") from None
        kind, line = check["kind"], check["line"]
        self.host.step(f"database: {line}")
        if kind == "behind":
            return True
        if kind in ("ok", "unmigrated", "no_database"):
            if kind != "ok":
                self.host.step(
                    "  not set up yet: `postwarden db upgrade` once it is"
                    " (docs/production.md section 2)"
                )
            return False
        raise InstallError(
            "the database cannot be migrated now (above); the service was left as it"
            " was: fix that, then run `postwarden install` again"
        )

    def upgrade(self) -> None:
        host = self.host
        host.step("running: postwarden db upgrade")
        proc = self._run("-m", "postwarden.cli", "--config", str(host.path(CONFIG)), "db",
                         "upgrade")  # fmt: skip
        for line in (proc.stdout + proc.stderr).splitlines():
            host.step(f"  {line}")
        if proc.returncode != 0:
            raise InstallError(
                "the database migrations failed (above): fix that, then run `postwarden"
                " install` again"
            )
        host.changed.append("database")
        if self.url is not None:
            # Made by root here, used by the service: its own, as on a live host.
            from sqlalchemy.engine import make_url

            db = str(make_url(self.url).database)
            uid, gid = host.uid(USER), host.gid(USER)
            for name in (db, f"{db}-wal", f"{db}-shm", f"{db}-journal"):
                with contextlib.suppress(FileNotFoundError):
                    os.chown(name, uid, gid)
                    os.chmod(name, 0o640)


def _code_is_newer(host: Host) -> bool:
    """Whether this environment's postwarden was installed after the running service
    started (a restart then runs the new code)."""
    out = subprocess.run(
        [_tool("systemctl"), "show", "--timestamp=unix", "-P", "ExecMainStartTimestamp",
         SERVICE],
        check=False, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    try:
        started = float(out.lstrip("@"))
    except ValueError:
        return True
    import postwarden

    return Path(postwarden.__file__).stat().st_mtime > started


def _upgrade(host: Host) -> None:
    """The migrations, if the database is behind, with the service stopped if it runs
    (the code it runs would meet a schema it does not know); started again after, and
    also when the unit or the code changed."""
    db = _Db(host)
    migrate = db.behind()
    if not host.live:
        if migrate:
            db.upgrade()
        return
    running = host.active()
    restart = running and (migrate or bool(host.changed) or _code_is_newer(host))
    if restart:
        host.systemctl("stop", SERVICE)
    if migrate:
        try:
            db.upgrade()
        except InstallError:
            if restart:
                host.step(f"{SERVICE} stays stopped: this version would refuse the database")
            raise
    if restart:
        host.systemctl("start", SERVICE)
        host.changed.append("restarted")


def install(args: argparse.Namespace) -> int:
    host = Host(Path(os.path.abspath(args.root)))
    if os.geteuid() != 0:
        raise InstallError("install makes a user and sets owners: run it as root")
    upgrade = host.path(UNIT).exists()
    host.step(f"{'upgrading' if upgrade else 'installing'} postwarden on {host.root}")
    binary = _binary(args, host)
    nofile = _config(host)

    # The user first: the owners below are looked up in its passwd.
    host.write(SYSUSERS, shipped("postwarden.sysusers"), 0o644, what="the user")
    sysusers = [_tool("systemd-sysusers")]
    sysusers += [] if host.live else [f"--root={host.root}"]
    host.path("etc").mkdir(mode=0o755, exist_ok=True)  # where sysusers keeps its lock
    host.run([*sysusers, str(host.path(SYSUSERS))])
    host.write(TMPFILES, shipped("postwarden.tmpfiles"), 0o644, what="the directories")
    tmpfiles = [_tool("systemd-tmpfiles"), "--create"]
    tmpfiles += [] if host.live else [f"--root={host.root}"]
    host.run([*tmpfiles, str(host.path(TMPFILES))])

    unit = render_unit(binary, nofile)
    host.write(UNIT, unit, 0o644, what=f"runs {binary}, LimitNOFILE={nofile}")

    template = shipped("postwarden.toml")
    if not host.path(CONFIG).exists():
        host.write(CONFIG, template, 0o640, "root", USER, what="edit it")
    else:
        before = host.path(SHIPPED_CONFIG)
        was = before.read_text("utf-8") if before.exists() else None
        current = host.path(CONFIG).read_text("utf-8")
        if was != template and current != template:
            host.write(f"{CONFIG}.new", template, 0o640, "root", USER)
            host.step(
                f"kept {host.show(CONFIG)}: the configuration this version ships differs"
                f" from the one it was made from; compare it with {host.show(CONFIG + '.new')}"
            )
    host.write(SHIPPED_CONFIG, template, 0o644, what="as shipped, to compare")
    if not host.path(KEY).exists():
        # Never replaced: the DKIM keys in the database are encrypted with it.
        host.write(KEY, _key(), 0o640, "root", USER, what="the encryption key: back it up")

    if host.live:
        if host.changed:
            host.systemctl("daemon-reload")
    if upgrade:
        _upgrade(host)

    if not host.changed:
        host.step("nothing to change")
    if not upgrade:
        host.step(
            "next: edit /etc/postwarden/postwarden.toml (docs/production.md sections 2-4),"
            " then `postwarden db upgrade` as the postwarden user and"
            " `systemctl enable --now postwarden`"
        )
    return 0


def uninstall(args: argparse.Namespace) -> int:
    host = Host(Path(os.path.abspath(args.root)))
    if host.live and os.geteuid() != 0:
        raise InstallError("uninstall changes the host: run it as root (or with --root DIR)")
    host.step(f"removing postwarden from {host.root}")
    if host.live and host.path(UNIT).exists():
        host.systemctl("disable", "--now", SERVICE, check=False)
    for rel in (WANTS, UNIT, SYSUSERS, TMPFILES, SHIPPED_CONFIG):
        host.remove(rel)
    with contextlib.suppress(OSError):
        host.path(SHIPPED_CONFIG).parent.rmdir()
    if host.live and host.changed:
        host.systemctl("daemon-reload")
    if args.purge:
        # The configuration with the encryption key, and the spool with the mail not
        # yet delivered: gone for good.
        for rel in (CONFIG_DIR, STATE_DIR):
            host.remove(rel)
        host.step(
            "kept: the postwarden user and group (a uid given again could own files left"
            " behind) and a PostgreSQL database, if one was used (`dropdb postwarden`)"
        )
    else:
        host.step(
            f"kept: {host.show(CONFIG_DIR)} (configuration, encryption key) and"
            f" {host.show(STATE_DIR)} (spool, mail not yet delivered); --purge removes them"
        )
    if not host.changed:
        host.step("nothing to remove")
    return 0


def cmd_install(args: argparse.Namespace) -> int:
    """``install`` or ``uninstall``: one line for what stopped it, exit 1."""
    try:
        return install(args) if args.command == "install" else uninstall(args)
    except InstallError as exc:
        print(f"postwarden: {args.command}: {exc}", file=sys.stderr)
        return 1


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """The two commands, for cli.build_parser."""
    s = sub.add_parser(
        "install",
        help="lay out this host for the systemd service; on an installed host, upgrade it",
        description="Writes the unit, the sysusers.d and tmpfiles.d snippets, a commented"
        " /etc/postwarden/postwarden.toml (only when there is none) and the encryption key"
        " (only when there is none); makes the postwarden user and the directories. On an"
        " installed host: the database migrations, then a restart if the service ran."
        " A second run changes nothing.",
    )
    s.add_argument(
        "--root", default="/", metavar="DIR",
        help="lay out the host under DIR (no systemctl; the user in DIR/etc/passwd)",
    )  # fmt: skip
    s.add_argument(
        "--prefix", metavar="DIR",
        help="the environment the unit runs DIR/bin/postwarden from (on the target host;"
        " default: the one running this command)",
    )  # fmt: skip
    s.set_defaults(fn=cmd_install)
    s = sub.add_parser(
        "uninstall",
        help="remove the unit and snippets (stops the service); --purge: the data too",
    )
    s.add_argument("--root", default="/", metavar="DIR", help="the host laid out under DIR")
    s.add_argument(
        "--purge", action="store_true",
        help="also remove /etc/postwarden (configuration, encryption key) and"
        " /var/lib/postwarden (the spool: mail not yet delivered)",
    )  # fmt: skip
    s.set_defaults(fn=cmd_install)
