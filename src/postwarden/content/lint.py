"""Findings on a template before it is sent: each with a code, a severity (``error``:
do not send; ``warning``; ``info``) and where it is (the part, and a 1-based line and
column where one applies). docs/api.md ("Templates") lists every code.

Jinja's syntax errors carry only a line; the lexer here (:class:`_ColumnLexer`) gives
every token its column too, so errors and the names found in the template's tree
point at the character. The HTML is walked by ``content.markup`` (linear, whatever
the markup).
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any
from urllib.parse import urlsplit

from jinja2 import meta, nodes
from jinja2.exceptions import TemplateSyntaxError
from jinja2.lexer import Lexer

from postwarden.content.markup import Tag, walk
from postwarden.content.render import Parts, RenderError, SandboxEnvironment, compile_template
from postwarden.content.variables import BUILTINS, CONTACT_FIELDS, CONTRACT

#: Gmail shows "[Message clipped]" after this many bytes of HTML.
GMAIL_CLIP = 102 * 1024
#: Template categories: marketing mail must carry an unsubscribe link and a postal address.
CATEGORIES = ("transactional", "marketing", "other")
#: Methods of a dict a template may call on ``contact.attributes`` (not attribute names).
_DICT_METHODS = frozenset(("get", "items", "keys", "values"))


@dataclass(frozen=True)
class Location:
    part: str  # subject | preheader | html | text
    line: int | None = None
    column: int | None = None


@dataclass(frozen=True)
class Finding:
    code: str
    severity: str  # error | warning | info
    message: str
    location: Location

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------- Jinja, with columns


class _Pos(int):
    """A line number that knows its column (the parser passes it on untouched)."""

    column: int

    def __new__(cls, line: int, column: int) -> _Pos:
        pos = super().__new__(cls, line)
        pos.column = column
        return pos


class _ColumnLexer(Lexer):
    def tokeniter(
        self, source: str, name: str | None, filename: str | None = None, state: str | None = None
    ) -> Iterator[tuple[int, str, str]]:
        text = source  # lint() gives "\n" line ends, as the lexer makes them
        cursor = line_start = 0
        try:
            for lineno, token, value in super().tokeniter(source, name, filename, state):
                at = text.find(value, cursor) if value else -1
                if at < 0:
                    at = cursor
                newline = text.rfind("\n", cursor, at)
                if newline >= 0:
                    line_start = newline + 1
                cursor = at + len(value)
                yield _Pos(lineno, at - line_start + 1), token, value
                newline = text.rfind("\n", at, cursor)
                if newline >= 0:
                    line_start = newline + 1
        except TemplateSyntaxError as exc:
            # The lexer stopped after the last token it gave: point there.
            rest = len(text[cursor:]) - len(text[cursor:].lstrip(" \t"))
            if exc.lineno and not isinstance(exc.lineno, _Pos):
                exc.lineno = _Pos(exc.lineno, cursor + rest - line_start + 1)
            raise


class _LintEnvironment(SandboxEnvironment):
    def __init__(self, *, autoescape: bool) -> None:
        super().__init__(autoescape=autoescape)
        self._column_lexer = _ColumnLexer(self)

    @property
    def lexer(self) -> Lexer:
        return self._column_lexer


_ENV = {True: _LintEnvironment(autoescape=True), False: _LintEnvironment(autoescape=False)}


def _at(part: str, lineno: Any, shift: int = 0) -> Location:
    if not lineno:
        return Location(part)
    column = getattr(lineno, "column", None)
    return Location(part, int(lineno), None if column is None else column + shift)


def _field_at(part: str, node: nodes.Node) -> Location:
    # A Getattr's position is its dot's: the name follows it.
    return _at(part, node.lineno, 1 if isinstance(node, nodes.Getattr) else 0)


def _parse(part: str, source: str, html: bool) -> tuple[nodes.Template | None, list[Finding]]:
    env = _ENV[html]
    try:
        tree = env.parse(source)
        try:
            # What only the compiler checks (filter names, include ...), through the
            # renderer's cache: a preview's lint compiles nothing again.
            compile_template(source, html=html, part=part)
        except RenderError as exc:
            env.compile(source)  # the same error, with its column
            return None, [Finding(exc.code, "error", exc.message, _at(part, exc.line))]
    except TemplateSyntaxError as exc:
        return None, [
            Finding("syntax_error", "error", exc.message or str(exc), _at(part, exc.lineno))
        ]
    except (RecursionError, MemoryError, SyntaxError):
        msg = "the template nests too deeply to compile"
        return None, [Finding("syntax_error", "error", msg, Location(part))]
    return tree, []


def _field(node: nodes.Node) -> str | None:
    if isinstance(node, nodes.Getattr):
        return str(node.attr)
    if isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Const):
        return str(node.arg.value) if isinstance(node.arg.value, str) else None
    return None


def _is_name(node: nodes.Node, name: str) -> bool:
    return isinstance(node, nodes.Name) and node.name == name and node.ctx == "load"


def _names(
    part: str, tree: nodes.Template, known: Collection[str], attributes: Collection[str]
) -> Iterator[Finding]:
    undeclared = meta.find_undeclared_variables(tree) - set(known) - BUILTINS
    seen: set[str] = set()
    for node in tree.find_all(nodes.Name):
        if node.ctx == "load" and node.name in undeclared and node.name not in seen:
            seen.add(node.name)
            yield Finding(
                "unknown_variable",
                "error",
                f"{node.name!r} is neither a variable every send provides"
                f" ({', '.join(CONTRACT)}) nor one the template declares",
                _at(part, node.lineno),
            )
    assigned = any(n.name == "contact" and n.ctx != "load" for n in tree.find_all(nodes.Name))
    if assigned:  # a template's own "contact" is not the contract's
        return
    for access in tree.find_all((nodes.Getattr, nodes.Getitem)):
        field = _field(access)
        if field is None:
            continue
        inner: Any = getattr(access, "node", None)
        if _is_name(inner, "contact"):
            if field not in CONTACT_FIELDS:
                yield Finding(
                    "unknown_variable",
                    "error",
                    f"contact.{field} is not provided: a contact has"
                    f" {', '.join(CONTACT_FIELDS)} (contact.attributes.<name>)",
                    _field_at(part, access),
                )
        elif (
            isinstance(inner, nodes.Getattr | nodes.Getitem)
            and _is_name(inner.node, "contact")
            and _field(inner) == "attributes"
            and field not in attributes
            and field not in _DICT_METHODS
        ):
            yield Finding(
                "undeclared_attribute",
                "warning",
                f"contact.attributes.{field} is not a declared attribute of this account"
                " (contacts without it render it empty)",
                _field_at(part, access),
            )


# --------------------------------------------------------------- links and HTML

_JINJA = re.compile(r"\{\{.*?\}\}|\{%.*?%\}|\{#.*?#\}", re.S)
_UNSUBSCRIBE = re.compile(r"\{\{-?\s*unsubscribe_url\b")
_POSTAL = re.compile(r"\{\{-?\s*postal_address\b")
_UNSAFE_SCHEMES = ("javascript:", "vbscript:", "data:")


def link_problem(href: str) -> tuple[str, str, str] | None:
    """What is wrong with a link, as (code, severity, message), or None. A Jinja
    expression stands for a value: ``{{ unsubscribe_url }}`` and
    ``https://{{ host }}/x`` are links."""
    value = href.strip()
    if not value:
        return "malformed_link", "warning", "an empty link"
    whole = _JINJA.sub("\x00", value)
    low = whole.lower()
    if low.startswith(_UNSAFE_SCHEMES):
        return "unsafe_link", "error", f"a {low.split(':')[0]}: link is not allowed in email"
    if any(c.isspace() for c in whole):
        return "malformed_link", "warning", f"a space in the link {href[:200]!r}"
    if whole.startswith("\x00"):
        return None  # the link is (or begins with) a variable
    scheme, sep, rest = low.partition(":")
    if not sep or scheme not in ("http", "https", "mailto", "tel"):
        return (
            "malformed_link",
            "warning",
            f"{href[:200]!r}: links in email are absolute http(s), mailto: or tel: links",
        )
    if scheme in ("http", "https") and not urlsplit(whole.replace("\x00", "x")).netloc:
        return "malformed_link", "warning", f"{href[:200]!r} has no host"
    if not rest:
        return "malformed_link", "warning", f"{href[:200]!r} has nothing after {scheme}:"
    return None


