"""Adaptive throttling: what a provider's answers do to a (source, site) pair.

Pure policy, no I/O; time is passed in (tests drive a clock).

* **Response rules** match a delivery answer (reply code, enhanced code, text) and
  name an action with a duration: ``suspend`` the pair, ``lower_rate`` or
  ``lower_connections`` by a factor, or ``bounce`` what is queued for it. The shipped
  rules cover the large providers' known throttling answers; operators add theirs.
* **Between actions the rate follows the answers** (AIMD, as TCP finds a path's
  capacity): a deferral that speaks of pace puts the pair in **backoff** and
  multiplies its rate by ``decrease`` (0.5; a pair without a rate starts from the
  rate it was observed to deliver at); in backoff new connections are paced too, and
  the rate never falls below one message per ``retry_interval`` (the probe). Each
  ``window`` without push-back that sees a delivery multiplies the rate by
  ``recover`` (2), never above the limit; ``to_normal_after`` without push-back ends
  the backoff and gives the full rate back. The appliance so finds a provider's pace
  without an operator, and recovers within a minute once it stops pushing back.
* Every action and rate change carries its reason and expires by itself.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

ACTIONS = ("suspend", "lower_rate", "lower_connections", "bounce")


@dataclass(frozen=True)
class ResponseRule:
    name: str
    action: str
    duration: float  # seconds
    code: int | None = None  # reply code, e.g. 421
    enhanced: str | None = None  # e.g. "4.7.28"; a prefix ("4.7.") matches its subtree
    text: re.Pattern[str] | None = None  # searched case-insensitively in the reply text
    sites: tuple[str, ...] = ()  # empty: every site
    factor: float = 0.5  # for lower_rate / lower_connections

    def matches(self, site: str, code: int, enhanced: str, text: str) -> bool:
        if self.sites and site not in self.sites:
            return False
        if self.code is not None and code != self.code:
            return False
        if self.enhanced is not None and not (
            enhanced == self.enhanced
            or (self.enhanced.endswith(".") and enhanced.startswith(self.enhanced))
        ):
            return False
        return not (self.text is not None and not self.text.search(text))


def rule(
    name: str,
    action: str,
    duration: float,
    *,
    code: int | None = None,
    enhanced: str | None = None,
    text: str | None = None,
    sites: Iterable[str] = (),
    factor: float = 0.5,
) -> ResponseRule:
    if action not in ACTIONS:
        raise ValueError(f"{name}: action must be one of {', '.join(ACTIONS)}, got {action!r}")
    if duration <= 0:
        raise ValueError(f"{name}: duration must be positive")
    if not 0 < factor < 1:
        raise ValueError(f"{name}: factor must be between 0 and 1")
    if code is None and enhanced is None and text is None:
        raise ValueError(f"{name}: give at least one of code, enhanced, text")
    pattern = re.compile(text, re.IGNORECASE) if text is not None else None
    return ResponseRule(name, action, duration, code, enhanced, pattern, tuple(sites), factor)


# The large providers' throttling answers (their postmaster pages name them).
SHIPPED_RULES: tuple[ResponseRule, ...] = (
    rule("gmail-rate-limited", "suspend", 1800, code=421, enhanced="4.7.28", sites=["gmail"]),
    rule(
        "gmail-unusual-rate",
        "lower_rate",
        3600,
        enhanced="4.7.0",
        text=r"unusual rate|rate limit",
        sites=["gmail"],
    ),
    rule("yahoo-ts03", "suspend", 14400, text=r"\bTS03\b", sites=["yahoo"]),
    rule("yahoo-tss04", "lower_rate", 3600, text=r"\bTSS0[14]\b", sites=["yahoo"]),
    rule("microsoft-4.7.650", "suspend", 3600, code=451, enhanced="4.7.650", sites=["microsoft"]),
    rule(
        "too-many-connections", "lower_connections", 900, text=r"too many (concurrent )?connections"
    ),
)


def first_match(
    rules: Sequence[ResponseRule], site: str, code: int, enhanced: str, text: str
) -> ResponseRule | None:
    for r in rules:
        if r.matches(site, code, enhanced, text):
            return r
    return None


#: The rate of a pair the rules give none (messages/s): no limit in practice.
UNLIMITED = 1_000_000.0
#: Seconds over which a pair's delivery rate is observed (a sliding window).
OBSERVE_WINDOW = 10.0


@dataclass
class PairState:
    """What the answers have done to one (source, site) pair.

    Every field is a plain number (or the list of changes), so that the state
    serializes as it is."""

    limit_rate: float  # messages/s allowed by the rules (UNLIMITED: none)
    limit_connections: int
    rate: float = 0.0  # in force now (AIMD); 0 means "start at the limit"
    connections: int = 0
    suspended_until: float = 0.0
    lowered_until: float = 0.0
    last_decrease: float = -1e18
    reason: str = ""
    changes: list[tuple[float, str, str]] = field(default_factory=list)  # (time, what, why)
    # Backoff (a deferral that spoke of pace): since when (0: not in backoff), the
    # latest push-back, the latest increase, the latest new connection.
    backoff_since: float = 0.0
    pushback_at: float = 0.0
    last_increase: float = 0.0
    last_connect: float = 0.0
    # Deliveries seen: this window's count (from seen_start), the window before's.
    seen_start: float = 0.0
    seen_count: float = 0.0
    seen_prev: float = 0.0

    def __post_init__(self) -> None:
        self.rate = self.rate or self.limit_rate
        self.connections = self.connections or self.limit_connections

    @property
    def rated(self) -> bool:
        """Whether the rules give the pair a message rate."""
        return self.limit_rate < UNLIMITED


@dataclass(frozen=True)
class Aimd:
    decrease: float = 0.5  # multiply on a deferral (rules: backoff_rate)
    recover: float = 2.0  # multiply per window without push-back that saw a delivery
    window: float = 5.0  # seconds without push-back (and since the last increase)
    retry_interval: float = 10.0  # in backoff: one probe (message, connection) this often
    to_normal_after: float = 30.0  # seconds without push-back: backoff ends, full rate
    hold: float = 1.0  # seconds between two decreases

    @property
    def floor(self) -> float:
        """The lowest rate: one message per retry interval."""
        return 1.0 / self.retry_interval


DEFAULT_AIMD = Aimd()


def _note(state: PairState, now: float, what: str, why: str) -> None:
    state.reason = why
    state.changes.append((now, what, why))
    del state.changes[:-50]


def on_answer(
    state: PairState,
    *,
    now: float,
    site: str,
    code: int,
    enhanced: str,
    text: str,
    rules: Sequence[ResponseRule] = SHIPPED_RULES,
    aimd: Aimd = DEFAULT_AIMD,
    adaptive: bool = True,
) -> ResponseRule | None:
    """Apply one delivery answer; returns the response rule that fired, if one did.
    ``adaptive=False``: a deferral that says nothing about the pace (one recipient's
    greylisting or full mailbox) leaves the rate alone; rules still apply."""
    expire(state, now)
    hit = first_match(rules, site, code, enhanced, text)
    why = f"{code} {enhanced} {text}".strip()[:200]
    if hit is not None:
        if hit.action == "suspend":
            state.suspended_until = max(state.suspended_until, now + hit.duration)
            _note(state, now, f"suspend {hit.duration:.0f}s", f"{hit.name}: {why}")
        elif hit.action == "lower_rate":
            state.rate = max(aimd.floor, state.rate * hit.factor)
            state.lowered_until = max(state.lowered_until, now + hit.duration)
            _note(state, now, f"rate {state.rate * 60:.1f}/min", f"{hit.name}: {why}")
        elif hit.action == "lower_connections":
            state.connections = max(1, int(state.connections * hit.factor))
            state.lowered_until = max(state.lowered_until, now + hit.duration)
            _note(state, now, f"connections {state.connections}", f"{hit.name}: {why}")
        else:  # bounce: the caller bounces what is queued for the pair
            _note(state, now, "bounce queued", f"{hit.name}: {why}")
        return hit
    if adaptive and 400 <= code < 500:
        pushback(state, now=now, why=f"deferral: {why}", aimd=aimd)
    return None


def pushback(state: PairState, *, now: float, why: str, aimd: Aimd = DEFAULT_AIMD) -> None:
    """A deferral that speaks of pace: the pair is in backoff (its connections paced)
    and its rate multiplied by ``decrease`` — once per ``hold`` at most (a burst of
    answers to connections open at once is one signal, as TCP halves once per RTT).
    A pair without a rate starts from the rate it was observed to deliver at."""
    recover(state, now, aimd)
    state.pushback_at = now
    entering = not state.backoff_since
    if entering:
        state.backoff_since = now
    if now - state.last_decrease < aimd.hold:
        return
    state.last_decrease = now
    base = state.rate
    if entering and not state.rated:
        base = min(base, observed_rate(state, now))
    state.rate = max(aimd.floor, base * aimd.decrease)
    what = f"rate {state.rate * 60:.1f}/min"
    _note(state, now, f"backoff, {what}" if entering else what, why)


def speaks_of_pace(stage: str, code: int, enhanced: str) -> bool:
    """Whether an answer should move the rate (AIMD): a refused greeting, sender or
    message does, and a 421 anywhere; one recipient's deferral (greylisting, a full
    mailbox) does not, nor does an error that is no answer at all (the network's or
    ours: 4.4.x, and the dns, local and connection stages)."""
    if stage == "rcpt":
        return code == 421
    return stage not in ("dns", "local", "connection") and not enhanced.startswith("4.4.")


def no_answer(stage: str, enhanced: str) -> bool:
    """Whether a failure is no answer from the receiving host at all (DNS, the
    network, ours: the dns, local and connection stages, or 4.4.x), which says nothing
    of the sender's pace or list."""
    return stage in ("dns", "local", "connection") or enhanced.startswith("4.4.")


