"""Reports written to hurt the parser: it must finish, whatever the text.

Anyone can send mail to the inbound MX, and parsing holds the worker's interpreter
(regular expressions keep the GIL). Each input here once took minutes to hours (a
pattern backtracking over a run of spaces, an address pattern letting "@" into the
local part, every candidate address rescanning the whole text). The limit below is no
performance target, only far beyond a linear parse (about a second here) and far below
what the old quadratic ones took."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

HEAD = (
    b"From: MAILER-DAEMON@x.example\r\nTo: a@b.example\r\n"
    b"Subject: Undelivered Mail Returned to Sender\r\nContent-Type: %s\r\n\r\n"
)
BODIES = {
    "spaces before a marker": (b"text/plain", b" " * 1_000_000 + b"x\r\n"),
    "lines of spaces": (b"text/plain", (b" " * 997 + b"x\r\n") * 1000),
    "at signs": (b"text/plain", b"a@" * 500_000 + b'"x\r\n'),
    "many addresses": (
        b"text/plain",
        b"".join(b"u%d@ex%d.com\r\n" % (i, i) for i in range(60_000)),
    ),
    "open tags": (b"text/html", b"<script" * 150_000),
    "angle brackets": (b"text/html", b"<" * 1_000_000),
    "unclosed pre": (b"text/html", b"<pre>" * 200_000),
    "a transcript without line ends": (b"text/plain", b">>> DATA" * 60_000),
}

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