def _html(part: str, source: str) -> tuple[list[Finding], bool]:
    """Findings on the HTML's images and links, and whether a link goes to
    ``{{ unsubscribe_url }}``."""
    found: list[Finding] = []
    unsubscribe = False
    for item in walk(source):
        if not isinstance(item, Tag) or item.end:
            continue
        where = Location(part, item.line, item.column)
        if item.name == "img" and item.attr("alt") is None:
            src = (item.attr("src") or "")[:200]
            found.append(
                Finding(
                    "image_missing_alt",
                    "warning",
                    f'an image without alt text ({src!r}): give alt, or alt="" for decoration',
                    where,
                )
            )
        elif item.name in ("a", "area"):
            href = item.attr("href")
            if href is None:
                continue
            if _UNSUBSCRIBE.search(href):
                unsubscribe = True
            problem = link_problem(href)
            if problem is not None:
                found.append(Finding(*problem, where))
    return found, unsubscribe


# --------------------------------------------------------------- the whole template


def _lines(source: str) -> str:
    return source.replace("\r\n", "\n").replace("\r", "\n")


def lint(
    parts: Parts,
    *,
    category: str,
    variables: Sequence[str] = (),
    attributes: Collection[str] = (),
    postal_address: str = "",
    rendered_html_bytes: int | None = None,
) -> list[Finding]:
    """Every finding on ``parts``: syntax, names against the contract (``variables``:
    the template's declared names; ``attributes``: the account's declared attribute
    names), the marketing rules (unsubscribe link, postal address), the text part,
    the HTML's size (the template's, and ``rendered_html_bytes`` after a render),
    images and links."""
    findings: list[Finding] = []
    known = (*CONTRACT, *variables)
    sources = {
        "subject": (parts.subject, False),
        "preheader": (parts.preheader, False),
        "html": (parts.html, True),
        "text": (parts.text, False),
    }
    for part, (source, html) in sources.items():
        if source is None:
            continue
        tree, errors = _parse(part, _lines(source), html)
        findings += errors
        if tree is not None:
            findings += _names(part, tree, known, attributes)
    if not parts.subject.strip():
        findings.append(
            Finding("empty_subject", "warning", "the subject is empty", Location("subject"))
        )
    unsubscribe = False
    if parts.html is not None:
        html_findings, unsubscribe = _html("html", _lines(parts.html))
        findings += html_findings
        size = len(parts.html.encode("utf-8", "surrogatepass"))
        for what, n in (("the template's HTML", size), ("the rendered HTML", rendered_html_bytes)):
            if n is not None and n > GMAIL_CLIP:
                findings.append(
                    Finding(
                        "html_too_large",
                        "warning",
                        f"{what} is {n} bytes: Gmail clips messages over {GMAIL_CLIP}",
                        Location("html"),
                    )
                )
    if parts.text is None:
        if parts.html is None:
            findings.append(
                Finding(
                    "empty_body",
                    "error",
                    "the template has neither HTML nor text",
                    Location("html"),
                )
            )
        else:
            findings.append(
                Finding(
                    "text_generated",
                    "info",
                    "no text part: one is made from the HTML at each send",
                    Location("text"),
                )
            )
    bodies = [s for s in (parts.html, parts.text) if s is not None]
    if category == "marketing":
        if parts.html is not None and not unsubscribe:
            findings.append(
                Finding(
                    "missing_unsubscribe",
                    "error",
                    "marketing mail needs a link to {{ unsubscribe_url }}"
                    ' (<a href="{{ unsubscribe_url }}">)',
                    Location("html"),
                )
            )
        if parts.html is None and parts.text is not None and not _UNSUBSCRIBE.search(parts.text):
            findings.append(
                Finding(
                    "missing_unsubscribe",
                    "error",
                    "marketing mail needs {{ unsubscribe_url }} in its text",
                    Location("text"),
                )
            )
        address = postal_address.strip()
        if not any(_POSTAL.search(s) or (address and address in s) for s in bodies):
            findings.append(
                Finding(
                    "missing_postal_address",
                    "error",
                    "marketing mail needs the sender's physical postal address"
                    " (CAN-SPAM): add {{ postal_address }}",
                    Location("html" if parts.html is not None else "text"),
                )
            )
    if not postal_address.strip() and any(_POSTAL.search(s) for s in bodies):
        findings.append(
            Finding(
                "postal_address_unset",
                "warning",
                "the template uses {{ postal_address }} but the account has no"
                " settings.postal_address: it renders empty",
                Location("html" if parts.html is not None else "text"),
            )
        )
    return findings


def counts(findings: Sequence[Finding]) -> dict[str, int]:
    out = {"error": 0, "warning": 0, "info": 0}
    for f in findings:
        out[f.severity] += 1
    return out