def in_backoff(state: PairState) -> bool:
    return bool(state.backoff_since)


def normal_at(state: PairState, aimd: Aimd = DEFAULT_AIMD) -> float:
    """When the backoff ends by itself if no push-back comes (inf: not in backoff)."""
    return state.pushback_at + aimd.to_normal_after if state.backoff_since else math.inf


def recover(state: PairState, now: float, aimd: Aimd = DEFAULT_AIMD) -> None:
    """End a backoff that has seen no push-back for ``to_normal_after``: the full rate
    back (unless a rule's lowering is in force), connections no longer paced."""
    if not state.backoff_since or now < state.pushback_at + aimd.to_normal_after:
        return
    state.backoff_since = 0.0
    if now >= state.lowered_until and state.rate < state.limit_rate:
        state.rate = state.limit_rate
        state.last_increase = now
    what = f"rate {state.rate * 60:.1f}/min" if state.rated else "no rate limit"
    _note(state, now, f"normal, {what}", f"no push-back for {aimd.to_normal_after:.0f}s")


def connect_at(state: PairState, now: float, aimd: Aimd = DEFAULT_AIMD) -> float:
    """When the pair may open its next connection: in backoff, new connections are
    paced at the rate in force (one per retry interval at the floor); else now."""
    recover(state, now, aimd)
    if not state.backoff_since:
        return now
    return max(now, state.last_connect + 1.0 / max(state.rate, aimd.floor))


