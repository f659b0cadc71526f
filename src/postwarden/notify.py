"""The systemd notification protocol (sd_notify(3); issue 24), spoken directly: one
datagram of ``KEY=value`` lines to the ``AF_UNIX`` socket named by ``$NOTIFY_SOCKET``
(a path, or an abstract name after ``@``). No libsystemd: the protocol is a datagram.

:class:`Notifier` is a no-op when the service manager gave no socket (run by hand, in
the tests, under another supervisor), so callers never ask. ``WATCHDOG_USEC`` (and
``WATCHDOG_PID``, when set, naming this process) say whether and how often systemd
wants ``WATCHDOG=1``: :attr:`Notifier.watchdog` is that interval in seconds, or None.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Mapping

from postwarden.files import replace_file

log = logging.getLogger("postwarden.notify")


def _address(name: str) -> str | bytes:
    """``$NOTIFY_SOCKET`` as a socket address: ``@name`` is Linux's abstract
    namespace (a leading NUL byte)."""
    if name.startswith("@"):
        return b"\0" + name[1:].encode()
    return name


class Notifier:
    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self.socket_name = env.get("NOTIFY_SOCKET", "") or None
        self.watchdog: float | None = None
        usec, pid = env.get("WATCHDOG_USEC", ""), env.get("WATCHDOG_PID", "")
        if usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            self.watchdog = int(usec) / 1e6
        self._sock: socket.socket | None = None

    @property
    def enabled(self) -> bool:
        return self.socket_name is not None

    def send(self, **fields: str | int) -> bool:
        """One notification: ``send(READY=1, STATUS="serving")`` sends ``READY=1`` and
        ``STATUS=serving`` in one datagram. Whether it was sent (False: no socket, or
        the manager's socket refused it: logged, never raised — a service must not stop
        because its manager stopped listening)."""
        if self.socket_name is None or not fields:
            return False
        lines = []
        for key, value in fields.items():
            text = str(value)
            if "\n" in text:  # one line per field: a newline would start another
                text = text.replace("\n", " ")
            lines.append(f"{key}={text}")
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto("\n".join(lines).encode(), _address(self.socket_name))
            return True
        except OSError as exc:
            log.warning("event=notify_failed socket=%s error=%r", self.socket_name, str(exc))
            return False

    def ready(self, status: str = "") -> bool:
        return self.send(READY=1, STATUS=status) if status else self.send(READY=1)

    def status(self, text: str) -> bool:
        return self.send(STATUS=text)

    def reloading(self, status: str = "reloading the configuration") -> bool:
        """``RELOADING=1`` with the monotonic time in µs (which ``Type=notify-reload``
        requires); ``READY=1`` ends the reload."""
        usec = int(time.clock_gettime(time.CLOCK_MONOTONIC) * 1e6)
        return self.send(RELOADING=1, MONOTONIC_USEC=usec, STATUS=status)

    def stopping(self, status: str = "stopping") -> bool:
        return self.send(STOPPING=1, STATUS=status)

    def ping(self) -> bool:
        """``WATCHDOG=1``: the service is alive (only while it is)."""
        return self.send(WATCHDOG=1)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


# ------------------------------------------------------------------ workers' liveness

#: Set by the supervisor for its workers: seconds between a worker's beats (absent: no
#: watchdog, no beats). docs/decisions/0013.
BEAT_ENV = "POSTWARDEN_WATCHDOG_BEAT"
#: A test-only fault switch: while the file this names exists, a worker's beat task
#: blocks its event loop (what a stalled loop looks like to the supervisor).
STALL_ENV = "POSTWARDEN_TEST_STALL_FILE"


def ready_path(directory: str, index: int) -> str:
    return os.path.join(directory, f"worker-{index}.ready")


def beat_path(directory: str, index: int) -> str:
    return os.path.join(directory, f"worker-{index}.beat")


def write_ready(directory: str, index: int) -> None:
    """A worker has started (listeners serving, spool recovered): its pid in its ready
    file, written whole (a rename)."""
    replace_file(ready_path(directory, index), str(os.getpid()))


def reload_path(directory: str) -> str:
    """The supervisor's reload generation: a number it raises before each SIGHUP."""
    return os.path.join(directory, "reload.gen")


def reloaded_path(directory: str, index: int) -> str:
    return os.path.join(directory, f"worker-{index}.reloaded")


def _read(path: str) -> str:
    try:
        with open(path, encoding="ascii") as f:
            return f.read().strip()
    except OSError:
        return ""


def write_reload_generation(directory: str, generation: int) -> None:
    replace_file(reload_path(directory), str(generation))


def reload_generation(directory: str) -> int:
    text = _read(reload_path(directory))
    return int(text) if text.isdigit() else 0


def write_reloaded(directory: str, index: int, generation: int, applied: bool) -> None:
    """A worker has handled the reload of ``generation``: applied it, or refused the
    new file (it goes on with the old configuration)."""
    replace_file(reloaded_path(directory, index),
                 f"{os.getpid()} {generation} {'applied' if applied else 'refused'}")  # fmt: skip


def reloaded(directory: str, index: int) -> tuple[int, int, bool] | None:
    """``(pid, generation, applied)`` of worker ``index``'s last reload, if any."""
    parts = _read(reloaded_path(directory, index)).split()
    if len(parts) != 3 or not parts[0].isdigit() or not parts[1].isdigit():
        return None
    return int(parts[0]), int(parts[1]), parts[2] == "applied"


def ready_pid(directory: str, index: int) -> int | None:
    text = _read(ready_path(directory, index))
    return int(text) if text.isdigit() else None


async def beat(directory: str, index: int, interval: float) -> None:
    """A worker's beats: its beat file touched every ``interval`` seconds from its own
    event loop (on purpose: a stalled loop stops them, and the supervisor then stops
    the watchdog's pings)."""
    path = beat_path(directory, index)
    stall = os.environ.get(STALL_ENV)
    while True:
        if stall:
            _stall_while(stall)
        _touch(path)
        await asyncio.sleep(interval)


def _stall_while(path: str) -> None:
    """The fault switch: block the calling loop while ``path`` exists."""
    while os.path.exists(path):
        time.sleep(0.05)


def _touch(path: str) -> None:
    try:
        with open(path, "a", encoding="ascii"):
            pass
        os.utime(path)
    except OSError as exc:
        log.warning("event=beat_failed path=%s error=%r", path, str(exc))


def beat_age(directory: str, index: int, now: float | None = None) -> float | None:
    """Seconds since a worker's last beat (None: none yet)."""
    try:
        mtime = os.stat(beat_path(directory, index)).st_mtime
    except OSError:
        return None
    return (time.time() if now is None else now) - mtime
