"""The values that travel between the stages of the flow (docs/architecture.md).

Acceptance hands an :class:`Envelope` to the spool and gets a :class:`StoredMessage`;
the spool leases recipients (:class:`Lease`) to the scheduler, which groups them into
a :class:`Job` per destination for delivery; delivery answers an
:class:`AttemptResult` per recipient, and the scheduler records an :class:`Outcome`.
Traffic shaping refuses with one of :data:`REFUSALS`.

This module is the bottom of the import graph: it imports nothing of Postwarden and
does no I/O, so every stage may use it without depending on another stage.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

#: What the suppression check answers when it cannot know (the control database has
#: not been read since start): the recipient waits, never sent, never dropped.
SUPPRESSIONS_UNKNOWN = "suppressions_unknown"

# Lanes: what kind of mail a message is, for fair leasing (``Spool.lease_due``). The
# high lane (transactional: API and SMTP mail, or priority=high) is always leased
# first; the bulk lane (campaigns) gets the room left, shared fairly across tenants.
LANE_HIGH = 0
LANE_BULK = 1
LANES = (LANE_HIGH, LANE_BULK)

# Recipient states. ``active`` means leased to the scheduler (in memory); it never
# survives a restart.
QUEUED, ACTIVE, DEFERRED = "queued", "active", "deferred"
DELIVERED, BOUNCED, EXPIRED, DELETED = "delivered", "bounced", "expired", "deleted"
DROPPED = "dropped"  # never sent: suppressed (at acceptance or before an attempt)
PENDING_STATES = (QUEUED, ACTIVE, DEFERRED)
FINAL_STATES = (DELIVERED, BOUNCED, EXPIRED, DELETED, DROPPED)

#: What a shaping refusal is, for the scheduler and the metric
#: ``postwarden_shaping_waits`` (``reason`` says it for people).
REFUSALS = (
    "suspended",
    "connection_limit",
    "connection_rate",
    "message_rate",
    "warming_cap",
    "paused",
    "domain_warming_cap",
    "domain_paused",
    "no_source",
    "broker_unavailable",
    "throttled",  # a refused connection's pace answer, no rule holding the source
)


class SpoolError(RuntimeError):
    """The spool could not do what was asked (closed, corrupt record, I/O error)."""


class SpoolFull(SpoolError):
    """No room left for the spool (a segment write or the index hit a full disk or a
    quota). Temporary: the spool tries again with the next message, and takes mail as
    soon as space returns."""


def domain_of(address: str) -> str:
    """Lower-cased domain part of an address (``""`` when there is none)."""
    return address.rpartition("@")[2].lower().rstrip(".")


def tenant_id(tenant: str | int | None) -> int | None:
    """The control plane's id of a spool tenant (the spool keeps it as text), or None
    when there is none or it is no id (a lab's or a test's name): such mail is nobody's
    to see through the API, and no tenant setting applies to it."""
    if tenant is None or tenant == "":
        return None
    try:
        return int(tenant)
    except ValueError:
        return None


@dataclass(frozen=True)
class Envelope:
    """What travels with a message besides its bytes."""

    mail_from: str
    rcpt_tos: Sequence[str]
    client_ip: str = ""
    helo: str = ""
    auth: str | None = None
    tenant: str | None = None
    smtputf8: bool = False
    body_8bit: bool = False
    received_at: float = field(default_factory=time.time)
    # Recipients not to send to, with why (the suppression check's answer): stored as
    # ``dropped`` with a ``dropped`` event, never leased.
    drops: Mapping[str, str] = field(default_factory=dict)
    # What the submitter attached (tags, metadata, source…): rides on the first
    # ``accepted`` event, for the control plane.
    meta: Mapping[str, Any] | None = None
    # The IP pool the message should leave from (None: the appliance's default pool).
    pool: str | None = None
    # LANE_HIGH (transactional) or LANE_BULK (campaigns): see Spool.lease_due.
    lane: int = LANE_HIGH
    # The API's Idempotency-Key this message was sent under: (key, the request's
    # hash, its index in a batch). Kept in the same transaction as the message, so
    # that a retry after any failure finds what was accepted (``find_idempotent``).
    idempotency: tuple[str, str, int] | None = None


@dataclass(frozen=True)
class Lease:
    """A recipient handed to the scheduler for a delivery attempt."""

    rcpt_id: int
    msg_id: str
    rcpt: str
    domain: str
    attempts: int
    created_at: float
    mail_from: str
    segment: int
    body_offset: int
    body_length: int
    smtputf8: bool
    body_8bit: bool
    tenant: str | None = None
    pool: str | None = None
    lane: int = LANE_HIGH


@dataclass(frozen=True)
class StoredMessage:
    """The answer to ``Spool.store``: durable when returned."""

    msg_id: str
    rcpt_ids: tuple[int, ...]
    leases: tuple[Lease, ...]  # non-empty when stored straight into ``active``
    drops: Mapping[str, str] = field(default_factory=dict)  # recipients stored as dropped


@dataclass(frozen=True)
class Outcome:
    """A recipient's new state after a delivery attempt (or an operator action)."""

    rcpt_id: int
    msg_id: str
    state: str  # delivered | deferred | bounced | expired | queued (not attempted)
    response: str = ""
    next_attempt: float = 0.0
    counted_attempt: bool = True
    event: str | None = None  # event type; defaults to the state
    detail: dict[str, Any] | None = None
    # Why a recipient put back to ``queued`` waits until ``next_attempt``: traffic
    # shaping's refusal (``"<kind>: <reason>"``); stored as ``wait_reason``.
    wait_reason: str | None = None


Kind = Literal["delivered", "temporary", "permanent", "not_attempted"]


@dataclass
class Job:
    """One message for one destination domain: a single SMTP transaction.

    ``mail_from`` is the envelope sender on the wire; with a VERP return path (one job
    per recipient) it is the signed return path and ``sender`` the message's own
    envelope sender, whose domain stays the :attr:`sending_domain`.
    """

    msg_id: str
    domain: str
    mail_from: str
    leases: list[Lease]
    queued_at: float = field(default_factory=time.monotonic)
    #: The message bytes when they came straight from acceptance; else read from the
    #: spool when the transaction starts.
    body: bytes | None = field(default=None, repr=False)
    tenant: str = ""
    lane: int = 0  # 0 transactional, 1 bulk
    sender: str = ""  # the message's envelope sender when mail_from is a return path
    #: The shaping refusal it was last counted as held for (the wait metric counts a
    #: job once per reason, not once per retry).
    held: str = ""

    @property
    def sending_domain(self) -> str:
        return (self.sender or self.mail_from).rpartition("@")[2].lower()

    @property
    def smtputf8(self) -> bool:
        return self.leases[0].smtputf8

    @property
    def body_8bit(self) -> bool:
        return self.leases[0].body_8bit


@dataclass(frozen=True)
class AttemptResult:
    """What happened to one recipient in one attempt."""

    lease: Lease
    kind: Kind
    response: str
    mx: str = ""
    ip: str = ""
    tls: bool = False
    reason: str = "other"  # bounded metric label: rcpt, data, mail, connect, dns, tls, ...
    source: str = ""  # the source (local address) it left from
