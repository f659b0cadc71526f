"""Adaptive throttling: what a provider's answers do to a (source, site) pair.

Pure policy, no I/O; time is passed in (tests drive a clock).

* **Response rules** match a delivery answer (reply code, enhanced code, text) and
  name an action with a duration: ``suspend`` the pair, ``lower_rate`` or
  ``lower_connections`` by a factor, or ``bounce`` what is queued for it. The shipped
  rules cover the large providers' known throttling answers; operators add theirs.
* **Between actions the rate follows the answers** (AIMD, as TCP finds a path's
  capacity): each deferral multiplies the pair's rate by ``decrease`` (0.5), each
  success window adds ``increase`` of the rules' limit back, never above the limit or
  below ``floor``. The appliance so finds a provider's pace without an operator.
* Every action and rate change carries its reason and expires by itself.
"""

from __future__ import annotations

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


@dataclass
class PairState:
    """What the answers have done to one (source, site) pair."""

    limit_rate: float  # messages/s allowed by the rules
    limit_connections: int
    rate: float = 0.0  # in force now (AIMD); 0 means "start at the limit"
    connections: int = 0
    suspended_until: float = 0.0
    lowered_until: float = 0.0
    last_decrease: float = -1e18
    reason: str = ""
    changes: list[tuple[float, str, str]] = field(default_factory=list)  # (time, what, why)

    def __post_init__(self) -> None:
        self.rate = self.rate or self.limit_rate
        self.connections = self.connections or self.limit_connections


@dataclass(frozen=True)
class Aimd:
    decrease: float = 0.5  # multiply on a deferral
    increase: float = 0.1  # add this share of the limit per success window
    floor: float = 1 / 60  # never below one message a minute
    hold: float = 1.0  # seconds between two decreases


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
    aimd: Aimd = Aimd(),
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
    # A deferral: back off multiplicatively, once a second at most (a burst of
    # answers to connections open at once is one signal, as TCP halves once per RTT).
    if adaptive and 400 <= code < 500 and now - state.last_decrease >= aimd.hold:
        state.last_decrease = now
        state.rate = max(aimd.floor, state.rate * aimd.decrease)
        _note(state, now, f"rate {state.rate * 60:.1f}/min", f"deferral: {why}")
    return None


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


def on_success_window(state: PairState, *, now: float, aimd: Aimd = Aimd()) -> None:
    """A window of successful deliveries: recover additively, up to the rules' limit
    (not while a rule's lowering is in force)."""
    expire(state, now)
    if now < state.lowered_until or state.rate >= state.limit_rate:
        return
    state.rate = min(state.limit_rate, state.rate + aimd.increase * state.limit_rate)
    _note(state, now, f"rate {state.rate * 60:.1f}/min", "deliveries succeed")


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
