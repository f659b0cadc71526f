"""The words of the queue commands (postwarden.queue.describe): plain functions."""

from __future__ import annotations

from postwarden.queue.describe import one_line, shaping_wait, why


def test_one_line_keeps_answers_whole_or_cuts_between_words() -> None:
    assert one_line("250-2.0.0 ok\r\n250  2.0.0  queued\n") == "250-2.0.0 ok 250 2.0.0 queued"
    assert one_line("x" * 20, limit=10) == "x" * 20  # one long word: whole, never cut
    assert one_line("aaa bbb ccc ddd", limit=10) == "aaa bbb …"
    assert one_line("aaaaaaaaaaaa bbb", limit=10) == "aaaaaaaaaaaa …"  # past the limit
    assert one_line("aaa bbb", limit=7) == "aaa bbb"
    assert one_line(None) == ""


def test_shaping_waits_in_words() -> None:
    assert shaping_wait("message_rate: message rate") == "throttled (message rate limit)"
    assert shaping_wait("connection_limit: connection limit") == "throttled (connection limit)"
    assert shaping_wait("suspended: a: suspended (421 too fast)") == (
        "throttled (suspended by a response rule): a: suspended (421 too fast)"
    )
    assert shaping_wait("domain_warming_cap: domain warming cap reached: x.test") == (
        "sending domain's warming cap: domain warming cap reached: x.test"
    )
    assert shaping_wait("something_new: why") == "something new: why"


def test_why_a_wait_that_is_over_is_due() -> None:
    row = {"state": "queued", "held": 0, "next_attempt": 100.0,
           "wait_reason": "warming_cap: warming cap reached: a", "last_response": None}  # fmt: skip
    assert why(row, now=50.0).startswith("waiting for traffic shaping, warming cap")
    assert why(row, now=100.0) == "queued: due now"
    assert why({**row, "state": "active"}, now=50.0).startswith("active: being delivered")
