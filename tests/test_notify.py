"""The systemd notification protocol (issue 24; postwarden.notify): datagrams to a
socket the test binds, as systemd's would be, at a path and in the abstract
namespace; the watchdog interval read from the environment; a manager that went away
never stops the caller."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

from postwarden.notify import Notifier


def _listener(address: str | bytes) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(5)
    return sock


def _fields(sock: socket.socket) -> dict[str, str]:
    data = sock.recv(4096).decode()
    return dict(line.split("=", 1) for line in data.split("\n"))


def test_datagrams_reach_a_path_socket(tmp_path: Path) -> None:
    path = str(tmp_path / "notify")
    with _listener(path) as sock:
        n = Notifier({"NOTIFY_SOCKET": path})
        assert n.enabled and n.watchdog is None
        assert n.ready("serving: 2 workers")
        assert _fields(sock) == {"READY": "1", "STATUS": "serving: 2 workers"}
        assert n.status("recovering 12 messages\nof the spool")  # one line per field
        assert _fields(sock) == {"STATUS": "recovering 12 messages of the spool"}
        before = int(time.clock_gettime(time.CLOCK_MONOTONIC) * 1e6)
        assert n.reloading()
        got = _fields(sock)
        assert got["RELOADING"] == "1" and got["STATUS"] == "reloading the configuration"
        assert before <= int(got["MONOTONIC_USEC"]) <= before + 5_000_000
        assert n.ping() and _fields(sock) == {"WATCHDOG": "1"}
        assert n.stopping() and _fields(sock) == {"STOPPING": "1", "STATUS": "stopping"}
        n.close()


def test_an_abstract_socket() -> None:
    name = f"postwarden-test-{os.getpid()}-{time.monotonic_ns()}"
    with _listener(b"\0" + name.encode()) as sock:
        n = Notifier({"NOTIFY_SOCKET": "@" + name})
        assert n.ready()
        assert _fields(sock) == {"READY": "1"}
        n.close()


def test_no_socket_is_a_no_op_and_a_gone_manager_is_not_an_error(tmp_path: Path) -> None:
    n = Notifier({})
    assert not n.enabled and not n.ready() and not n.ping()
    gone = Notifier({"NOTIFY_SOCKET": str(tmp_path / "nobody-listens")})
    assert gone.enabled
    assert not gone.ready()  # refused (no such socket): logged, not raised
    gone.close()


def test_the_watchdog_interval_and_whose_it_is() -> None:
    mine = {"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}
    assert Notifier(mine).watchdog == 30.0
    assert Notifier({**mine, "WATCHDOG_PID": ""}).watchdog == 30.0  # no PID: ours
    assert Notifier({**mine, "WATCHDOG_PID": "1"}).watchdog is None  # another process's
    assert Notifier({**mine, "WATCHDOG_USEC": "0"}).watchdog is None
    assert Notifier({**mine, "WATCHDOG_USEC": "soon"}).watchdog is None
