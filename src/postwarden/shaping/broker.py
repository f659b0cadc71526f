"""The shaping broker (docs/decisions/0006): every (source, site) budget in one place.

Workers (holders) ask for a connection slot before connecting and give it back after;
they take message tokens in batches; they report each answer. The broker applies the
rules file's limits, the response rules and AIMD (``shaping.adaptive``) and says no —
with a reason and a time to come back — when a pair is suspended or out of budget.
The clock is passed in, so tests drive time. This module is the in-process core; the
supervisor serves it to workers over a socket.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import math
import random
import secrets
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from postwarden.shaping.adaptive import (
    DEFAULT_AIMD,
    UNLIMITED,
    Aimd,
    PairState,
    ResponseRule,
    connect_at,
    expire,
    in_backoff,
    normal_at,
    observed_rate,
    on_answer,
    on_success,
    recover,
)
from postwarden.shaping.buckets import Bucket, PacedBucket
from postwarden.shaping.grants import Choice, Grant
from postwarden.shaping.pools import Balancer
from postwarden.shaping.rules import Limits, Rules
from postwarden.shaping.wants import BULK, HIGH, Wants

if TYPE_CHECKING:
    from postwarden.config import SourceConfig
    from postwarden.warming.book import WarmingBook

log = logging.getLogger("postwarden.shaping")

UNLIMITED_RATE = UNLIMITED  # messages/s when the rules set none
SUCCESS_WINDOW = DEFAULT_AIMD.window  # seconds without push-back before AIMD adds back
CHANGE_LOG_SIZE = 2000  # changes the broker keeps for readers (the oldest dropped first)
RATE_STEP = 1.10  # an increase is a change once the rate is 10 % above the last recorded


def _per_min(rate: float) -> float | None:
    """A rate (messages/s) per minute for the change log; None: no rate limit."""
    return None if rate >= UNLIMITED_RATE else round(rate * 60, 1)


@functools.lru_cache(maxsize=256)
def pair_aimd(base: Aimd, limits: Limits) -> Aimd:
    """The AIMD settings of a pair: ``base`` with the rules' backoff keys on top."""
    given = limits.backoff
    return dataclasses.replace(base, **given) if given else base


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
    bounce_until: float = 0.0
    bounce_reason: str = ""
    # A transactional connection waits for tokens until then: bulk ones wait too.
    high_wait_until: float = 0.0
    # The change log's view of the rate (Broker.note_rate): the rate in force when it
    # last looked, and the rate its last recorded change left.
    seen_rate: float = 0.0
    logged_rate: float = 0.0

    @property
    def in_use(self) -> int:
        return sum(self.slots.values())


