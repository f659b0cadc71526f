"""Acceptance: the one way into the spool, for every path that sends.

SMTP submission (``mta.ingress``), the HTTP API (``control.messages`` through
:meth:`Acceptance.inject`), the appliance's own DSNs (``bounces.notices``) and every
sending path still to come (campaigns, journeys) hand a message here. It goes through
the same steps whatever its origin:

1. the cleanup stage (``mail.cleanup``): headers checked and completed, the signing
   domain decided;
2. a tenant's message may only be From one of its verified sending domains;
3. DKIM signing by the signing domain's keys;
4. the suppression check: suppressed recipients are stored as dropped (with the
   reason) and never leased;
5. the spool (fsync), then straight to the scheduler when it has room.

Raises :class:`~postwarden.mail.cleanup.Rejected` with the answer (an SMTP code and
enhanced status, or the API's field) when a message may not go.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from postwarden.mail.cleanup import Cleanup, Origin, Rejected
from postwarden.metrics import Metrics
from postwarden.mta.dkim import DkimSigner
from postwarden.queue.spool import Spool
from postwarden.values import SUPPRESSIONS_UNKNOWN, Envelope, Lease, StoredMessage


class Admission(Protocol):
    """What acceptance asks of the scheduler (``queue.scheduler.Scheduler``): room for
    recipients in memory, and the leases of what was spooled."""

    def reserve(self, n: int, lane: int = 0) -> bool: ...

    def release(self, n: int) -> None: ...

    def offer(self, leases: Iterable[Lease], body: bytes | None = None) -> None: ...

    def wake(self) -> None: ...


class Acceptance:
    """``may_send_as(tenant id, domain)``: the tenant's verified sending domains;
    ``suppressed(tenant, address)``: the suppression check (a reason, None, or
    ``SUPPRESSIONS_UNKNOWN`` while the list is not loaded); ``keys_loaded()``: whether
    the control plane's DKIM keys are in ``signer`` (False while its database has not
    answered since the start)."""

    def __init__(
        self,
        cleanup: Cleanup,
        signer: DkimSigner,
        spool: Spool,
        admission: Admission,
        metrics: Metrics,
        *,
        may_send_as: Callable[[int, str | None], bool],
        suppressed: Callable[[str, str], str | None],
        keys_loaded: Callable[[], bool],
    ) -> None:
        self.cleanup = cleanup
        self.signer = signer
        self.spool = spool
        self.admission = admission
        self.metrics = metrics
        self.may_send_as = may_send_as
        self.suppressed = suppressed
        self.keys_loaded = keys_loaded

    def reconfigure(
        self, *, cleanup: Cleanup | None = None, signer: DkimSigner | None = None
    ) -> None:
        """Swap the cleanup stage (a reload) or the signer (a reload, new keys)."""
        if cleanup is not None:
            self.cleanup = cleanup
        if signer is not None:
            self.signer = signer

    async def submit(
        self, envelope: Envelope, data: bytes, msg_id: str, origin: Origin
    ) -> StoredMessage:
        """Cleanup, the tenant's sending domains, DKIM by the signing domain cleanup
        decided, then :meth:`accept`."""
        rcpt = envelope.rcpt_tos[0] if len(envelope.rcpt_tos) == 1 else None
        cleaned = self.cleanup.clean(data, msg_id=msg_id, origin=origin, rcpt=rcpt)
        if envelope.tenant is not None:
            tenant = int(envelope.tenant)
            if not all(self.may_send_as(tenant, d) for d in cleaned.domains or (None,)):
                raise Rejected(
                    550, "5.7.1", "The From domain is not a verified sending domain of this"
                    " account", field="from", reason="sender_domain",
                )  # fmt: skip
        signer = self.signer
        if (
            cleaned.signing_domain
            and not self.keys_loaded()
            and cleaned.signing_domain not in signer.domains()
        ):
            # Started while the control database was down: its DKIM keys are not
            # loaded, and this domain may have some. Mail signed by the keys of the
            # config goes on; this waits for the database (the client retries).
            raise Rejected(
                451, "4.3.0", "Temporary local problem, try again later",
                field="from", reason="control_unavailable",
            )  # fmt: skip
        signatures = await signer.sign_fields_async(
            cleaned.headers, cleaned.body, cleaned.signing_domain
        )
        return await self.accept(envelope, signatures + cleaned.message, msg_id)

    async def accept(self, envelope: Envelope, data: bytes, msg_id: str) -> StoredMessage:
        """Spool durably; hand the recipients straight to the scheduler when there is
        room. Suppressed recipients of a tenant's message are stored as dropped (with
        the reason) and never leased."""
        if envelope.tenant is not None:
            drops = dict(envelope.drops)
            for rcpt in envelope.rcpt_tos:
                reason = self.suppressed(envelope.tenant, rcpt)
                if reason == SUPPRESSIONS_UNKNOWN:
                    raise Rejected(
                        451, "4.3.0", "Temporary local problem, try again later",
                        field="to", reason="control_unavailable",
                    )  # fmt: skip
                if reason is not None and rcpt not in drops:
                    drops[rcpt] = reason
                    self.metrics.dropped.labels(reason, "acceptance").inc()
            if drops:
                envelope = dataclasses.replace(envelope, drops=drops)
        n = sum(1 for r in envelope.rcpt_tos if r not in envelope.drops)
        lease = self.admission.reserve(n, envelope.lane)
        try:
            stored = await self.spool.store(envelope, data, lease=lease, msg_id=msg_id)
        except BaseException:
            if lease:
                self.admission.release(n)
            raise
        if lease:
            self.admission.offer(stored.leases, data)
        else:
            self.admission.wake()
        return stored

    async def inject(
        self, envelope: Envelope, message: bytes, msg_id: str, _credentials: Any = None
    ) -> StoredMessage:
        """A message built by the API: through :meth:`submit` like SMTP mail (the
        caller's credentials matter only to a control-only process, which relays over
        SMTP: ``control.relay``)."""
        envelope = dataclasses.replace(envelope, body_8bit=not message.isascii())
        origin = Origin("HTTP", envelope.client_ip, "api")
        stored = await self.submit(envelope, message, msg_id, origin)
        self.metrics.received.labels("api").inc()
        self.metrics.recipients_received.inc(len(envelope.rcpt_tos))
        return stored
