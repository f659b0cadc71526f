"""The shaping broker's answers (docs/decisions/0006): a slot and tokens, or why not
and when to come back. Plain values: the scheduler, the worker's shaper, the broker
channel and the fallback limits pass them around without importing the broker."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Grant:
    ok: bool
    tokens: int = 0
    reason: str = ""
    retry_at: float = 0.0
    kind: str = ""  # on a refusal, one of values.REFUSALS


@dataclass(frozen=True)
class Choice:
    """The answer to :meth:`Broker.choose`: a source and a connection slot, or why not.

    ``metered``: take message tokens (:meth:`Broker.take`) before each
    transaction — the pair has a rate, or the source is warming; ``tokens`` are
    granted already. On a refusal, ``retry_at`` says when to come back; ``defer``
    says how many messages wait until then (a warming source's share, overflow
    "wait"), else every message queued for the destination waits; ``bounce`` is set
    while a bounce rule is in force.
    """

    ok: bool
    source: str = ""
    tokens: int = 0
    metered: bool = False
    max_messages: int = 0
    reason: str = ""
    retry_at: float = 0.0
    defer: int = 0
    bounce: str = ""
    kind: str = ""  # on a refusal, one of values.REFUSALS (or "bounce")
