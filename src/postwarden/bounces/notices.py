"""Delivery status notifications to senders (RFC 3464): for each message with
recipients that failed for good, one DSN to its envelope sender, for tenants that want
them (``settings.bounce_notifications``); never for mail from the null sender (a DSN
never answers a DSN). The DSN is built by :mod:`postwarden.bounces.notify` and goes out
through acceptance like any message, from the null sender."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from postwarden.bounces.classify import find_status
from postwarden.bounces.notify import Failed, build_dsn, header_block
from postwarden.values import AttemptResult, Envelope, Lease, StoredMessage, tenant_id

log = logging.getLogger("postwarden")

#: A recipient that failed for good: its lease, the last answer, whether it expired.
Final = tuple[Lease, AttemptResult, bool]


def status_of(response: str, expired: bool) -> str:
    """The RFC 3463 code a DSN reports for a final answer (4.4.7 for an expiry)."""
    code = find_status(response)
    if expired:
        return "4.4.7" if code is None or code[0] != "4" else code
    return code or "5.0.0"


class FailureNotices:
    """Sends the DSNs; :meth:`failed` is the scheduler's hook for final failures."""

    def __init__(
        self,
        reporting_mta: str,
        *,
        wants_notices: Callable[[int], bool],
        read_body: Callable[[Lease], bytes],
        submit: Callable[[Envelope, bytes], Awaitable[StoredMessage]],
    ) -> None:
        self.reporting_mta = reporting_mta
        self.wants_notices = wants_notices  # a tenant id: does it want DSNs?
        self.read_body = read_body  # a message's bytes (blocking; run in a thread)
        self.submit = submit  # a message from the appliance itself into acceptance
        self._tasks: set[asyncio.Task[None]] = set()

    def failed(self, finals: list[Final]) -> None:
        """Recipients that failed for good: a DSN per message, sent in the background."""
        by_msg: dict[str, list[Final]] = {}
        for lease, result, expired in finals:
            tenant = tenant_id(lease.tenant)
            if not lease.mail_from or lease.mail_from == "<>" or tenant is None:
                continue
            if self.wants_notices(tenant):
                by_msg.setdefault(lease.msg_id, []).append((lease, result, expired))
        for items in by_msg.values():
            task = asyncio.get_running_loop().create_task(self.send(items))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def send(self, items: list[Final]) -> None:
        """One DSN for one message's failed recipients."""
        first = items[0][0]
        try:
            body = await asyncio.to_thread(self.read_body, first)
            headers = header_block(body)
        except OSError:
            headers = b""
        failed = [
            Failed(
                recipient=lease.rcpt,
                status=status_of(result.response, expired),
                diagnostic=result.response,
                remote_mta=result.mx,
                expired=expired,
                last_attempt=time.time(),
            )
            for lease, result, expired in items
        ]
        dsn = build_dsn(
            reporting_mta=self.reporting_mta,
            sender=first.mail_from,
            recipients=failed,
            original_headers=headers,
            arrival=first.created_at,
            queue_id=first.msg_id,
        )
        envelope = Envelope(mail_from="", rcpt_tos=[first.mail_from], meta={"source": "dsn"})
        try:
            stored = await self.submit(envelope, dsn)
        except Exception:
            log.error("event=dsn_failed msg=%s", first.msg_id, exc_info=True)
            return
        log.info("event=dsn_queued msg=%s dsn=%s to=%s", first.msg_id, stored.msg_id,
                 first.mail_from)  # fmt: skip
