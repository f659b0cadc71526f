"""The text an HTML part shows a reader, read with the standard library's
:class:`html.parser.HTMLParser`.

Exchange and others explain a failure in HTML only, and anyone can send one to the
inbound MX, so the reading must stay linear whatever the markup. ``HTMLParser`` reads
well-formed markup in one pass, but it has looked for the end of an unfinished construct
again from every later ``<`` (an unclosed comment or declaration, a quote left open in a
tag, ``<a`` with no ``>``: CPython gh-135462, CVE-2025-6069, fixed after the 3.11.7 used
here; CVE-2026-15308, unclosed declarations, reported unfixed in August 2026), and
``<![`` can make it raise. :func:`tags_only`
therefore hands it only constructs it finishes at the next ``>``, in one linear scan,
and drops what shows nothing (comments, declarations, processing instructions, a tag
left open at the end) as a browser does.
"""

from __future__ import annotations

import re
from html.parser import HTMLParser

# Elements whose end starts a new line.
_LINE_ENDS = frozenset(
    ("div", "tr", "li", "h1", "h2", "h3", "h4", "h5", "h6", "table", "blockquote", "pre")
)
# Elements whose content is raw text (a "<" in it opens nothing) and never shown.
_HIDDEN = frozenset(("script", "style"))
# HTML's white space (not Python's \s, which takes a no-break space for one).
_SPACES = re.compile(r"[ \t\n\r\f]+")
# In a tag only its name counts: quotes (and a stray "<") would let HTMLParser look for
# the end of an attribute value past the tag's ">".
_NOT_IN_TAGS = str.maketrans("", "", "\"'<")
_START_NAME = re.compile(r"<([A-Za-z][^\t\n\r\f />]*)")
_END_NAME = re.compile(r"</([A-Za-z][^\t\n\r\f />]*)")
_HIDDEN_END = {t: re.compile(f"</{t}", re.I) for t in _HIDDEN}
# A "<" that may open a construct; any other is text.
_OPENS = re.compile(r"<[A-Za-z/!?]")
# A "<" that opens nothing reaches HTMLParser as this noncharacter (never text: one in
# the input is dropped) and turns back into "<" after: "&lt;" would cost HTMLParser a
# call per character of a text made of "<".
LT = "\ufdd0"


def _text(chunk: str) -> str:
    return chunk.replace(LT, "").replace("<", LT)


def tags_only(html: str) -> str:
    """``html`` as :class:`HTMLParser` is fed it: every ``<`` opens a start or end tag
    that closes at the next ``>`` (end tags as ``</name>``, start tags without
    quotes); a ``<`` that opens no tag is :data:`LT`; script and style elements,
    comments, declarations and processing instructions are gone, and so is the rest
    after a tag, comment or script that never closes (as a browser shows it)."""
    # Each search starts where the last construct ended and the scan stops at the first
    # construct left open: every character is looked at a bounded number of times.
    out: list[str] = []
    pos = 0
    while (m := _OPENS.search(html, pos)) is not None:
        lt = m.start()
        out.append(_text(html[pos:lt]))
        second = html[lt + 1]
        if html.startswith("<!--", lt):
            end = html.find("-->", lt + 4)
            if end < 0:
                return "".join(out)
            pos = end + 3
            continue
        gt = html.find(">", lt)
        if gt < 0:
            return "".join(out)
        if second.isalpha():
            name = _START_NAME.match(html, lt, gt)
            if name is not None and name.group(1).lower() in _HIDDEN:
                closing = _HIDDEN_END[name.group(1).lower()].search(html, gt)
                if closing is None:
                    return "".join(out)
                gt = html.find(">", closing.end())
                if gt < 0:
                    return "".join(out)
            else:
                out.append("<" + html[lt + 1 : gt].translate(_NOT_IN_TAGS) + ">")
        elif second == "/" and (name := _END_NAME.match(html, lt, gt)) is not None:
            out.append("</" + name.group(1).translate(_NOT_IN_TAGS) + ">")
        # else a declaration, a processing instruction or a bogus comment: nothing shown
        pos = gt + 1
    out.append(_text(html[pos:]))
    return "".join(out)


class TextExtractor(HTMLParser):
    """Collects the text an HTML document shows: white space collapsed as a browser
    does (except in ``<pre>``), a line per ``<br>`` and block, a blank line per
    paragraph, cells apart. Fed by :func:`tags_only`."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.pieces: list[str] = []
        # Text since the last tag: its white space is collapsed as one run.
        self.run: list[str] = []
        self.pre = 0

    def text(self) -> str:
        """What was read so far (call after :meth:`close`)."""
        self.flush()
        return "".join(self.pieces)

    def flush(self) -> None:
        if self.run:
            run = "".join(self.run)
            self.pieces.append(run if self.pre else _SPACES.sub(" ", run))
            self.run = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.flush()
        if tag == "pre":
            self.pre += 1
        elif tag == "br":
            self.pieces.append("\n")

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        # "<p/>" opens a paragraph as "<p>" does: HTML has no self-closing elements.
        self.handle_starttag(tag, attrs)

    def handle_endtag(self, tag: str) -> None:
        self.flush()
        if tag == "p":
            self.pieces.append("\n\n")
        elif tag in _LINE_ENDS:
            self.pieces.append("\n")
            if tag == "pre":
                self.pre = max(0, self.pre - 1)
        elif tag in ("td", "th"):
            self.pieces.append(" ")

    def handle_data(self, data: str) -> None:
        self.run.append(data)


def html_to_text(html: str) -> str:
    """The text a reader sees in ``html``, in time linear in its length."""
    reader = TextExtractor()
    reader.feed(tags_only(html))
    reader.close()
    text = reader.text().replace("\xa0", " ").replace(LT, "<")
    text = re.sub(r"[ \t]*\n[ \t]*", "\n", text)
    return re.sub(r"\n{3,}", "\n\n", text).strip()
