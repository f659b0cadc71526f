"""Pool balancing per site over a decaying window (issue 17, item 6): what a source
carried to one site does not hold it back at another, and old mail is forgotten
(a driven clock)."""

from __future__ import annotations

from collections import Counter

from postwarden.shaping.pools import HALF_LIFE, Balancer
from tests.shaping.test_choose import broker

MEMBERS = [("a", 3), ("b", 2), ("c", 1)]


def test_counts_halve_every_half_life_and_open_connections_count() -> None:
    bal = Balancer()
    bal.add("p", "gmail", "a", 100, 0.0)
    assert bal.sent("p", "gmail", "a", HALF_LIFE) == 50.0
    assert bal.sent("p", "gmail", "a", 2 * HALF_LIFE) == 25.0
    assert bal.sent("p", "yahoo", "a", 0.0) == 0.0  # per site
    assert bal.sent("q", "gmail", "a", 0.0) == 0.0  # per pool
    # An open connection counts as what connections of the pool carry to the site.
    bal.opened("p", "gmail", "b", 0.0)
    bal.closed("p", "gmail", "b", 10, 0.0)
    assert bal.per_conn[("p", "gmail")] == 0.9 * 1.0 + 0.1 * 10
    bal.opened("p", "gmail", "b", 0.0)
    assert bal.behind("p", "gmail", "b", 2, 0.0) == (10 + 1.9) / 2
    # What decayed to nothing is dropped; open connections are kept.
    bal.closed("p", "gmail", "b", 0, 0.0)
    bal.opened("p", "yahoo", "c", 0.0)
    bal.prune(40 * HALF_LIFE)
    assert set(bal.counts) == {("p", "yahoo", "c")}


def split(b, site: str, n: int) -> Counter[str]:  # type: ignore[no-untyped-def]
    got: Counter[str] = Counter()
    for _ in range(n):
        c = b.choose("w", "p", MEMBERS, "spill", site)
        assert c.ok
        b.release("w", "p", c.source, site, sent=4)
        got[c.source] += 4
    return got


def test_over_delivering_at_one_site_does_not_hold_a_source_back_at_another() -> None:
    b, _clock, book = broker()
    # c (weight 1) carries everything to "lab" while a and b are paused.
    book.pause("source:a", "by hand")
    book.pause("source:b", "by hand")
    assert split(b, "lab", 50) == {"c": 200}
    book.resume("source:a")
    book.resume("source:b")
    # At "gmail" at once (no time passes): the weights, 3:2:1 — lifetime counts per
    # pool gave c nothing here until a and b had caught up on 600 messages.
    assert split(b, "gmail", 60) == {"a": 120, "b": 80, "c": 40}
    # Back at "lab", c waits while a and b catch up...
    assert split(b, "lab", 30)["c"] == 0


def test_old_mail_is_forgotten() -> None:
    b, clock, book = broker()
    book.pause("source:a", "by hand")
    book.pause("source:b", "by hand")
    split(b, "lab", 50)  # c over-delivers by 200
    book.resume("source:a")
    book.resume("source:b")
    # Twenty half-lives later, that is forgotten: the weights from the first message.
    clock.t += 20 * HALF_LIFE
    assert split(b, "lab", 60) == {"a": 120, "b": 80, "c": 40}
