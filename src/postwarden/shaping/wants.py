"""Who waits for a connection slot at a site, and whom to tell (issue 17, item 3).

Workers share one broker, but each worker's sessions see only that worker's queues.
When a request for a connection is refused because the slots of the sources it
would use are all taken, the broker keeps a *want* (site, lane, those sources, who
asked) for a moment and tells the holders of connections to that site:

* their idle connections there, from a wanted source, close at once (the slot goes
  to whoever waits, instead of idling for ``delivery.timeouts.idle``);
* while a transactional (high-lane) want waits, their connections there end before
  their next bulk message, and bulk requests for a wanted source are refused, so
  transactional mail overtakes bulk across workers.

A want is also kept, for idle connections only, when the source furthest behind its
weighted share had no free slot and another source was given (the pool's weights
hold when an idle connection would otherwise keep the heavier source's slot).

When a slot at a wanted site is given back, the holders that want one there are
told to ask again at once. A want lapses ``WANT_TTL`` seconds after its last refusal
(a waiter asks again every quarter second) or when its holder gets a slot.

Pure: the clock is passed in; notices collect in :attr:`Wants.outbox` as
``(holder, message)`` for the broker's server (or the in-process backend) to send.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

HIGH, BULK = 0, 1  # lanes, as the scheduler numbers them (``Job.lane``)
WANT_TTL = 1.0  # seconds a want lasts after the refusal that made it
RETELL = 0.5  # seconds: a holder is told the same again after this (keeps it fresh)


@dataclass
class _Want:
    sources: frozenset[str]
    until: float


class Wants:
    def __init__(self) -> None:
        # site -> (holder, lane) -> want
        self.by_site: dict[str, dict[tuple[Any, int], _Want]] = {}
        # (site, holder) -> ((high sources, any sources), when told)
        self.told: dict[tuple[str, Any], tuple[tuple[frozenset[str], frozenset[str]], float]] = {}
        self.outbox: list[tuple[Any, dict[str, Any]]] = []

    def _live(self, site: str, now: float) -> dict[tuple[Any, int], _Want]:
        d = self.by_site.get(site)
        if not d:
            return {}
        for k in [k for k, w in d.items() if w.until <= now]:
            del d[k]
        if not d:
            del self.by_site[site]
        return d

    def want(self, holder: Any, site: str, lane: int, sources: Iterable[str], now: float) -> None:
        d = self.by_site.setdefault(site, {})
        key = (holder, HIGH if lane == HIGH else BULK)
        old = d.get(key)
        got = frozenset(sources)
        if old is not None and old.until > now:
            got |= old.sources
        d[key] = _Want(got, now + WANT_TTL)

    def granted(self, holder: Any, site: str, lane: int) -> None:
        """``holder`` got a slot at ``site`` for ``lane``: its wants of that lane and
        below are met."""
        d = self.by_site.get(site)
        if not d:
            return
        for lw in (HIGH, BULK) if lane == HIGH else (BULK,):
            d.pop((holder, lw), None)
        if not d:
            del self.by_site[site]

    def summary(self, site: str, now: float) -> tuple[frozenset[str], frozenset[str]]:
        """The sources wanted at ``site`` by transactional requests, and by any."""
        d = self._live(site, now)
        if not d:
            return frozenset(), frozenset()
        high = frozenset().union(*(w.sources for (_h, lane), w in d.items() if lane == HIGH))
        every = frozenset().union(*(w.sources for w in d.values()))
        return high, every

    def blocks(self, site: str, source: str, lane: int, now: float) -> bool:
        """Whether a bulk request for ``source`` at ``site`` waits: a transactional
        request wants that source there."""
        if lane == HIGH or site not in self.by_site:
            return False
        return any(
            lw == HIGH and source in w.sources for (_h, lw), w in self._live(site, now).items()
        )

    def tell(self, site: str, holders: Callable[[], Iterable[Any]], now: float) -> None:
        """Tell the holders of connections to ``site`` (``holders()``), and those told
        before, what is wanted there now (an empty message: nothing any more)."""
        state = self.summary(site, now)
        before = [h for (s, h) in self.told if s == site]
        if not state[1] and not before:
            return
        targets = dict.fromkeys([*before, *(holders() if state[1] else ())])
        for h in targets:
            last = self.told.get((site, h))
            if last is not None and last[0] == state and now - last[1] < RETELL:
                continue
            if state[1]:
                self.told[(site, h)] = (state, now)
            else:
                self.told.pop((site, h), None)
            high, every = state
            msg = {"push": "wanted", "site": site, "high": sorted(high), "any": sorted(every)}
            self.outbox.append((h, msg))

    def freed(self, site: str, now: float) -> None:
        """A slot at ``site`` was given back: who wants one there asks again now."""
        d = self._live(site, now)
        for h in dict.fromkeys(h for (h, _lane) in d):
            self.outbox.append((h, {"push": "freed", "site": site}))

    def drop(self, holder: Any) -> None:
        for site, d in list(self.by_site.items()):
            for k in [k for k in d if k[0] is holder]:
                del d[k]
            if not d:
                del self.by_site[site]
        for k in [k for k in self.told if k[1] is holder]:
            del self.told[k]

    def take_outbox(self) -> list[tuple[Any, dict[str, Any]]]:
        out, self.outbox = self.outbox, []
        return out


def deliver(notices: list[tuple[Any, dict[str, Any]]]) -> None:
    """Hand each notice to its holder (one with a ``push`` method; others, such as
    tests' plain holders, hear nothing)."""
    for holder, msg in notices:
        push = getattr(holder, "push", None)
        if push is not None:
            push(msg)
