"""The retry policy grows, caps, jitters and expires as documented."""

import random

from postwarden.queue.retry import RetryPolicy


def test_backoff_grows_and_caps_without_jitter() -> None:
    p = RetryPolicy(initial=60, factor=2, maximum=600, jitter=0, max_age=86400)
    assert [p.delay(n) for n in range(1, 7)] == [60, 120, 240, 480, 600, 600]
    assert p.delay(10_000) == 600


def test_jitter_stays_within_bounds_and_varies() -> None:
    p = RetryPolicy(initial=100, factor=1, maximum=100, jitter=0.2)
    rng = random.Random(7)
    delays = [p.delay(1, rng) for _ in range(500)]
    assert min(delays) >= 80 and max(delays) <= 120
    assert len({round(d, 3) for d in delays}) > 100


def test_expiry_and_cap_at_max_age() -> None:
    p = RetryPolicy(initial=3600, factor=2, maximum=7200, jitter=0, max_age=5000)
    assert p.after_temporary_failure(1, created_at=0, now=10) == ("deferred", 3610)
    # The next try is pulled in to the expiry time rather than scheduled past it.
    assert p.after_temporary_failure(2, created_at=0, now=3610) == ("deferred", 5000)
    assert p.after_temporary_failure(3, created_at=0, now=5000) == ("expired", 0.0)
