"""The shaping broker (docs/decisions/0006): every (source, site) budget in one place.

Workers (holders) ask for a connection slot before connecting and give it back after;
they take message tokens in batches; they report each answer. The broker applies the
rules file's limits, the response rules and AIMD (``shaping.adaptive``) and says no —
with a reason and a time to come back — when a pair is suspended or out of budget.
The clock is passed in, so tests drive time. This module is the in-process core; the
supervisor serves it to workers over a socket.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from postwarden.shaping.adaptive import (
    DEFAULT_AIMD,
    SHIPPED_RULES,
    Aimd,
    PairState,
    ResponseRule,
    expire,
    on_answer,
    on_success_window,
)
from postwarden.shaping.rules import Limits, Rules

UNLIMITED_RATE = 1_000_000.0  # messages/s when the rules set none
SUCCESS_WINDOW = 10.0  # seconds of successes before AIMD adds back


@dataclass(frozen=True)
class Grant:
    ok: bool
    tokens: int = 0
    reason: str = ""
    retry_at: float = 0.0


@dataclass
class Bucket:
    """A token bucket: ``rate`` per second, holding at most ``burst``."""

    rate: float
    burst: float
    tokens: float
    stamp: float

    def refill(self, now: float) -> None:
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now

    def take(self, now: float, want: int) -> int:
        self.refill(now)
        n = min(want, int(self.tokens))
        self.tokens -= n
        return n

    def wait(self) -> float:
        """Seconds until one token is there."""
        return max(0.0, (1.0 - self.tokens) / self.rate)


@dataclass
class Pair:
    source: str
    site: str
    limits: Limits
    state: PairState
    messages: Bucket
    connects: Bucket | None
    slots: dict[Any, int] = field(default_factory=dict)
    last_success_window: float = 0.0
    successes: int = 0

    @property
    def in_use(self) -> int:
        return sum(self.slots.values())


class Broker:
    def __init__(
        self,
        rules: Rules,
        response_rules: Sequence[ResponseRule] = SHIPPED_RULES,
        *,
        aimd: Aimd = DEFAULT_AIMD,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rules = rules
        self.response_rules = response_rules
        self.aimd = aimd
        self.clock = clock
        self.pairs: dict[tuple[str, str, str | None], Pair] = {}

    def reconfigure(self, rules: Rules, response_rules: Sequence[ResponseRule]) -> None:
        """New rules: pairs are rebuilt from them as they are next used (slots kept)."""
        self.rules, self.response_rules = rules, response_rules
        for key, old in list(self.pairs.items()):
            new = self._make(*key)
            new.slots = old.slots
            self.pairs[key] = new

    # ------------------------------------------------------------------ pairs

    def _key(self, source: str, site: str, domain: str | None) -> tuple[str, str, str | None]:
        # A domain with limits of its own is its own pair; others share the site's.
        d = domain.lower() if domain and domain.lower() in self.rules.domains else None
        return (source, site, d)

    def _make(self, source: str, site: str, domain: str | None) -> Pair:
        limits = self.rules.limits_for(site, domain)
        rate = limits.max_message_rate.per_second if limits.max_message_rate else UNLIMITED_RATE
        conns = limits.connection_limit or 1_000_000
        now = self.clock()
        state = PairState(limit_rate=rate, limit_connections=conns)
        burst = max(1.0, rate)  # a second's worth
        connects = None
        if limits.max_connection_rate is not None:
            cr = limits.max_connection_rate.per_second
            connects = Bucket(cr, max(1.0, cr), max(1.0, cr), now)
        return Pair(
            source,
            site if domain is None else f"{site}/{domain}",
            limits,
            state,
            Bucket(rate, burst, burst, now),
            connects,
            last_success_window=now,
        )

    def pair(self, source: str, site: str, domain: str | None = None) -> Pair:
        key = self._key(source, site, domain)
        p = self.pairs.get(key)
        if p is None:
            p = self.pairs[key] = self._make(*key)
        return p

    # ------------------------------------------------------------------ leases

    def acquire_connection(
        self, holder: Any, source: str, site: str, domain: str | None = None
    ) -> Grant:
        now = self.clock()
        p = self.pair(source, site, domain)
        expire(p.state, now)
        if now < p.state.suspended_until:
            return Grant(
                False, reason=f"suspended: {p.state.reason}", retry_at=p.state.suspended_until
            )
        if p.in_use >= min(p.state.connections, p.state.limit_connections):
            return Grant(False, reason="connection limit", retry_at=now + 1.0)
        if p.connects is not None and p.connects.take(now, 1) < 1:
            return Grant(False, reason="connection rate", retry_at=now + p.connects.wait())
        p.slots[holder] = p.slots.get(holder, 0) + 1
        return Grant(True, tokens=1)

    def release_connection(
        self, holder: Any, source: str, site: str, domain: str | None = None
    ) -> None:
        p = self.pair(source, site, domain)
        n = p.slots.get(holder, 0) - 1
        if n > 0:
            p.slots[holder] = n
        else:
            p.slots.pop(holder, None)

    def take_messages(
        self, holder: Any, source: str, site: str, want: int, domain: str | None = None
    ) -> Grant:
        """Up to ``want`` message tokens (at least one, or a time to come back)."""
        now = self.clock()
        p = self.pair(source, site, domain)
        expire(p.state, now)
        if now < p.state.suspended_until:
            return Grant(
                False, reason=f"suspended: {p.state.reason}", retry_at=p.state.suspended_until
            )
        bucket = p.messages
        if bucket.rate != p.state.rate:  # AIMD moved the rate
            bucket.refill(now)
            bucket.rate = p.state.rate
            bucket.burst = max(1.0, p.state.rate)
            bucket.tokens = min(bucket.tokens, bucket.burst)
        n = bucket.take(now, want)
        if n < 1:
            return Grant(False, reason="message rate", retry_at=now + bucket.wait())
        return Grant(True, tokens=n)

    def drop_holder(self, holder: Any) -> None:
        """A worker went away: its slots are free again."""
        for p in self.pairs.values():
            p.slots.pop(holder, None)

    # ------------------------------------------------------------------ answers

    def report(
        self,
        source: str,
        site: str,
        code: int,
        enhanced: str = "",
        text: str = "",
        domain: str | None = None,
    ) -> ResponseRule | None:
        """One delivery answer for the pair: rules, AIMD and recovery applied."""
        now = self.clock()
        p = self.pair(source, site, domain)
        hit = on_answer(
            p.state,
            now=now,
            site=site,
            code=code,
            enhanced=enhanced,
            text=text,
            rules=self.response_rules,
            aimd=self.aimd,
        )
        if 200 <= code < 300 and hit is None:
            p.successes += 1
            if now - p.last_success_window >= SUCCESS_WINDOW:
                on_success_window(p.state, now=now, aimd=self.aimd)
                p.last_success_window = now
        return hit

    def status(self) -> list[dict[str, Any]]:
        now = self.clock()
        out = []
        for p in self.pairs.values():
            expire(p.state, now)
            out.append(
                {
                    "source": p.source,
                    "site": p.site,
                    "rate_per_min": round(p.state.rate * 60, 2),
                    "limit_per_min": round(p.state.limit_rate * 60, 2),
                    "connections": p.in_use,
                    "connection_limit": p.state.connections,
                    "suspended_for": max(0.0, p.state.suspended_until - now),
                    "reason": p.state.reason,
                }
            )
        return out
