"""Is ``database.url`` usable by this version? One answer, one line for people.

:func:`check_database` checks, in order, and stops at the first failure: the URL
parses and names a scheme Postwarden speaks; its driver is installed; a connection
opens; the schema is at this version's revision. ``check-config``, ``db current`` and
the supervisor's start all print its :attr:`DbCheck.line`: never a traceback, never
the password.
"""

from __future__ import annotations

import asyncio
import errno
import importlib.util
import re
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.engine import URL, make_url

# The schemes Postwarden speaks (drivername -> the module that must be importable).
DRIVERS = {"sqlite+aiosqlite": "aiosqlite", "postgresql+asyncpg": "asyncpg"}

KINDS = (
    "ok",
    "bad_url",
    "no_driver",
    "unreachable",
    "auth",
    "no_database",
    "connect",
    "unmigrated",
    "behind",
    "ahead",
)

# Kinds that describe a database that is down (or not up yet), not a wrong setting.
TRANSIENT = frozenset({"unreachable"})


@dataclass(frozen=True)
class DbCheck:
    """``kind`` is one of :data:`KINDS`; ``line`` says it to a person (one line);
    ``revision`` is the schema revision read, when it could be read."""

    ok: bool
    kind: str
    line: str
    revision: str | None = None


def redact(url: str | URL) -> str:
    """The URL with its password (in the user part or the query) shown as ``***``."""
    if isinstance(url, str):
        text = url
        try:
            url = make_url(text)
        except Exception:  # not a URL: hide what looks like a password
            text = re.sub(r"(://[^/@]*?:)[^/]*@", r"\1***@", text)
            return re.sub(r"(?i)(password=)[^&]*", r"\1***", text)
    if "password" in url.query:
        url = url.update_query_dict({"password": "***"})
    return url.render_as_string(hide_password=True).replace("%2A%2A%2A", "***")


def shipped_revisions() -> list[tuple[str, str]]:
    """The migrations this version ships, oldest first: (revision, first doc line)."""
    from postwarden.store.db import script_directory

    revs = script_directory().walk_revisions()
    return [(r.revision, (r.doc or "").strip().splitlines()[0]) for r in revs][::-1]


def _suggest(url: URL) -> str | None:
    """What to write instead of a URL naming a backend we speak without its async
    driver (``postgres://``, ``postgresql://``, ``sqlite://``, ``postgresql+psycopg2``)."""
    backend = url.drivername.split("+", 1)[0]
    if backend in ("postgres", "postgresql", "pgsql"):
        return redact(url.set(drivername="postgresql+asyncpg"))
    if backend == "sqlite":
        return redact(url.set(drivername="sqlite+aiosqlite"))
    return None


def check_url(url: str) -> tuple[URL | None, DbCheck | None]:
    """The parsed URL, or why it is not one we can use (kinds bad_url, no_driver)."""
    try:
        u = make_url(url)
    except Exception as exc:  # ArgumentError, ValueError (port) ...
        why = "it is empty" if not url.strip() else one_line(exc, None)
        return None, DbCheck(
            False,
            "bad_url",
            f"database.url: {redact(url)!r} is not a database URL ({why}): write"
            " sqlite+aiosqlite:///PATH or postgresql+asyncpg://USER:PASSWORD@HOST/DB",
        )
    if u.drivername not in DRIVERS:
        better = _suggest(u)
        if better is not None:
            line = (
                f"database.url: {redact(u)} names no driver Postwarden uses: write {better}"
                f" (Postwarden speaks {' and '.join(DRIVERS)})"
            )
        else:
            line = (
                f"database.url: unsupported scheme {u.drivername!r} in {redact(u)}: Postwarden"
                f" speaks {' and '.join(DRIVERS)} (sqlite+aiosqlite:///PATH or"
                " postgresql+asyncpg://USER:PASSWORD@HOST/DB)"
            )
        return None, DbCheck(False, "bad_url", line)
    if u.port is not None and not 0 < u.port < 65536:
        return None, DbCheck(
            False, "bad_url", f"database.url: port {u.port} in {redact(u)} is out of range"
        )
    if u.get_backend_name() == "postgresql" and not u.database:
        return None, DbCheck(
            False,
            "bad_url",
            f"database.url: {redact(u)} names no database: write"
            " postgresql+asyncpg://USER:PASSWORD@HOST/DB",
        )
    module = DRIVERS[u.drivername]
    if importlib.util.find_spec(module) is None:
        return None, DbCheck(
            False,
            "no_driver",
            f"database.url: {u.drivername} needs the Python package {module!r}, which is not"
            f" installed in this environment: install it (pip install {module})",
        )
    return u, None


def _chain(exc: BaseException) -> list[BaseException]:
    """The exception, what SQLAlchemy wrapped (``orig``), and its causes."""
    seen: list[BaseException] = []
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop(0)
        if e is None or any(e is s for s in seen):
            continue
        seen.append(e)
        todo += [getattr(e, "orig", None), e.__cause__, e.__context__]
    return seen


