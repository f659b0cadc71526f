"""How long reading an HTML bounce takes, per megabyte (not a test).

Times ``html_to_text`` (the text an HTML part shows, ``bounces/parse/htmltext.py``) on
1 MB and 2 MB of ordinary HTML (an Exchange-style explanation, repeated) and of hostile
shapes (nested tags never closed, ``<pre>`` never closed, quotes left open, a text of
``<``, ``<a`` without ``>``, comments never closed), then ``Parser.parse_bytes`` on an
HTML-only bounce of each size. Prints the median milliseconds per megabyte of --reps
runs (each on its own input: no cache answers) and the ratio of the 2 MB time to the
1 MB one (2.0 is linear; 4.0 quadratic). A report reads at most ``MAX_HTML`` characters
of HTML, so ``parse_bytes`` gives a lower ratio where the HTML dominates.

To compare with another checkout's parser (one with ``htmltext.html_to_text``):

    PYTHONPATH=OTHER/src python bench/bounce_parse.py

    python bench/bounce_parse.py [--reps 3] [--only NAME]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

from postwarden.bounces.parse import Parser
from postwarden.bounces.parse.htmltext import html_to_text

MB = 1_000_000

EXCHANGE = """<html><head><style>p {{ margin: 0 }} .x {{ color: #333 }}</style></head>
<body><table width="100%" cellpadding="0"><tr><td style="padding:4px">
<p><b><font color="#000066" size="3">Delivery has failed to these recipients or groups:</font>
</b></p><p><a href="mailto:user{i}@example.com">user{i}@example.com</a><br>
The email address you entered couldn&#39;t be found. Please check the recipient&#39;s email
address and try to resend the message.&nbsp;</p></td></tr></table>
<p>Diagnostic information for administrators:</p><pre>Remote Server returned
'550 5.1.1 RESOLVER.ADR.RecipNotFound; not found'</pre><!-- generated --></body></html>
"""

# name -> the unit repeated to the size (ordinary HTML first)
SHAPES: dict[str, Callable[[int], str]] = {
    "ordinary html": lambda i: EXCHANGE.format(i=i),
    "nested tags never closed": lambda i: "<div><b><i>x",
    "<pre> never closed": lambda i: "<pre>",
    "quotes left open": lambda i: "<a b='>",
    "a text of <": lambda i: "<",
    "<a without >": lambda i: "<a",
    "comments never closed": lambda i: "<!--x>",
}

HEAD = (
    "From: MAILER-DAEMON@x.example\nTo: a@b.example\n"
    "Subject: Undeliverable: hello\nMIME-Version: 1.0\n"
    "Content-Type: text/html; charset=utf-8\n\n"
)


def body(shape: Callable[[int], str], size: int) -> str:
    parts: list[str] = []
    n = i = 0
    while n < size:
        unit = shape(i)
        parts.append(unit)
        n += len(unit)
        i += 1
    return "".join(parts)[:size]


def median_ms(fn: Callable[[int], object], reps: int) -> float:
    """The median time of ``fn(rep)``; each rep gets its own input, so that no cache
    answers (the parser reads an HTML part once per report)."""
    times = []
    for rep in range(reps):
        t = time.perf_counter()
        fn(rep)
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--only", help="one shape, by the start of its name")
    args = ap.parse_args()
    parser = Parser()
    print(f"{'shape':28} {'what':14} {'ms/MB at 1 MB':>14} {'ms/MB at 2 MB':>14} {'2MB/1MB':>8}")
    for name, shape in SHAPES.items():
        if args.only and not name.startswith(args.only):
            continue
        for what in ("html_to_text", "parse_bytes"):
            per_mb = []
            for mb in (1, 2):
                html = body(shape, mb * MB)
                inputs = [f"{mb}.{rep}{html}" for rep in range(args.reps)]
                if what == "html_to_text":
                    ms = median_ms(lambda rep, inputs=inputs: html_to_text(inputs[rep]), args.reps)
                else:
                    datas = [(HEAD + text).encode() for text in inputs]
                    ms = median_ms(
                        lambda rep, datas=datas: parser.parse_bytes(datas[rep]), args.reps
                    )
                per_mb.append(ms / mb)
            ratio = per_mb[1] * 2 / per_mb[0] if per_mb[0] else float("nan")
            print(f"{name:28} {what:14} {per_mb[0]:14.1f} {per_mb[1]:14.1f} {ratio:8.2f}")


if __name__ == "__main__":
    main()