class Broker:
    def __init__(
        self,
        rules: Rules,
        response_rules: Sequence[ResponseRule] | None = None,
        *,
        aimd: Aimd = DEFAULT_AIMD,
        clock: Callable[[], float] = time.monotonic,
        sources: Mapping[str, SourceConfig] | None = None,
        book: WarmingBook | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.rules = rules
        self.response_rules = rules.responses if response_rules is None else response_rules
        self.aimd = aimd
        self.clock = clock
        self.sources: Mapping[str, SourceConfig] = sources or {}
        self.book = book
        self.rng = rng or random.Random()
        self.pairs: dict[tuple[str, str, str | None], Pair] = {}
        # Per (pool, site, source), decaying: messages sent, connections open; the
        # weighted choice gives each source its share of the pool's mail to a site.
        self.balancer = Balancer()
        # Provider budgets (rules: provider_max_message_rate), by the pairs' site label.
        self.providers: dict[str, Bucket] = {}
        self.pause_recheck = 60.0  # seconds: when mail held by a pause asks again
        self.actions: list[dict[str, Any]] = []  # recent rule actions, newest last
        self.action_count = 0  # ever taken
        # The change log (actions and rate changes, for readers such as the control
        # plane's rollups): ``seq`` counts up from 1 within this ``epoch``, which a
        # restarted broker draws anew.
        self.epoch = secrets.token_hex(8)
        self.seq = 0
        self.changes: deque[dict[str, Any]] = deque(maxlen=CHANGE_LOG_SIZE)
        # Who waits for a slot at a site, and the notices for holders (shaping.wants).
        self.wants = Wants()

    def reconfigure(
        self,
        rules: Rules,
        response_rules: Sequence[ResponseRule] | None = None,
        sources: Mapping[str, SourceConfig] | None = None,
    ) -> None:
        """New rules: pairs are rebuilt from them (slots, suspensions and lowered rates
        kept: what a provider said still holds)."""
        self.rules = rules
        self.response_rules = rules.responses if response_rules is None else response_rules
        if sources is not None:
            self.sources = sources
        for key, old in list(self.pairs.items()):
            new = self._make(*key)
            new.slots = old.slots
            new.bounce_until, new.bounce_reason = old.bounce_until, old.bounce_reason
            st, o = new.state, old.state
            st.suspended_until, st.lowered_until, st.reason = (
                o.suspended_until,
                o.lowered_until,
                o.reason,
            )
            # What answers lowered stays lowered (within the new limits); the rest
            # takes the new limits.
            if o.rate < o.limit_rate:
                st.rate = min(o.rate, st.limit_rate)
            if o.connections < o.limit_connections:
                st.connections = min(o.connections, st.limit_connections)
            st.changes = o.changes
            # A backoff in force stays (with its pacing), and so does what was seen.
            for f in (
                "backoff_since",
                "pushback_at",
                "last_increase",
                "last_decrease",
                "last_connect",
                "seen_start",
                "seen_count",
                "seen_prev",
            ):
                setattr(st, f, getattr(o, f))
            self.pairs[key] = new
            # New limits can move the rate in force: a change like any other.
            new.seen_rate, new.logged_rate = old.seen_rate, old.logged_rate
            self.note_rate(new, self.clock(), "rules reloaded")

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
        state = PairState(limit_rate=rate, limit_connections=conns, seen_start=now)
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
            PacedBucket(rate, burst, burst, now),
            connects,
            last_success_window=now,
            seen_rate=state.rate,
            logged_rate=state.rate,
        )

    def pair(self, source: str, site: str, domain: str | None = None) -> Pair:
        key = self._key(source, site, domain)
        p = self.pairs.get(key)
        if p is None:
            p = self.pairs[key] = self._make(*key)
        return p

    # ------------------------------------------------------------------ leases

    def aimd_of(self, p: Pair) -> Aimd:
        return pair_aimd(self.aimd, p.limits)

    def _slot(self, p: Pair, holder: Any, now: float) -> Grant:
        """A connection slot on the pair, within its connection limit and rate, and
        paced while the pair is in backoff (one per retry interval at the floor)."""
        if p.in_use >= min(p.state.connections, p.state.limit_connections):
            return Grant(
                False, reason="connection limit", retry_at=now + 0.25, kind="connection_limit"
            )
        aimd = self.aimd_of(p)
        at = connect_at(p.state, now, aimd)
        self.note_rate(p, now)
        if at > now:
            return Grant(
                False,
                reason=f"connection pacing in backoff ({p.state.reason})"[:300],
                retry_at=min(at, normal_at(p.state, aimd)),
                kind="connection_rate",
            )
        if p.connects is not None and p.connects.take(now, 1) < 1:
            return Grant(
                False,
                reason="connection rate",
                retry_at=now + p.connects.wait(),
                kind="connection_rate",
            )
        cap = p.limits.provider_connection_limit
        if cap is not None and self._provider_in_use(p.site) >= cap:
            return Grant(
                False,
                reason=f"provider connection limit ({cap}, every source)",
                retry_at=now + 0.25,
                kind="connection_limit",
            )
        p.slots[holder] = p.slots.get(holder, 0) + 1
        p.state.last_connect = now
        return Grant(True)

    def _provider_in_use(self, site: str) -> int:
        """Connections open to a site from every source (counted when asked: only
        sites with a provider limit ask, and a worker's death frees its slots without
        a count to keep right)."""
        return sum(q.in_use for q in self.pairs.values() if q.site == site)

    def _provider_bucket(self, p: Pair, now: float) -> Bucket | None:
        """The site's message budget across every source, when the rules give one."""
        rate = p.limits.provider_max_message_rate
        if rate is None:
            self.providers.pop(p.site, None)
            return None
        b = self.providers.get(p.site)
        if b is None or b.rate != rate.per_second:
            r = rate.per_second
            b = self.providers[p.site] = Bucket(r, max(1.0, r), max(1.0, r), now)
        return b

    def release_connection(
        self, holder: Any, source: str, site: str, domain: str | None = None
    ) -> None:
        p = self.pair(source, site, domain)
        n = p.slots.get(holder, 0) - 1
        if n > 0:
            p.slots[holder] = n
        else:
            p.slots.pop(holder, None)

    # ------------------------------------------------------------------ sources

    def _wall_to_clock(self, wall_at: float) -> float:
        assert self.book is not None
        return self.clock() + max(0.0, wall_at - self.book.wall())

    def _metered(self, p: Pair, warming: bool) -> bool:
        return (
            warming
            or p.limits.max_message_rate is not None
            or p.limits.provider_max_message_rate is not None
            or p.state.rate < p.state.limit_rate
            or in_backoff(p.state)
        )

    def choose(
        self,
        holder: Any,
        pool: str,
        members: Sequence[tuple[str, int]],
        overflow: str,
        site: str,
        domain: str | None = None,
        want: int = 1,
        queued: int = 0,
        lane: int = HIGH,
    ) -> Choice:
        """A source of the pool for a connection to ``site`` (and a slot on it).

        Sources paused (by config or warming), suspended for the site, or under a
        bounce rule are passed over. The one chosen is the one furthest behind its
        weighted share of the pool's messages. A warming source at today's cap is
        passed over with overflow "spill"; with "wait" its share waits (``defer``):
        its weight's part of the ``queued`` messages (those queued for the
        destination, ``want`` when not given), the others carrying the rest.

        ``lane``: the connection's first message's (``HIGH``, transactional, or
        ``BULK``). A bulk request passes over a source a transactional request waits
        for; who waits for a slot is told to the holders of connections to the site
        (``shaping.wants``).
        """
        now = self.clock()
        book = self.book
        cands: list[tuple[str, int, Pair]] = []
        retry = math.inf
        why: list[str] = []
        kinds: set[str] = set()
        bounce = ""
        for name, weight in members:
            src = self.sources.get(name)
            if src is None:
                why.append(f"{name}: no such source")
                continue
            if src.state == "paused":
                why.append(f"{name}: paused in the configuration")
                kinds.add("paused")
                retry = min(retry, now + self.pause_recheck)
                continue
            paused = book.is_paused(f"source:{name}") if book else ""
            if paused:
                why.append(f"{name}: paused ({paused})")
                kinds.add("paused")
                retry = min(retry, now + self.pause_recheck)
                continue
            p = self.pair(name, site, domain)
            expire(p.state, now)
            if now < p.bounce_until:
                bounce = bounce or p.bounce_reason
                continue
            if now < p.state.suspended_until:
                retry = min(retry, p.state.suspended_until)
                why.append(f"{name}: suspended ({p.state.reason})")
                kinds.add("suspended")
                continue
            cands.append((name, weight, p))
        if not cands:
            if bounce and not why:
                return Choice(False, reason=f"bounce rule: {bounce}", bounce=bounce, kind="bounce")
            reason = "; ".join(why) or "no source"
            kind = next((k for k in ("suspended", "paused") if k in kinds), "no_source")
            return Choice(
                False, reason=reason, kind=kind, retry_at=retry if retry < math.inf else now + 300.0
            )
        room = {
            name: (book.remaining(f"source:{name}", site) if book else None)
            for name, _w, _p in cands
        }
        if overflow == "spill":
            full = [c for c in cands if room[c[0]] == 0]
            cands = [c for c in cands if room[c[0]] != 0]
            if not cands:
                assert book is not None
                nxt = min(book.next_day_at(f"source:{n}") for n, _w, _p in full)
                return Choice(
                    False,
                    reason="warming cap reached on every source of the pool",
                    retry_at=self._wall_to_clock(nxt),
                    kind="warming_cap",
                )
        bal = self.balancer

        def behind(c: tuple[str, int, Pair]) -> tuple[float, float]:
            return (bal.behind(pool, site, c[0], c[1], now), self.rng.random())

        cands.sort(key=behind)
        first = cands[0][0]
        if room[first] == 0:  # overflow "wait": this source's share waits for its next day
            assert book is not None
            total = sum(max(0, w) for _n, w, _p in cands) or 1
            share = max(1, math.ceil(max(queued, want) * max(0, cands[0][1]) / total))
            self.balancer.add(pool, site, first, share, now)
            return Choice(
                False,
                reason=f"warming cap reached: {first}",
                kind="warming_cap",
                defer=share,
                retry_at=self._wall_to_clock(book.next_day_at(f"source:{first}")),
            )
        refused: Grant | None = None
        busy: list[str] = []  # sources passed over for want of a free slot
        lead = math.inf  # the first busy source's place: the others may not pass it far
        wants = self.wants
        for name, w, p in cands:
            if room[name] == 0:
                continue
            if busy and not bal.within(pool, site, name, w, lead, now):
                slot = Grant(
                    False,
                    reason=f"{name} is at its share; {busy[0]} has no free slot",
                    retry_at=now + 0.25,
                    kind="connection_limit",
                )
            elif wants.blocks(site, name, lane, now):
                slot = Grant(
                    False,
                    reason=f"transactional mail waits for a connection from {name}",
                    retry_at=now + 0.25,
                    kind="connection_limit",
                )
            else:
                slot = self._slot(p, holder, now)
            if not slot.ok:
                if refused is None or slot.retry_at < refused.retry_at:
                    refused = slot
                if slot.kind == "connection_limit":
                    if not busy:
                        lead = bal.behind(pool, site, name, w, now)
                    busy.append(name)
                continue
            self.balancer.opened(pool, site, name, now)
            metered = self._metered(p, room[name] is not None)
            tokens = 0
            if metered and not (lane != HIGH and now < p.high_wait_until):
                tokens = self._tokens(p, name, site, want, room[name], now)
            wants.granted(holder, site, lane)
            if busy:  # the sources before it in the order: their idle connections give way
                wants.want(holder, site, BULK, busy, now)
            if busy or site in wants.by_site or wants.told:
                wants.tell(site, lambda: self._holders_at(site), now)
            return Choice(True, name, tokens, metered, p.limits.max_messages_per_connection or 0)
        assert refused is not None
        if busy and refused.kind == "connection_limit":
            wants.want(holder, site, lane, busy, now)
            wants.tell(site, lambda: self._holders_at(site), now)
        return Choice(False, reason=refused.reason, retry_at=refused.retry_at, kind=refused.kind)

    def _holders_at(self, site: str) -> list[Any]:
        """Who holds connections to ``site`` (any source, any domain of it)."""
        prefix = site + "/"
        return [
            h
            for p in self.pairs.values()
            if p.slots and (p.site == site or p.site.startswith(prefix))
            for h in p.slots
        ]

    def _tokens(
        self, p: Pair, source: str, site: str, want: int, room: int | None, now: float
    ) -> int:
        aimd = self.aimd_of(p)
        recover(p.state, now, aimd)
        self.note_rate(p, now)
        bucket = p.messages
        if bucket.rate != p.state.rate:  # AIMD moved the rate
            bucket.refill(now)
            if p.state.rate > bucket.rate:  # up: the next message need not wait
                bucket.tokens = max(bucket.tokens, 1.0)
            bucket.rate = p.state.rate
            bucket.burst = max(1.0, p.state.rate)
            bucket.tokens = min(bucket.tokens, bucket.burst)
        if isinstance(bucket, PacedBucket):
            bucket.ready_at = normal_at(p.state, aimd)
        if room is not None:
            want = min(want, room)
        n = bucket.take(now, want)
        provider = self._provider_bucket(p, now)
        if n and provider is not None:
            got = provider.take(now, n)
            bucket.tokens += n - got  # the pair's own, not used after all
            n = got
        if n and room is not None and self.book is not None:
            self.book.charge(f"source:{source}", n, site)
        return n

    def release(
        self,
        holder: Any,
        pool: str,
        source: str,
        site: str,
        domain: str | None = None,
        sent: int = 0,
        unused: int = 0,
    ) -> None:
        """A connection ended after ``sent`` messages; ``unused`` tokens come back."""
        self.release_connection(holder, source, site, domain)
        if site in self.wants.by_site:
            self.wants.freed(site, self.clock())
        self.balancer.closed(pool, site, source, sent, self.clock())
        if unused and self.book is not None:
            self.book.refund(f"source:{source}", unused, site)

    def take(
        self,
        holder: Any,
        source: str,
        site: str,
        want: int,
        domain: str | None = None,
        sending_domain: str | None = None,
        lane: int = HIGH,
    ) -> Grant:
        """Message tokens for a connection: the pair's rate, the source's and the
        sending domain's warming caps (a domain at its cap: ``reason`` starts with
        "domain"). While a transactional (``lane`` HIGH) connection waits for the
        pair's tokens, bulk ones wait behind it."""
        now = self.clock()
        p = self.pair(source, site, domain)
        if (no := self._suspension(p, now)) is not None:
            return no
        if lane != HIGH and now < p.high_wait_until:
            return Grant(
                False,
                reason="message rate (transactional mail first)",
                retry_at=p.high_wait_until,
                kind="message_rate",
            )
        book = self.book
        room = book.remaining(f"source:{source}", site) if book else None
        if room == 0 and book is not None and book.is_paused(f"source:{source}"):
            return Grant(
                False, reason=f"paused: {source}", retry_at=now + self.pause_recheck, kind="paused"
            )
        if room == 0:
            assert book is not None
            return Grant(
                False,
                reason=f"warming cap reached: {source}",
                retry_at=self._wall_to_clock(book.next_day_at(f"source:{source}")),
                kind="warming_cap",
            )
        if sending_domain and book is not None:
            dkey = f"domain:{sending_domain.lower()}"
            droom = book.remaining(dkey, site)
            if droom == 0 and book.is_paused(dkey):
                return Grant(
                    False,
                    reason=f"domain paused: {sending_domain}",
                    retry_at=now + self.pause_recheck,
                    kind="domain_paused",
                )
            if droom == 0:
                return Grant(
                    False,
                    reason=f"domain warming cap reached: {sending_domain}",
                    retry_at=self._wall_to_clock(book.next_day_at(dkey)),
                    kind="domain_warming_cap",
                )
            if droom is not None:
                want = min(want, droom)
        n = self._tokens(p, source, site, want, room, now)
        if n < 1:
            provider = self.providers.get(p.site)
            wait = max(p.messages.wait(), provider.wait() if provider is not None else 0.0)
            if lane == HIGH:
                p.high_wait_until = max(p.high_wait_until, now + wait + 0.05)
            return Grant(False, reason="message rate", retry_at=now + wait, kind="message_rate")
        if sending_domain and book is not None:
            book.charge(f"domain:{sending_domain.lower()}", n, site)
        return Grant(True, tokens=n)

    def refusal(self, source: str, site: str, domain: str | None = None) -> Grant:
        """Whether the source is refused for the site now, for longer than a message's
        wait: paused, suspended there, under a bounce rule, or at today's cap (not a
        rate or a slot, which come back within moments). ``ok`` when it is not: what
        a connection refused from it carried may then go from it again."""
        now = self.clock()
        src = self.sources.get(source)
        book = self.book
        paused = "paused in the configuration" if src is not None and src.state == "paused" else ""
        paused = paused or (book.is_paused(f"source:{source}") if book else "")
        if paused:
            return Grant(
                False,
                reason=f"paused: {source} ({paused})",
                retry_at=now + self.pause_recheck,
                kind="paused",
            )
        p = self.pair(source, site, domain)
        if (no := self._suspension(p, now)) is not None:
            return no
        if now < p.bounce_until:
            return Grant(False, reason=f"bounce rule: {p.bounce_reason}", kind="bounce")
        if book is not None and book.remaining(f"source:{source}", site) == 0:
            return Grant(
                False,
                reason=f"warming cap reached: {source}",
                retry_at=self._wall_to_clock(book.next_day_at(f"source:{source}")),
                kind="warming_cap",
            )
        return Grant(True)

    @staticmethod
    def _suspension(p: Pair, now: float) -> Grant | None:
        """The refusal of a pair suspended now (a suspension run out ends here)."""
        expire(p.state, now)
        if now < p.state.suspended_until:
            return Grant(
                False,
                reason=f"suspended: {p.state.reason}",
                retry_at=p.state.suspended_until,
                kind="suspended",
            )
        return None

    def warming_domains(self) -> list[str]:
        """Sending domains whose mail takes tokens (warming or paused)."""
        if self.book is None:
            return []
        keys = [*self.book.trackers, *self.book.paused]
        return sorted({k.split(":", 1)[1] for k in keys if k.startswith("domain:")})

    def drop_holder(self, holder: Any) -> None:
        """A worker went away: its slots are free again, its wants gone."""
        for p in self.pairs.values():
            p.slots.pop(holder, None)
        self.wants.drop(holder)

    # ------------------------------------------------------------------ answers

    def report(
        self,
        source: str,
        site: str,
        code: int,
        enhanced: str = "",
        text: str = "",
        domain: str | None = None,
        *,
        sending_domain: str | None = None,
        delivered: int = 0,
        bounced: int = 0,
        deferred: int = 0,
        throttled: int = 0,
        adaptive: bool = True,
    ) -> ResponseRule | None:
        """One delivery answer for the pair: rules, AIMD and recovery applied; the
        recipients' outcomes counted for the source's and the sending domain's health.

        ``throttled``: recipients deferred by an answer about pace (a refused
        connection or greeting, a 421): counted on their own, never as attempted and
        failed (a provider slowing a sender down says nothing of its list). A rule
        already holding the pair (the same rule, still in force) is not taken again
        as a new action."""
        now = self.clock()
        p = self.pair(source, site, domain)
        if self.book is not None and (delivered or bounced or deferred or throttled):
            keys = [f"source:{source}"]
            if sending_domain:
                keys.append(f"domain:{sending_domain.lower()}")
            counts = {
                "attempted": delivered + bounced + deferred,
                "delivered": delivered,
                "bounced": bounced,
                "deferred": deferred,
                "throttled": throttled,
            }
            for key in keys:
                self.book.outcomes(key, counts)
        before = p.state.rate
        aimd = self.aimd_of(p)
        hit = on_answer(
            p.state,
            now=now,
            site=site,
            code=code,
            enhanced=enhanced,
            text=text,
            rules=self.response_rules,
            aimd=aimd,
            adaptive=adaptive,
        )
        if hit is not None and self._holding(source, p.site, hit.name, now):
            # Answers to connections already under way when the rule fired (a burst
            # of refused greetings): one event, logged once.
            if hit.action == "bounce":
                p.bounce_until = max(p.bounce_until, now + hit.duration)
        elif hit is not None:
            if hit.action == "bounce":
                p.bounce_until = max(p.bounce_until, now + hit.duration)
                p.bounce_reason = f"{code} {enhanced} {text}".strip()[:200]
            self.actions.append(
                {
                    "at": now,
                    "source": source,
                    "site": p.site,
                    "rule": hit.name,
                    "action": hit.action,
                    "duration": hit.duration,
                    "answer": f"{code} {enhanced} {text}".strip()[:200],
                }
            )
            del self.actions[:-100]
            self.action_count += 1
            self._log_change(
                now,
                source,
                p.site,
                "action",
                rule=hit.name,
                action=hit.action,
                duration=hit.duration,
                answer=f"{code} {enhanced} {text}".strip()[:200],
            )
            log.warning(
                "event=shaping_action source=%s site=%s rule=%s action=%s for=%.0fs",
                source,
                p.site,
                hit.name,
                hit.action,
                hit.duration,
            )
        elif 200 <= code < 300:
            # Counted for the observed rate; the rate climbs back once a window has
            # passed without push-back.
            p.successes += 1
            on_success(p.state, now=now, aimd=aimd)
        if p.state.rate != before:
            log.info(
                "event=shaping_rate source=%s site=%s rate_per_min=%.1f reason=%r",
                source,
                p.site,
                p.state.rate * 60,
                p.state.reason,
            )
        self.note_rate(p, now)
        return hit

    # ------------------------------------------------------------------ change log

    def note_rate(self, p: Pair, now: float, reason: str | None = None) -> None:
        """Record the pair's rate in force in the change log if it moved by a step that
        matters (``kind`` "rate"). Called wherever the broker lets AIMD move a rate.

        The rule: **every decrease** is recorded (``rate_before`` the rate just
        before it). An increase is recorded only once the rate is at least
        ``RATE_STEP`` (10 %) above the rate the pair's last recorded change left,
        or has reached the rules' limit (the ceiling); ``rate_before`` is then that
        last recorded rate, the small increases between summed into one change.
        Rates are per minute, one decimal; ``None`` is "no rate limit" (a site the
        rules give no rate, at its ceiling). ``reason``: the state's last reason
        when not given."""
        rate, seen = p.state.rate, p.seen_rate
        if rate == seen:
            return
        p.seen_rate = rate
        if rate < seen:
            direction, before = "down", seen
        elif rate > p.logged_rate and (
            rate >= p.logged_rate * RATE_STEP or rate >= p.state.limit_rate
        ):
            direction, before = "up", p.logged_rate
        else:
            return
        p.logged_rate = rate
        self._log_change(
            now,
            p.source,
            p.site,
            "rate",
            rate_before=_per_min(before),
            rate_after=_per_min(rate),
            direction=direction,
            reason=(p.state.reason if reason is None else reason)[:200],
        )

    def settle_rates(self) -> None:
        """Take every pair's rate in force as it is, recording nothing (after state
        restored from a file: no change happened in this broker's life)."""
        for p in self.pairs.values():
            p.seen_rate = p.logged_rate = p.state.rate

    def _log_change(self, now: float, source: str, site: str, kind: str, **what: Any) -> None:
        self.seq += 1
        at = self.wall() - max(0.0, self.clock() - now)  # the broker's clock to wall time
        entry = {"seq": self.seq, "at": at, "source": source, "site": site, "kind": kind}
        self.changes.append({**entry, **what})

    def changes_after(self, after: int, limit: int) -> tuple[list[dict[str, Any]], bool]:
        """Up to ``limit`` changes with ``seq`` above ``after``, oldest first (copies),
        and whether some above ``after`` were already dropped from the log."""
        if not self.changes:
            return [], False
        first = self.changes[0]["seq"]  # seqs in the log run on without holes
        start = max(0, after + 1 - first)
        out = [dict(c) for c in itertools.islice(self.changes, start, start + max(0, limit))]
        return out, after + 1 < first

    def _holding(self, source: str, site: str, rule: str, now: float) -> bool:
        """Whether ``rule`` already acts on the pair (an action of it still in force)."""
        for a in reversed(self.actions):
            if a["source"] == source and a["site"] == site and a["rule"] == rule:
                return bool(a["at"] + a["duration"] > now)
        return False

    def status(self) -> list[dict[str, Any]]:
        now = self.clock()
        out = []
        for p in self.pairs.values():
            expire(p.state, now)
            aimd = self.aimd_of(p)
            recover(p.state, now, aimd)
            self.note_rate(p, now)
            backoff = in_backoff(p.state)
            out.append(
                {
                    "source": p.source,
                    "site": p.site,
                    # False: no rate from the rules and none the answers imposed
                    "rate_limited": self._metered(p, False),
                    "rate_per_min": round(p.state.rate * 60, 2),
                    "limit_per_min": round(p.state.limit_rate * 60, 2),
                    "connections": p.in_use,
                    "connection_limit": p.state.connections,
                    "suspended_for": round(max(0.0, p.state.suspended_until - now), 1),
                    "bouncing_for": round(max(0.0, p.bounce_until - now), 1),
                    # In backoff (a deferral spoke of pace): connections paced, and
                    # the full rate back after this many seconds without push-back.
                    "backoff": backoff,
                    "backoff_normal_in": (
                        round(max(0.0, normal_at(p.state, aimd) - now), 1) if backoff else 0.0
                    ),
                    "observed_per_min": round(observed_rate(p.state, now) * 60, 2),
                    "reason": p.state.reason,
                    "changes": [
                        {"ago": round(now - t, 1), "what": what, "why": why}
                        for t, what, why in p.state.changes[-10:]
                    ],
                }
            )
        return out

    def wall(self) -> float:
        """Wall-clock seconds now (the warming book's calendar when there is one)."""
        return self.book.wall() if self.book is not None else time.time()
