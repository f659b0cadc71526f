"""Whether the control database can be reached, as a state of its own (issue 18).

A database that is down (refused, unreachable, restarting, closed connections) is a
temporary fault, not a bug: the API answers ``503`` with ``Retry-After``, SMTP a 4xx,
``/healthz`` says ``degraded``, and what needs no database goes on. This module says
which errors mean "unavailable" (:func:`is_unavailable`), keeps the state
(:class:`DbHealth`) and keeps the log readable while it lasts (:class:`LogLimiter`:
one line per kind of failure per interval, with a count, the traceback once).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import exc as sa_exc

#: asyncpg's errors of a connection that failed or went away (matched by name: the
#: driver is optional, and SQLite deployments do not load it).
_DRIVER_ERRORS = frozenset(
    {
        "ConnectionDoesNotExistError",
        "ConnectionFailureError",
        "CannotConnectNowError",
        "PostgresConnectionError",
        "InterfaceError",
        "AdminShutdownError",
        "CrashShutdownError",
        "ServerNotReadyError",
        "TooManyConnectionsError",
        "ConnectionRejectionError",
        "InternalClientError",
    }
)
#: SQLite's own temporary faults.
_SQLITE_TEXT = ("database is locked", "unable to open database file", "disk I/O error")


class DatabaseUnavailable(Exception):
    """The control database cannot be reached now (raised where a caller wants one
    exception for it)."""


def is_unavailable(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) says the database cannot be reached now,
    rather than that a query or the data is wrong."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, DatabaseUnavailable):
            return True
        if isinstance(e, sa_exc.DBAPIError) and e.connection_invalidated:
            return True
        if isinstance(e, (sa_exc.DisconnectionError, sa_exc.TimeoutError)):
            return True  # TimeoutError: no pooled connection came free in time
        if isinstance(e, (ConnectionError, TimeoutError, asyncio.TimeoutError, socket.gaierror)):
            return True
        if isinstance(e, OSError) and e.errno is not None:
            return True  # EHOSTUNREACH, ENETUNREACH and the like
        if type(e).__name__ in _DRIVER_ERRORS and type(e).__module__.startswith("asyncpg"):
            return True
        if isinstance(e, sa_exc.OperationalError):
            text = str(e.orig if e.orig is not None else e)
            if any(t in text for t in _SQLITE_TEXT) or "connection" in text.lower():
                return True
        e = e.__cause__ or e.__context__
    return False


def short_error(exc: BaseException) -> str:
    """One line naming the fault without SQL or a traceback (the deepest cause)."""
    e: BaseException = exc
    while e.__cause__ is not None:
        e = e.__cause__
    if isinstance(e, sa_exc.StatementError) and e.orig is not None:
        e = e.orig
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}"[:200] if text else type(e).__name__


@dataclass
class DbHealth:
    """The control database's state in this process: up, or down since when and why.

    Requests that meet an unavailable database mark it down; the change-feed reader
    (which asks it every ``control.cache_poll``, backing off while it is down) marks it
    up again. ``started``: the control plane has loaded its caches at least once (a
    process started while the database was down has not)."""

    up: bool = True
    since: float = field(default_factory=time.time)
    error: str = ""
    failures: int = 0
    started: bool = False
    log: logging.Logger = field(default_factory=lambda: logging.getLogger("postwarden.control"))

    def down(self, exc: BaseException) -> None:
        self.failures += 1
        self.error = short_error(exc)
        if self.up:
            self.up = False
            self.since = time.time()
            self.log.error("event=database_unavailable error=%r", self.error)

    def lost(
        self, exc: BaseException, limited: LogLimiter, kind: str, msg: str, *args: Any
    ) -> bool:
        """For a request that could not reach the database: when ``exc`` says it is
        unavailable, mark it down, log one rate-limited warning (``kind``, ``msg``) and
        answer True (the caller answers 503, or goes on without it); False for any
        other error (the caller's to raise or log)."""
        if not is_unavailable(exc):
            return False
        self.down(exc)
        limited(logging.WARNING, kind, msg, *args, exc=exc)
        return True

    def recovered(self) -> None:
        if not self.up:
            self.log.warning(
                "event=database_available down_for=%.1fs failures=%d",
                time.time() - self.since,
                self.failures,
            )
            self.up, self.since, self.error, self.failures = True, time.time(), "", 0

    def snapshot(self) -> dict[str, Any]:
        out: dict[str, Any] = {"state": "up" if self.up else "down"}
        if not self.up:
            out["since"] = round(self.since, 3)
            out["error"] = self.error
            out["failures"] = self.failures
        if not self.started:
            out["control_plane"] = "starting"
        return out


class LogLimiter:
    """At most one line per ``kind`` every ``interval`` seconds, saying how many were
    held back since; the first of each kind carries its traceback (not for an
    unreachable database: a known state), later ones the error in one line."""

    def __init__(self, logger: logging.Logger, interval: float = 10.0) -> None:
        self.logger = logger
        self.interval = interval
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}
        self._traced: set[str] = set()

    def __call__(
        self, level: int, kind: str, msg: str, *args: Any, exc: BaseException | None = None
    ) -> None:
        now = time.monotonic()
        last = self._last.get(kind)
        if last is not None and now - last < self.interval:
            self._held[kind] = self._held.get(kind, 0) + 1
            return
        self._last[kind] = now
        held = self._held.pop(kind, 0)
        if held:
            msg += " repeated=%d"
            args = (*args, held)
        # An unreachable database is a known state: its one-line error says it all.
        trace = exc is not None and kind not in self._traced and not is_unavailable(exc)
        if trace:
            self._traced.add(kind)
        elif exc is not None:
            msg += " error=%r"
            args = (*args, short_error(exc))
        self.logger.log(level, msg, *args, exc_info=exc if trace else None)
