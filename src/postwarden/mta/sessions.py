"""Sessions per client IP and AUTH lockouts as one listener keeps them.

Each listener's handler (submission: :class:`~postwarden.mta.ingress.IngressHandler`,
the inbound MX: :class:`~postwarden.mta.inbound.InboundHandler`) is a
:class:`SessionGuard`: it counts its own sessions and failed AUTHs, and asks the
appliance-wide tables (:mod:`postwarden.mta.guard`, served by the supervisor's broker)
when it runs as a worker. :class:`~postwarden.mta.protocol.PostwardenSMTP` calls it at
connect, before the greeting and at disconnect.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging

from postwarden.config import Config
from postwarden.metrics import Metrics
from postwarden.mta.guard import AuthLockout, GuardChannel, lockout_rule

# The submission listener's logger, as before the guard had a module of its own.
log = logging.getLogger("postwarden.ingress")

# One sequence per process: both listeners share the worker's broker connection.
_SLOT_IDS = itertools.count(1)


class SessionSlot:
    """One session as the guard counts it: whether this process's own count allows it,
    and the appliance-wide slot asked of the broker (``pending``) and whether it is held."""

    __slots__ = ("held", "id", "ip", "local_ok", "pending")

    def __init__(self, ip: str, local_ok: bool) -> None:
        self.ip = ip
        self.id = next(_SLOT_IDS)
        self.local_ok = local_ok
        self.held = False
        self.pending: asyncio.Future[bool] | None = None


class SessionGuard:
    """What a listener's handler keeps of its sessions: how many are open, in all and
    per client IP (submission and the inbound MX each have one), and failed AUTHs per
    client IP.

    With ``shared`` (a worker: the supervisor's broker) the appliance-wide tables
    decide (mta.guard); this process's own count and lockouts decide only while the
    broker cannot be reached."""

    cfg: Config
    metrics: Metrics
    listener = "smtp"  # the name of this listener's limit in the shared tables

    def __init__(self, shared: GuardChannel | None = None) -> None:
        self.sessions_by_ip: dict[str, int] = {}
        self.open_sessions = 0
        self.shared = shared
        self.auth_lockouts = AuthLockout()
        self._alone = False  # deciding locally because the broker did not answer

    def max_sessions_per_ip(self) -> int:
        raise NotImplementedError

    def sessions_changed(self, delta: int) -> None:
        """The open-sessions gauge of this listener."""

    def refused(self, reason: str) -> None:
        """Count a refusal of this listener, by reason."""
        raise NotImplementedError

    # -- sessions per client IP

    def session_opened(self, ip: str) -> SessionSlot:
        """Count a new session (at connect); :meth:`admit` says whether it may go on.
        The appliance-wide slot is asked for at once: one round trip per connection."""
        n = self.sessions_by_ip.get(ip, 0) + 1
        self.sessions_by_ip[ip] = n
        self.open_sessions += 1
        self.sessions_changed(1)
        slot = SessionSlot(ip, n <= self.max_sessions_per_ip())
        if self.shared is not None:
            slot.pending = asyncio.ensure_future(self._open_shared(self.shared, slot))
        return slot

    async def admit(self, slot: SessionSlot) -> bool:
        """Whether the session may be greeted (False: its IP is over the limit)."""
        if slot.pending is None:
            return slot.local_ok
        # Shielded: when the client goes while we wait, the answer still arrives and
        # session_closed gives the slot back.
        return await asyncio.shield(slot.pending)

    async def _open_shared(self, shared: GuardChannel, slot: SessionSlot) -> bool:
        try:
            answer = await shared.guard_call(
                "session_open", slot=slot.id, listener=self.listener, ip=slot.ip,
                limit=self.max_sessions_per_ip(),
            )  # fmt: skip
        except (ConnectionError, TimeoutError, OSError, RuntimeError) as exc:
            self._fell_back("sessions", exc)
            return slot.local_ok
        self._back()
        slot.held = bool(answer.get("ok"))
        return slot.held

    def session_closed(self, slot: SessionSlot) -> None:
        ip = slot.ip
        n = self.sessions_by_ip.get(ip, 0) - 1
        if n <= 0:
            self.sessions_by_ip.pop(ip, None)
        else:
            self.sessions_by_ip[ip] = n
        self.open_sessions -= 1
        self.sessions_changed(-1)
        if slot.pending is not None:
            if slot.pending.done():
                self._release(slot)
            else:
                slot.pending.add_done_callback(lambda _: self._release(slot))

    def _release(self, slot: SessionSlot) -> None:
        if not slot.held or self.shared is None:
            return
        slot.held = False
        # A broker gone meanwhile has given back every slot of this worker already.
        with contextlib.suppress(ConnectionError, OSError, RuntimeError):
            self.shared.guard_notify("session_close", slot=slot.id)

    # -- AUTH lockout per client IP

    async def auth_locked(self, ip: str) -> float:
        """Seconds ``ip`` stays locked out of AUTH (0: it may try)."""
        rule = lockout_rule(self.cfg)
        if rule is None:
            return 0.0
        if self.shared is not None:
            try:
                answer = await self.shared.guard_call("auth_check", ip=ip)
            except (ConnectionError, TimeoutError, OSError, RuntimeError) as exc:
                self._fell_back("auth", exc)
            else:
                self._back()
                return float(answer.get("locked_for") or 0.0)
        return self.auth_lockouts.locked_for(ip)

    async def auth_failed(self, ip: str) -> float:
        """Count a failed AUTH of ``ip``; the seconds it is now locked out (0: not)."""
        rule = lockout_rule(self.cfg)
        if rule is None:
            return 0.0
        # Always counted here too, so that a broker outage starts from what we saw.
        left, new = self.auth_lockouts.failed(ip, rule)
        if self.shared is not None:
            try:
                answer = await self.shared.guard_call(
                    "auth_failed", ip=ip, failures=rule.failures, window=rule.window,
                    lockout=rule.lockout,
                )  # fmt: skip
            except (ConnectionError, TimeoutError, OSError, RuntimeError) as exc:
                self._fell_back("auth", exc)
            else:
                self._back()
                left, new = float(answer.get("locked_for") or 0.0), bool(answer.get("new"))
        if new:
            self.metrics.auth_lockouts.inc()
            log.warning("event=auth_lockout peer=%s failures=%d window=%.0fs lockout=%.0fs",
                        ip, rule.failures, rule.window, rule.lockout)  # fmt: skip
        return left

    # -- the broker's absence

    def _fell_back(self, check: str, exc: BaseException) -> None:
        self.metrics.guard_local.labels(check).inc()
        if not self._alone:
            self._alone = True
            log.warning("event=guard_local reason=%r listener=%s", str(exc) or repr(exc),
                        self.listener)  # fmt: skip

    def _back(self) -> None:
        if self._alone:
            self._alone = False
            log.info("event=guard_shared listener=%s", self.listener)