def observe(state: PairState, now: float, n: float = 1.0) -> None:
    """``n`` messages delivered on the pair."""
    _roll(state, now)
    state.seen_count += n


def observed_rate(state: PairState, now: float) -> float:
    """Messages/s delivered over the last ``OBSERVE_WINDOW`` (a sliding estimate)."""
    _roll(state, now)
    frac = min(1.0, max(0.0, (now - state.seen_start) / OBSERVE_WINDOW))
    return (state.seen_prev * (1.0 - frac) + state.seen_count) / OBSERVE_WINDOW


def _roll(state: PairState, now: float) -> None:
    if now - state.seen_start < OBSERVE_WINDOW:
        return
    k = int((now - state.seen_start) // OBSERVE_WINDOW)
    state.seen_prev = state.seen_count if k == 1 else 0.0
    state.seen_count = 0.0
    state.seen_start += k * OBSERVE_WINDOW


def on_success(state: PairState, *, now: float, aimd: Aimd = DEFAULT_AIMD) -> None:
    """A delivery: counted (the observed rate), and once a ``window`` has passed
    without push-back and since the last increase, the rate multiplied by
    ``recover``, up to the rules' limit (not while a rule's lowering is in force)."""
    expire(state, now)
    recover(state, now, aimd)
    observe(state, now)
    if now < state.lowered_until or state.rate >= state.limit_rate:
        return
    if now - max(state.pushback_at, state.last_increase, state.last_decrease) < aimd.window:
        return
    state.rate = min(state.limit_rate, state.rate * aimd.recover)
    state.last_increase = now
    what = f"rate {state.rate * 60:.1f}/min" if state.rate < UNLIMITED else "no rate limit"
    _note(state, now, what, "deliveries succeed")


def expire(state: PairState, now: float) -> None:
    """End what has run its time: a suspension, a lowered connection limit."""
    if state.suspended_until and now >= state.suspended_until:
        state.suspended_until = 0.0
        _note(state, now, "resume", "suspension expired")
    if state.lowered_until and now >= state.lowered_until:
        state.lowered_until = 0.0
        if state.connections < state.limit_connections:
            state.connections = state.limit_connections
            _note(state, now, f"connections {state.connections}", "lowering expired")


def suspended(state: PairState, now: float) -> bool:
    return now < state.suspended_until
