"""Claims held by runners (imports, campaign launches and feeds): a claim name says
which host and process holds it, so that a claim left by a process that ended on this
host is taken over at once, not only once its lease has passed."""

from __future__ import annotations

import os
import socket

_HOST = socket.gethostname()
#: The runners alive in this process (their claim names).
_LIVE: set[str] = set()


def runner_name() -> str:
    """A claim name: host, process id and a token (what :func:`is_dead` reads)."""
    name = f"{_HOST}:{os.getpid()}:{os.urandom(4).hex()}"
    _LIVE.add(name)
    return name


def forget_runner(name: str) -> None:
    _LIVE.discard(name)


def is_dead(owner: str | None) -> bool:
    """Whether the runner named ``owner`` is known to be gone: a process of this host
    that no longer runs (or this process, where that runner stopped). Runners of other
    hosts are waited out (their lease)."""
    if not owner:
        return True
    host, _, rest = owner.partition(":")
    pid_text, _, _token = rest.partition(":")
    if host != _HOST or not pid_text.isdigit():
        return False
    pid = int(pid_text)
    if pid == os.getpid():
        return owner not in _LIVE
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False
