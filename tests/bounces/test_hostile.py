"""Reports written to hurt the parser: it must finish, whatever the text, and its cost
must grow with the size of the text, not with its square.

Anyone can send mail to the inbound MX, and parsing holds the worker's interpreter
(regular expressions keep the GIL). Each input here once took minutes to hours (a
pattern backtracking over a run of spaces, an address pattern letting "@" into the
local part, every candidate address rescanning the whole text). The subprocess
timeout below is no performance target, only far beyond a linear parse (about a
second here) and far below what the old quadratic ones took.

The growth test times no absolute figure: it parses the same hostile shape at two
sizes, ten times apart, in one process and compares the two CPU times (the
``time.process_time`` of that process, so other processes on a busy machine do not
count; the best of several rounds, each long enough for the clock, with the garbage
collector off). A linear parse gives a ratio near 10 (less, with the fixed cost of a
message), a quadratic one near 100; the bound of 30 is three times what linear needs,
so neither a slow nor a loaded machine moves the ratio there, while a regression to
quadratic (a 10x slowdown at this size, growing with it) fails it. Both sizes stay
under the parser's text cap (``MAX_TEXT``), which would otherwise flatten the big one.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

HEAD = (
    b"From: MAILER-DAEMON@x.example\r\nTo: a@b.example\r\n"
    b"Subject: Undelivered Mail Returned to Sender\r\nContent-Type: %s\r\n\r\n"
)
# Each hostile shape at scale k (a count of its repeated unit), and the k it is read
# at whole by the first test.
SHAPES: dict[str, tuple[bytes, Callable[[int], bytes], int]] = {
    "spaces before a marker": (b"text/plain", lambda k: b" " * k + b"x\r\n", 1_000_000),
    "lines of spaces": (b"text/plain", lambda k: (b" " * 997 + b"x\r\n") * k, 1000),
    "at signs": (b"text/plain", lambda k: b"a@" * k + b'"x\r\n', 500_000),
    "many addresses": (
        b"text/plain",
        lambda k: b"".join(b"u%d@ex%d.com\r\n" % (i, i) for i in range(k)),
        60_000,
    ),
    "open tags": (b"text/html", lambda k: b"<script" * k, 150_000),
    "angle brackets": (b"text/html", lambda k: b"<" * k, 1_000_000),
    "unclosed pre": (b"text/html", lambda k: b"<pre>" * k, 200_000),
    "a transcript without line ends": (b"text/plain", lambda k: b">>> DATA" * k, 60_000),
}
BODIES = {name: (ctype, make(k)) for name, (ctype, make, k) in SHAPES.items()}

RUN = """
import sys
from postwarden.bounces.parse import Parser
report = Parser().parse_bytes(open(sys.argv[1], "rb").read())
print(report.kind, len(report.findings))
"""


@pytest.mark.parametrize("name", sorted(BODIES))
def test_hostile_reports_are_read_to_the_end(name: str, tmp_path: Path) -> None:
    ctype, body = BODIES[name]
    path = tmp_path / "report.eml"
    path.write_bytes(HEAD % ctype + body)
    done = subprocess.run(
        [sys.executable, "-c", RUN, str(path)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    kind, findings = done.stdout.split()
    assert kind in ("text", "none", "dsn")
    assert int(findings) <= 200  # at most MAX_RECIPIENTS from one report


GROWTH = """
import gc, sys, time
from postwarden.bounces.parse import Parser
small, big = (open(p, "rb").read() for p in sys.argv[1:3])

def cpu(data, reps):
    # The least of reps rounds, each of enough parses to take 20 ms; the garbage
    # collector off (when it runs depends on the heap, not on the parser).
    n, best = 1, float("inf")
    gc.disable()
    while reps > 0:
        t = time.process_time()
        for _ in range(n):
            Parser().parse_bytes(data)
        took = time.process_time() - t
        if took < 0.02:
            n *= 2
            continue
        best = min(best, took / n)
        reps -= 1
    gc.enable()
    return best

cpu(small, 1)  # warm up: imports, compiled patterns
print(cpu(small, 5), cpu(big, 3))
"""
# The larger of the two sizes, in bytes: under MAX_TEXT (500 000 characters).
GROWTH_BYTES = 300_000
MAX_GROWTH = 30.0  # for ten times the input; linear is about 10, quadratic 100


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_hostile_reports_cost_grows_linearly(name: str, tmp_path: Path) -> None:
    ctype, make, whole = SHAPES[name]
    k_big = max(10, whole * GROWTH_BYTES // len(make(whole)) // 10 * 10)
    small, big = tmp_path / "small.eml", tmp_path / "big.eml"
    small.write_bytes(HEAD % ctype + make(k_big // 10))
    big.write_bytes(HEAD % ctype + make(k_big))
    done = subprocess.run(
        [sys.executable, "-c", GROWTH, str(small), str(big)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    t_small, t_big = (float(x) for x in done.stdout.split())
    ratio = t_big / t_small
    assert ratio < MAX_GROWTH, (
        f"{name}: {big.stat().st_size} bytes cost {ratio:.1f}x the CPU of a tenth of "
        f"them ({t_big:.3f} s vs {t_small:.3f} s): the parse grows faster than linearly"
    )
