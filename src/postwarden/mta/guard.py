"""Session slots per client address and AUTH lockout: the rules, without I/O.

One :class:`GuardTables` is the appliance's source of truth: the supervisor's broker
serves it to every worker (``shaping.channel.BrokerServer``), a single-process
appliance keeps its own. Each worker also keeps tables of its own, to decide alone
while the broker cannot be reached (its own share of the picture, never unlimited).

Wire ops (newline-delimited JSON on the broker's socket, see ``shaping.channel``):

* ``session_open`` ``{slot, listener, ip, limit}`` → ``{ok}``: take a slot for a new
  session of ``ip`` on ``listener`` unless ``limit`` are open; ``slot`` is the
  worker's id for it.
* ``session_close`` ``{slot}`` (no answer): give it back.
* ``auth_check`` ``{ip}`` → ``{locked_for}``: seconds the address stays locked out.
* ``auth_failed`` ``{ip, failures, window, lockout}`` → ``{locked_for, new}``: count
  a failed AUTH; ``new`` when this failure started a lockout.

A holder (a worker's connection to the broker) that goes gives back every slot it
held: a worker that dies leaves no session counted.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from postwarden.config import Config

#: The ops :meth:`GuardTables.handle` answers.
GUARD_OPS = frozenset({"session_open", "session_close", "auth_check", "auth_failed"})
# Addresses with failures are swept once the table holds this many (a spray of
# addresses must not grow it for ever).
_SWEEP_AT = 10_000


class GuardChannel(Protocol):
    """Where the appliance-wide tables are asked (a worker's BrokerClient)."""

    async def guard_call(self, op: str, **args: Any) -> dict[str, Any]: ...

    def guard_notify(self, op: str, **args: Any) -> None: ...


@dataclass(frozen=True)
class LockoutRule:
    """``failures`` failed AUTHs within ``window`` seconds lock an address out for
    ``lockout`` seconds."""

    failures: int
    window: float
    lockout: float


def lockout_rule(cfg: Config) -> LockoutRule | None:
    """The configured rule; None when ``smtp.auth_lockout_failures`` is 0 (off)."""
    s = cfg.smtp
    if s.auth_lockout_failures <= 0:
        return None
    return LockoutRule(s.auth_lockout_failures, s.auth_lockout_window, s.auth_lockout_time)


class SessionSlots:
    """Open sessions per (listener, client address), each slot held by a holder."""

    def __init__(self) -> None:
        self._open: dict[tuple[str, str], int] = {}
        self._held: dict[object, dict[int, tuple[str, str]]] = {}

    def count(self, listener: str, ip: str) -> int:
        return self._open.get((listener, ip), 0)

    def open(self, holder: object, slot: int, listener: str, ip: str, limit: int) -> bool:
        """Take a slot; False (nothing taken) when ``limit`` are open already."""
        key = (listener, ip)
        held = self._held.setdefault(holder, {})
        if slot in held:
            return True  # the same request twice: one slot
        n = self._open.get(key, 0)
        if n >= limit:
            return False
        self._open[key] = n + 1
        held[slot] = key
        return True

    def close(self, holder: object, slot: int) -> None:
        """Give a slot back; an unknown one (its holder went since) is ignored."""
        key = self._held.get(holder, {}).pop(slot, None)
        if key is not None:
            self._drop(key, 1)

    def drop_holder(self, holder: object) -> None:
        for key in self._held.pop(holder, {}).values():
            self._drop(key, 1)

    def _drop(self, key: tuple[str, str], n: int) -> None:
        left = self._open.get(key, 0) - n
        if left > 0:
            self._open[key] = left
        else:
            self._open.pop(key, None)


class AuthLockout:
    """Failed AUTHs per client address in a sliding window, and the lockouts they
    started. Only the last ``failures`` times of an address are kept."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._failures: dict[str, deque[float]] = {}
        self._locked: dict[str, float] = {}  # address -> lockout end

    def locked_for(self, ip: str) -> float:
        """Seconds ``ip`` stays locked out (0: not locked)."""
        until = self._locked.get(ip)
        if until is None:
            return 0.0
        left = until - self.clock()
        if left <= 0:
            del self._locked[ip]
            return 0.0
        return left

    def failed(self, ip: str, rule: LockoutRule) -> tuple[float, bool]:
        """Count a failure of ``ip``: (seconds locked out, whether this one started it)."""
        now = self.clock()
        left = self.locked_for(ip)
        if left > 0:
            return left, False
        times = self._failures.get(ip)
        if times is None or times.maxlen != rule.failures:
            times = deque(times or (), maxlen=rule.failures)
            self._failures[ip] = times
        times.append(now)
        if len(times) >= rule.failures and now - times[0] <= rule.window:
            del self._failures[ip]  # the count starts again after the lockout
            self._locked[ip] = now + rule.lockout
            return rule.lockout, True
        if len(self._failures) >= _SWEEP_AT:
            self._sweep(now, rule.window)
        return 0.0, False

    def _sweep(self, now: float, window: float) -> None:
        for addr in [a for a, t in self._failures.items() if now - t[-1] > window]:
            del self._failures[addr]
        for addr in [a for a, until in self._locked.items() if until <= now]:
            del self._locked[addr]

    def addresses(self) -> int:
        """How many addresses the tables hold (failures or lockouts)."""
        return len(self._failures.keys() | self._locked.keys())


class GuardTables:
    """Session slots and AUTH lockouts together, answering the wire ops."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.sessions = SessionSlots()
        self.lockouts = AuthLockout(clock)

    def drop_holder(self, holder: object) -> None:
        self.sessions.drop_holder(holder)

    def handle(self, holder: object, req: dict[str, Any]) -> dict[str, Any] | None:
        """One op's answer (None for ``session_close``, which has none); KeyError,
        ValueError or TypeError on a malformed request."""
        op = req["op"]
        if op == "session_open":
            ok = self.sessions.open(
                holder, int(req["slot"]), str(req["listener"]), str(req["ip"]), int(req["limit"])
            )
            return {"ok": ok}
        if op == "session_close":
            self.sessions.close(holder, int(req["slot"]))
            return None
        if op == "auth_check":
            return {"locked_for": self.lockouts.locked_for(str(req["ip"]))}
        if op == "auth_failed":
            rule = LockoutRule(int(req["failures"]), float(req["window"]), float(req["lockout"]))
            if rule.failures <= 0:
                raise ValueError("failures: must be greater than 0")
            left, new = self.lockouts.failed(str(req["ip"]), rule)
            return {"locked_for": left, "new": new}
        raise ValueError(f"unknown op {op!r}")
