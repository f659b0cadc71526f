"""From the inbox to events and suppressions: what comes back after delivery.

Every worker runs one processor on the shared inbox (bounces.inbox): it claims reports
(a rename decides who owns one), parses them (bounces.parse), finds whose mail each is
about, and then in one control-database transaction:

* writes the event (``bounced`` with ``"async": true``, or ``complained``) with the
  classification, and the recipient's new state;
* feeds the tenant's suppressions (bounces.feedback);

then counts the failure or complaint for the warming health of the source and the
sending domain that sent the message (the shaping broker), and removes the report.

Whose mail: first the VERP token of the address the report was sent to (or of a
return path quoted in it, as ARF reports and bounces that quote the original do); a
forged or altered token counts and is believed for nothing. Without a valid token, the
``Received`` line Postwarden wrote (``by <host> (Postwarden) ... id <message id>``) or
the ``Message-ID`` it gave mail built by the HTTP API (``<message id@host>``) in the
quoted original, with the recipient the report names, but only for a message with a
single recipient: every recipient of a message holds a copy with that line and sees the
others' addresses, so a report without a token cannot show whose copy it is about.

A report nothing could be made of (no findings, no message of ours) is kept in the
inbox's ``unparsed/`` with the reason, counted, and listed by ``postwarden bounces
unparsed``: never lost. Auto-replies and delay warnings are counted and dropped.
Processing is at least once: a report processed twice (a crash between the commit and
the removal) finds its events already written and writes nothing new.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.exc import SQLAlchemyError

from postwarden.bounces import feedback
from postwarden.bounces.inbox import Inbox, Item
from postwarden.bounces.parse import Finding, Parser, Report
from postwarden.bounces.verp import ReturnPaths, Token, Verdict
from postwarden.config import Config
from postwarden.store.availability import LogLimiter
from postwarden.store.feed import lock_events
from postwarden.store.models import Event, Message, Recipient

log = logging.getLogger("postwarden.bounces")
_limited = LogLimiter(log)

_OUR_RECEIVED = re.compile(r"\(Postwarden\)[^;]{0,300}?\bid ([0-9a-f]{22})\b", re.I | re.S)
_OUR_MESSAGE_ID = re.compile(r"^message-id:[ \t]*<([0-9a-f]{22})@", re.I | re.M)
_TOKEN_LIKE = re.compile(r"b-[0-9a-f]{1,32}-[0-9a-z]{1,13}-[a-z2-7]{10}@[a-z0-9.\-]+", re.I)


@dataclass(frozen=True)
class Target:
    """The recipient a finding is about."""

    tenant_id: int
    message_id: str
    recipient_id: str | None
    address: str
    sending_domain: str


#: The local part of a List-Unsubscribe mailto: ``unsubscribe+<token>``.
UNSUBSCRIBE_PREFIX = "unsubscribe+"


def _unsubscribe_token(rcpt_tos: list[str]) -> str | None:
    for rcpt in rcpt_tos:
        local = rcpt.rpartition("@")[0]
        if local[: len(UNSUBSCRIBE_PREFIX)].lower() == UNSUBSCRIBE_PREFIX:
            return local[len(UNSUBSCRIBE_PREFIX) :]
    return None


class BounceProcessor:
    def __init__(
        self,
        cfg: Config,
        inbox: Inbox,
        sessions: Any,
        return_paths: ReturnPaths,
        *,
        parser: Parser | None = None,
        metrics: Any = None,
        feedback_to_broker: Callable[..., Awaitable[Any]] | None = None,
        on_suppressed: Callable[[list[tuple[int, str]]], Any] | None = None,
        on_unsubscribe: Callable[[str, str], Awaitable[bool]] | None = None,
        batch: int = 8,  # up to inbound.max_message_size each, held at once
        stale_after: float = 300.0,
    ) -> None:
        self.cfg = cfg
        self.inbox = inbox
        self.sessions = sessions
        self.return_paths = return_paths
        self.parser = parser or Parser()
        self.metrics = metrics
        self.feedback_to_broker = feedback_to_broker
        self.on_suppressed = on_suppressed
        # A message to a List-Unsubscribe mailto (``unsubscribe+<token>@...``):
        # (token, envelope sender) -> whether the token read and was recorded.
        self.on_unsubscribe = on_unsubscribe
        self.batch = batch
        self.stale_after = stale_after
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.processed = 0

    # ------------------------------------------------------------------ loop

    def reconfigure(self, cfg: Config, parser: Parser, return_paths: ReturnPaths) -> None:
        """A reloaded configuration, its bounce patterns and return-path keys."""
        self.cfg, self.parser, self.return_paths = cfg, parser, return_paths

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="bounce-processor")

    def wake(self) -> None:
        self._wake.set()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        last_recover = 0.0
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), 5.0)
            self._wake.clear()
            try:
                if time.time() - last_recover > 60:
                    last_recover = time.time()
                    await asyncio.to_thread(self.inbox.recover, self.stale_after)
                while await self.run_once() == self.batch:
                    pass
            except Exception as exc:
                _limited(logging.WARNING, "processing", "event=bounce_processing_failed", exc=exc)

    async def run_once(self) -> int:
        """Claim and handle one batch; the number of reports claimed."""
        items = await asyncio.to_thread(self.inbox.claim, self.batch)
        for item in items:
            try:
                outcome = await self.handle(item)
            except Exception as exc:
                # Left in cur/: recover() gives it back to the queue later.
                _limited(logging.WARNING, "report", "event=bounce_failed report=%s", item.id,
                         exc=exc)  # fmt: skip
                continue
            self.processed += 1
            self._count(outcome)
        return len(items)

    def _count(self, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.inbound_reports.labels(outcome).inc()

    # ------------------------------------------------------------------ one report

    async def handle(self, item: Item) -> str:
        """Process one claimed report; returns what it was (a metric label)."""
        token = _unsubscribe_token(item.rcpt_tos)
        if token is not None and self.on_unsubscribe is not None:
            if await self.on_unsubscribe(token, item.mail_from):
                await asyncio.to_thread(self.inbox.done, item)
                return "unsubscribe"
            await asyncio.to_thread(self.inbox.unparsed, item, "forged unsubscribe token")
            return "unparsed"
        step = "parser"
        try:
            report = await asyncio.to_thread(self.parser.parse_bytes, item.data)
            step = "processing"
            return await self._handle_parsed(item, report)
        except (SQLAlchemyError, OSError):
            raise  # left claimed: recover() gives it back to the queue later
        except Exception as exc:
            # A report that breaks the parser or the processing would fail the same way
            # every time: kept for an operator, never retried for ever.
            log.error("event=bounce_failed report=%s error=%r", item.id, exc, exc_info=True)
            await asyncio.to_thread(self.inbox.unparsed, item, f"{step} error: {exc!r}"[:300])
            return "unparsed"

    async def _handle_parsed(self, item: Item, report: Report) -> str:
        token, forged = self._token(item, report)
        kind = report.kind
        if kind == "auto_reply" or (
            report.findings and all(f.kind == "auto_reply" for f in report.findings)
        ):
            await asyncio.to_thread(self.inbox.done, item)
            return "auto_reply"
        findings = [
            f
            for f in report.findings
            if f.kind == "bounce" or (f.kind == "complaint" and _is_complaint(f))
        ]
        if report.findings and not findings:
            # Delay warnings, delivery reports, feedback that is no complaint (ARF
            # not-spam, auth-failure reports).
            await asyncio.to_thread(self.inbox.done, item)
            if any(f.kind == "delayed" for f in report.findings):
                return "delayed"
            if any(f.kind == "complaint" for f in report.findings):
                return "feedback"
            return "delivered"
        if not findings:
            await asyncio.to_thread(
                self.inbox.unparsed, item, "no bounce, complaint or auto-reply found"
            )
            return "unparsed"
        if token is None and forged:
            # Someone wrote to a return path of ours with a token we did not sign: the
            # report is believed for nothing (not even its quoted headers).
            await asyncio.to_thread(self.inbox.unparsed, item, "forged return-path token")
            return "unparsed"
        async with self.sessions() as s:
            targets, reason = await self._targets(s, report, findings, token)
            if not targets:
                await s.rollback()
                await asyncio.to_thread(self.inbox.unparsed, item, reason)
                return "unparsed"
            await lock_events(s)
            suppressed: list[tuple[int, str]] = []
            health: list[tuple[Target, str]] = []
            for target, finding in targets:
                if await self._seen(s, target, item.id):
                    continue
                wrote = await self._record(s, item, target, finding, suppressed)
                if wrote:
                    health.append(
                        (target, "complained" if finding.kind == "complaint" else "bounced")
                    )
            await s.commit()
        if suppressed and self.on_suppressed is not None:
            self.on_suppressed(suppressed)
        for target, what in health:
            await self._health(target, what)
        await asyncio.to_thread(self.inbox.done, item)
        return "complaint" if findings[0].kind == "complaint" else "bounce"

    def _token(self, item: Item, report: Report) -> tuple[Token | None, bool]:
        """The first valid return-path token: the report's envelope recipients, then
        any address of ours quoted in it (ARF's Original-Mail-From, a quoted Return-Path)."""
        candidates = list(item.rcpt_tos)
        envelope = len(candidates)
        if report.original is not None:
            for h in ("return-path", "original-mail-from", "errors-to"):
                candidates += [str(v) for v in report.original.get_all(h, [])]
        candidates += _TOKEN_LIKE.findall(report.raw_text[:500_000])
        forged = False
        for i, c in enumerate(candidates):
            verdict, token = self.return_paths.verify(c)
            if verdict is Verdict.VALID and token is not None:
                return token, False
            if verdict is Verdict.FORGED and not forged:
                forged = True
                log.warning("event=forged_token report=%s address=%r", item.id, c[:200])
                if self.metrics is not None:
                    self.metrics.return_path_tokens.labels("forged").inc()
            if forged and i < envelope:
                # Sent to a return path whose token we did not sign: believed for
                # nothing, not even a token quoted in it.
                return None, True
        return None, forged

    async def _targets(
        self, s: Any, report: Report, findings: list[Finding], token: Token | None
    ) -> tuple[list[tuple[Target, Finding]], str]:
        """Whose mail the findings are about, or why none could be found."""
        if token is not None:
            if self.metrics is not None:
                self.metrics.return_path_tokens.labels("valid").inc()
            row = (
                await s.execute(
                    select(Recipient.tenant_id, Recipient.address, Recipient.message_id).where(
                        Recipient.id == token.recipient_id
                    )
                )
            ).first()
            if row is None or row.tenant_id is None:
                return [], f"no message of ours: token {token.recipient_id} names no recipient"
            target = Target(
                row.tenant_id, row.message_id, token.recipient_id, row.address, token.domain
            )
            return [(target, _finding_for(findings, row.address))], ""
        # No token: our Received line or Message-ID in the quoted original names the
        # message.
        text = report.raw_text
        if report.original is not None:
            text = _headers_text(report.original) + "\n" + text
        m = _OUR_RECEIVED.search(text) or _OUR_MESSAGE_ID.search(text)
        if m is None:
            return [], "no message of ours: no valid return-path token, Received line or Message-ID"
        msg_id = m.group(1)
        msg = (
            await s.execute(
                select(Message.tenant_id, Message.mail_from).where(Message.id == msg_id)
            )
        ).first()
        if msg is None or msg.tenant_id is None:
            return [], f"no message of ours: message {msg_id} is unknown here"
        rows = (
            await s.execute(
                select(Recipient.id, Recipient.address).where(Recipient.message_id == msg_id)
            )
        ).all()
        if len(rows) != 1:
            # Each recipient's copy has this Received line and names the others: without
            # a token the report cannot show whose copy it is about.
            return [], f"no return-path token, and message {msg_id} has {len(rows)} recipients"
        only = rows[0]
        sending = (msg.mail_from or "").rpartition("@")[2].lower()
        target = Target(msg.tenant_id, msg_id, only.id, only.address, sending)
        # The report must name the recipient: a message id alone proves nothing.
        out = [(target, f) for f in findings if (f.recipient or "").lower() == only.address.lower()]
        return out, "" if out else f"the report names no recipient of message {msg_id}"

    async def _seen(self, s: Any, target: Target, report_id: str) -> bool:
        """Whether this report's event for this recipient is already written."""
        rows = (
            await s.execute(
                select(Event.detail).where(
                    Event.message_id == target.message_id,
                    Event.recipient_id == target.recipient_id,
                    Event.type.in_(("bounced", "complained")),
                )
            )
        ).scalars()
        return any((d or {}).get("report") == report_id for d in rows)

    async def _record(
        self,
        s: Any,
        item: Item,
        target: Target,
        f: Finding,
        suppressed: list[tuple[int, str]],
    ) -> bool:
        now = dt.datetime.now(dt.UTC)
        complaint = f.kind == "complaint"
        detail: dict[str, Any] = {
            "async": True,
            "report": item.id,
            "category": f.reason,
            "hard": bool(f.hard),
            "status": f.status,
            "diagnostic": (f.diagnostic or "")[:1000],
            "remote_mta": f.remote_mta,
        }
        if f.evidence:
            detail["evidence"] = f.evidence
        if complaint:
            detail = {
                "report": item.id,
                "feedback_type": f.feedback_type or "abuse",
                "user_agent": (f.diagnostic or "")[:200],
            }
        tags = (
            await s.execute(select(Message.tags).where(Message.id == target.message_id))
        ).scalar_one_or_none() or []
        s.add(
            Event(
                tenant_id=target.tenant_id,
                ts=now,
                type="complained" if complaint else "bounced",
                message_id=target.message_id,
                recipient_id=target.recipient_id,
                recipient=target.address,
                tags="," + ",".join(tags) + "," if tags else "",
                detail=detail,
            )
        )
        if not complaint and target.recipient_id:
            await s.execute(
                update(Recipient)
                .where(Recipient.id == target.recipient_id)
                .values(
                    state="bounced",
                    updated_at=now,
                    last_response=(f.diagnostic or f.status or "")[:2000],
                )
            )
        out = await feedback.apply(
            s,
            self.cfg.bounces,
            tenant_id=target.tenant_id,
            address=target.address,
            kind="complaint" if complaint else "failure",
            hard=f.hard,
            category=f.reason,
            note=(f.diagnostic or f.feedback_type or "")[:500],
            now=now,
        )
        if out.suppressed:
            suppressed.append((target.tenant_id, target.address))
        if self.metrics is not None:
            if not complaint:
                hard = str(bool(f.hard)).lower()
                self.metrics.bounce_categories.labels(f.reason, hard, "async").inc()
            if out.suppressed:
                self.metrics.bounce_suppressions.labels(out.suppressed).inc()
        log.info(
            "event=%s msg=%s rcpt=%s category=%s hard=%s suppressed=%s report=%s",
            "complained" if complaint else "bounced_async",
            target.message_id,
            target.recipient_id,
            f.reason,
            f.hard,
            out.suppressed,
            item.id,
        )
        return True

    async def _health(self, target: Target, what: str) -> None:
        """Count it for the warming health of the source that sent the message."""
        if self.feedback_to_broker is None:
            return
        source = None
        async with self.sessions() as s:
            rows = (
                await s.execute(
                    select(Event.detail).where(
                        Event.message_id == target.message_id,
                        Event.recipient_id == target.recipient_id,
                        Event.type == "delivered",
                    )
                )
            ).scalars()
            for d in rows:
                source = (d or {}).get("source") or source
        try:
            await self.feedback_to_broker(
                op="feedback",
                source=source,
                sending_domain=target.sending_domain,
                **{what: 1},
            )
        except Exception:
            log.warning("event=health_feedback_failed msg=%s", target.message_id, exc_info=True)


#: ARF feedback types that are complaints (RFC 5965); "not-spam" and RFC 6591's
#: "auth-failure" are not.
_COMPLAINT_TYPES = frozenset({"abuse", "fraud", "virus", "other"})


def _is_complaint(f: Finding) -> bool:
    return (f.feedback_type or "abuse").lower() in _COMPLAINT_TYPES


def _headers_text(msg: Any) -> str:
    """The quoted original's header fields as text, even when they do not decode (a
    charset Python does not know must not stop the report)."""
    try:
        return str(msg)
    except Exception:
        return "\n".join(f"{k}: {v}" for k, v in msg.raw_items())


def _finding_for(findings: list[Finding], address: str) -> Finding:
    """The finding about ``address`` (a report may list several recipients)."""
    for f in findings:
        if f.recipient and f.recipient.lower() == address.lower():
            return f
    return findings[0]
