"""When a webhook delivery is tried again: exponential backoff with jitter, for more than
a day, then never (the outbox row is ``failed``; a replay sends it again)."""

from __future__ import annotations

import random

#: Seconds before try 2, 3, …: 5 s, 5 min, 30 min, 2 h, 5 h, then 10 h three times
#: (37.6 hours in all; 30 at the least with jitter): more than a day, spaced as Svix
#: spaces them.
SCHEDULE = (5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 36000.0, 36000.0)
#: Each delay moves by up to this fraction either way, so that the deliveries an
#: outage held back do not all come back in the same second.
JITTER = 0.2


def delay(attempts: int, rng: random.Random | None = None) -> float | None:
    """Seconds until the next try after ``attempts`` failed ones, or None: no more."""
    if attempts < 1 or attempts > len(SCHEDULE):
        return None
    base = SCHEDULE[attempts - 1]
    r = (rng or random).uniform(-JITTER, JITTER)
    return base * (1.0 + r)


def total() -> float:
    """The shortest time from the first try to the last (every jitter at its least)."""
    return sum(SCHEDULE) * (1.0 - JITTER)
