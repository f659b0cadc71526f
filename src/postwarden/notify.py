"""The systemd notification protocol (sd_notify(3); issue 24), spoken directly: one
datagram of ``KEY=value`` lines to the ``AF_UNIX`` socket named by ``$NOTIFY_SOCKET``
(a path, or an abstract name after ``@``). No libsystemd: the protocol is a datagram.

:class:`Notifier` is a no-op when the service manager gave no socket (run by hand, in
the tests, under another supervisor), so callers never ask. ``WATCHDOG_USEC`` (and
``WATCHDOG_PID``, when set, naming this process) say whether and how often systemd
wants ``WATCHDOG=1``: :attr:`Notifier.watchdog` is that interval in seconds, or None.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping

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