def one_line(exc: BaseException, password: str | None) -> str:
    """The exception's message as one line, without the password."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    text = re.sub(r"^\([\w.]+\) ", "", text)  # SQLAlchemy's "(module.Class) " prefix
    text = text.split(" [SQL: ")[0].split(" (Background on this error")[0]
    if password:
        text = text.replace(password, "***")
    return text if len(text) <= 300 else text[:297] + "..."


def classify(exc: BaseException, url: URL, timeout: float) -> DbCheck:
    """A failure to connect (or to read the revision) as a DbCheck."""
    shown = redact(url)
    where = f"{url.host or 'localhost'}:{url.port or 5432}"
    chain = _chain(exc)
    states = [s for s in (getattr(e, "sqlstate", None) for e in chain) if isinstance(s, str)]
    inner = next((e for e in chain if getattr(e, "sqlstate", None)), chain[-1])
    msg = one_line(inner, url.password if isinstance(url.password, str) else None)
    if isinstance(exc, TimeoutError):
        return DbCheck(
            False,
            "unreachable",
            f"database.url: no answer from {shown} within {timeout:g} s (is the host up,"
            " and the port open?)",
        )
    for e in chain:
        if isinstance(e, socket.gaierror):
            return DbCheck(
                False,
                "unreachable",
                f"database.url: cannot resolve the host {url.host!r} of {shown}: {msg}",
            )
    ssl_error = any(isinstance(e, ssl.SSLError) for e in chain)
    for e in chain:
        if ssl_error:
            break
        if isinstance(e, ConnectionRefusedError):
            return DbCheck(
                False,
                "unreachable",
                f"database.url: connection refused by {where} ({shown}): is the database"
                " running and listening there?",
            )
        if isinstance(e, ConnectionError | TimeoutError) or (
            isinstance(e, OSError)
            and e.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ETIMEDOUT)
        ):
            return DbCheck(False, "unreachable", f"database.url: cannot reach {shown}: {msg}")
    if any(s in ("28P01", "28000") for s in states):
        return DbCheck(
            False,
            "auth",
            f"database.url: authentication failed for user {url.username!r} at {where}:"
            f" {msg} (check the user and password in database.url, and pg_hba.conf)",
        )
    if "3D000" in states:
        return DbCheck(
            False,
            "no_database",
            f"database.url: the database {url.database!r} does not exist on {where}: create"
            f" it (createdb --owner={url.username or 'USER'} {url.database}), then run"
            " `postwarden db upgrade`",
        )
    # The server is there but not taking connections now: starting, shutting down,
    # in recovery, or full. It will be back by itself.
    if any(s in ("57P01", "57P02", "57P03", "53300", "08006", "08001") for s in states):
        return DbCheck(False, "unreachable", f"database.url: {where} is not available: {msg}")
    return DbCheck(
        False, "connect", f"database.url: cannot use {shown}: {type(inner).__name__}: {msg}"
    )


def _sqlite_path(url: URL) -> Path | None:
    if url.get_backend_name() != "sqlite" or not url.database or url.database == ":memory:":
        return None
    return Path(url.database)


async def check_database(url: str, timeout: float = 5.0) -> DbCheck:  # noqa: ASYNC109
    """Whether ``url`` is a database this version can run on: the first of the
    checks that fails, or ``ok``. Reads only: a SQLite file is not created."""
    from postwarden.store.db import current_revision, head_revision

    u, bad = check_url(url)
    if bad is not None:
        return bad
    assert u is not None
    shown = redact(u)
    head = head_revision()
    path = _sqlite_path(u)
    if path is not None and not path.exists():
        return DbCheck(
            False,
            "unmigrated",
            f"database.url: the SQLite file {u.database} does not exist yet (this version"
            f" needs revision {head}): run `postwarden db upgrade`, which creates it",
        )
    try:
        have = await asyncio.wait_for(current_revision(url), timeout)
    except Exception as exc:  # every failure becomes one line
        return classify(exc, u, timeout)
    known = [rev for rev, _doc in shipped_revisions()]
    if have is None:
        return DbCheck(
            False,
            "unmigrated",
            f"database.url: {shown} has no Postwarden tables yet (this version needs"
            f" revision {head}): run `postwarden db upgrade`",
        )
    if have == head:
        return DbCheck(True, "ok", f"database ok: {shown} at revision {have}", have)
    if have in known:
        return DbCheck(
            False,
            "behind",
            f"database.url: {shown} is at revision {have}, this version needs {head}:"
            " run `postwarden db upgrade`",
            have,
        )
    return DbCheck(
        False,
        "ahead",
        f"database.url: {shown} is at revision {have}, which this version (newest {head})"
        " does not know: the database was upgraded by a newer Postwarden: install that"
        f" version, or restore the backup taken before the upgrade, or downgrade it with"
        f" that version (`postwarden db downgrade {head}`)",
        have,
    )
