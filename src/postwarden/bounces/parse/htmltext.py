"""The text an HTML part shows a reader."""

from __future__ import annotations

import html as html_mod
import re

# A tag: never across another "<", so that text full of "<" stays linear to scan.
TAG_RE = re.compile(r"<[^<>]*>")
_HIDDEN_RE = re.compile(r"<(script|style)\b", re.I)
_HIDDEN_END = {t: re.compile(f"</{t}", re.I) for t in ("script", "style")}
_PRE_START = re.compile(r"<pre\b", re.I)
_PRE_END = re.compile(r"</pre", re.I)
_LINE_END_RE = re.compile(r"<br\s*/?>|</(div|tr|li|h[1-6]|table|blockquote|pre)>", re.I)


def _drop_hidden(html: str) -> str:
    """``html`` without its script and style elements (a linear scan: an opening tag
    without its end drops the rest)."""
    out = []
    pos = 0
    while (m := _HIDDEN_RE.search(html, pos)) is not None:
        out.append(html[pos : m.start()])
        end = _HIDDEN_END[m.group(1).lower()].search(html, m.end())
        if end is None:
            return "".join(out)
        close = html.find(">", end.start())
        pos = len(html) if close < 0 else close + 1
    out.append(html[pos:])
    return "".join(out)


def _split_pre(html: str) -> list[tuple[bool, str]]:
    """``html`` cut into (inside ``<pre>``, chunk) by a linear scan."""
    out = []
    pos = 0
    while (start := _PRE_START.search(html, pos)) and (end := _PRE_END.search(html, start.end())):
        out += [(False, html[pos : start.start()]), (True, html[start.start() : end.start()])]
        pos = end.start()
    out.append((False, html[pos:]))
    return out


def html_to_text(html: str) -> str:
    """The text a reader sees: whitespace collapsed as a browser does (except in
    ``<pre>``), a line per ``<br>``/block, a blank line per paragraph."""
    out = []
    for pre, chunk in _split_pre(_drop_hidden(html)):
        if not pre:
            chunk = re.sub(r"\s+", " ", chunk)
        chunk = re.sub(r"</p\s*>", "\n\n", chunk, flags=re.I)
        chunk = _LINE_END_RE.sub("\n", chunk)
        chunk = re.sub(r"</t[dh]\s*>", " ", chunk, flags=re.I)
        out.append(TAG_RE.sub("", chunk))
    text = html_mod.unescape("".join(out)).replace("\xa0", " ")
    text = re.sub(r"[ \t]*\n[ \t]*", "\n", text)
    return re.sub(r"\n{3,}", "\n\n", text).strip()
