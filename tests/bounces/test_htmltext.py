"""HTML to text: what a reader sees, read by the standard library's HTMLParser in a
number of steps that grows with the input, whatever the markup.

No clock here: the work is bounded by construction (``tags_only`` hands HTMLParser only
constructs it finishes at the next ``>``, so it never reads a stretch again), and these
tests hold the construction: the parser in use, what it is fed, that it leaves nothing
unread for ``close()`` to scan again, and the text of megabytes of hostile markup.
``bench/bounce_parse.py`` gives the milliseconds."""

from __future__ import annotations

import re
from html.parser import HTMLParser

import pytest

from postwarden.bounces.parse import MAX_HTML, Parser, mime
from postwarden.bounces.parse.htmltext import LT, TextExtractor, html_to_text, tags_only

MB = 1_000_000


def test_html_parts_are_read_by_the_standard_librarys_parser() -> None:
    assert issubclass(TextExtractor, HTMLParser)
    assert mime._shown.__wrapped__ is html_to_text  # type: ignore[attr-defined]
    reader = TextExtractor()
    reader.feed(tags_only("<p>a<br>b</p>"))
    reader.close()
    assert reader.text() == "a\nb\n\n"


@pytest.mark.parametrize(
    ("html", "text"),
    [
        ("<p>one</p><p>two</p>", "one\n\ntwo"),
        ("a<br>b<br/>c<BR clear=all>d", "a\nb\nc\nd"),
        ("<table><tr><td>a</td><td>b</td></tr><tr><td>c</td></tr></table>", "a b\nc"),
        ("a  \n\t b", "a b"),
        ("<pre>a  b\n c</pre>d", "a  b\nc\nd"),  # indents go, in <pre> too
        ("x<script>if (a<b) {}</script>y<STYLE>p{}</style >z<script/>w", "xyz"),
        ("a&amp;b&nbsp;c&#39;d&lt;e", "a&b c'd<e"),
        ("a<!-- <p>hidden</p> -->b<!DOCTYPE html><?xml x?>c<![if mso]>d", "abcd"),
        ("<a href=\"mailto:u@example.com\" title='x'>u@example.com</a>", "u@example.com"),
        ("5 < 6 and 7 > 6", "5 < 6 and 7 > 6"),
        ("<<<b>bold</b>", "<<bold"),
        ("</ x>a</>b</div foo>c", "ab\nc"),
        ("before<div", "before"),  # a tag left open at the end shows nothing
        ("before<!-- never closed", "before"),
        (f"a{LT}b", "ab"),  # the stand-in for "<" is no text of its own
    ],
)
def test_what_a_reader_sees(html: str, text: str) -> None:
    assert html_to_text(html) == text


HOSTILE = {
    # name: (unit, repeats, what the reader sees)
    "nested tags never closed": ("<div><b><i>x", MB // 12, "x" * (MB // 12)),
    "pre never closed": ("<pre>", MB // 20, ""),
    "quotes left open": ("<a b='>", MB // 28, ""),
    "quoted > and a letter": ('<a b="x>', MB // 32, ""),
    "a text of <": ("<", MB, "<" * MB),
    "<a without >": ("<a", MB // 2, ""),
    "open script": ("<script", MB // 7, ""),
    "scripts never closed": ("<script>", MB // 8, ""),
    "comments never closed": ("<!--x>", MB // 6, ""),
    "marked sections": ("<![x", MB // 4, ""),
    "end tags without names": ("</", MB // 2, ""),
    "character references": ("&#", MB // 2, "&#" * (MB // 2)),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_html_is_read_to_the_end(name: str) -> None:
    unit, repeats, text = HOSTILE[name]
    html = unit * repeats
    fed = tags_only(html)
    # One construct per "<" at most, none longer than the input's.
    assert len(fed) <= len(html)
    reader = TextExtractor()
    reader.feed(fed)
    # HTMLParser stopped at no unfinished construct: close() has no markup to read again.
    assert "<" not in reader.rawdata
    reader.close()
    assert reader.text().replace(LT, "<") == text


# Every "<" HTMLParser is fed opens a start or end tag closed by the next ">", with no
# quote that could carry its attribute scan further.
_FED_CONSTRUCT = re.compile(r"<(?:[A-Za-z][^<>\"']*|/[A-Za-z][^<>\"'\s/]*)>")


@pytest.mark.parametrize(
    "html",
    [
        "<a href='x>y'>z</a>",
        '<img src="a.png" alt="<b>"><p class=x>t</p >',
        "<!--[if gte mso 9]><xml><o:x>96</o:x></xml><![endif]-->text",
        "<a<b<c>d</e f='g'>",
        "<" + "a b='" * 1000 + ">" + "<!--" * 1000 + "-->",
        "<?php echo 1 ?><!x><![CDATA[a>b]]></>",
    ],
)
def test_html_parser_is_fed_only_tags_it_finishes_at_the_next_gt(html: str) -> None:
    fed = tags_only(html)
    assert "<" not in _FED_CONSTRUCT.sub("", fed), fed
    assert len(fed) <= len(html)


def test_a_report_reads_at_most_max_html_characters_of_html() -> None:
    """A report of megabytes of markup is read as far as MAX_HTML: what comes first
    counts, the rest is never handed to HTMLParser."""
    html = "alice@example.org: 550 5.1.1 user unknown<br>" + "<div>" * (2 * MB // 5)
    html += "<p>bob@example.org: 550 5.1.1 user unknown</p>"
    assert len(html) > 4 * MAX_HTML
    data = (
        "From: MAILER-DAEMON@mx.example.net\nTo: sender@app.example\n"
        "Subject: Undeliverable: hello\nMIME-Version: 1.0\n"
        f"Content-Type: text/html; charset=utf-8\n\n{html}\n"
    ).encode()
    findings = Parser().parse_bytes(data).findings
    assert [(f.recipient, f.reason, f.hard) for f in findings] == [
        ("alice@example.org", "user_unknown", True)
    ]
