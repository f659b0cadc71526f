"""The audience rule language's syntax: a hand-written tokenizer and a
recursive-descent parser to an AST (docs/audiences.md has the grammar). Nothing is
ever evaluated as Python. Every error carries its position; hostile input is bounded
by :data:`MAX_LENGTH`, :data:`MAX_DEPTH` and :data:`MAX_TERMS`. Pure: no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

#: Longest rule, in characters.
MAX_LENGTH = 4000
#: Deepest nesting of parentheses and ``not``.
MAX_DEPTH = 32
#: Most conditions (comparisons and calls) in one rule.
MAX_TERMS = 100
#: Most values in one ``in [...]``.
MAX_VALUES = 200

#: The contact fields a rule may name besides ``attributes.<name>``.
COLUMNS = ("email", "domain", "name", "status", "locale", "timezone", "created_at", "updated_at")
#: The functions a rule may call, and what each takes.
FUNCTIONS = ("in_list", "topic_opted_in", "topic_opted_out", "has_consent", "exists")
#: The methods a string field has: ``email.endswith("@example.com")``.
METHODS = ("startswith", "endswith")
COMPARISONS = ("==", "!=", "<", "<=", ">", ">=")
KEYWORDS = ("and", "or", "not", "in", "contains", "true", "false")


class RuleError(ValueError):
    """A rule that cannot be parsed or bound; ``offset`` is where (0-based, in
    characters), ``line`` and ``column`` the same 1-based."""

    def __init__(self, message: str, source: str, offset: int) -> None:
        self.reason = message
        self.source = source
        self.offset = max(0, min(offset, len(source)))
        before = source[: self.offset]
        self.line = before.count("\n") + 1
        self.column = self.offset - (before.rfind("\n") + 1) + 1
        super().__init__(f"line {self.line}, column {self.column}: {message}")

    def caret(self) -> str:
        """The rule's line and a caret under the place: a message for people."""
        text = self.source.split("\n")[self.line - 1] if self.source else ""
        shown = text.replace("\t", " ")
        start = 0
        if len(shown) > 120:  # a long line: show the part around the place
            start = max(0, self.column - 60)
            shown = shown[start : start + 120]
        return f"{shown}\n{' ' * (self.column - 1 - start)}^"


# ---------------------------------------------------------------- the AST


@dataclass(frozen=True)
class Field:
    """``attributes.<name>`` (``attribute`` true) or a contact column."""

    name: str
    attribute: bool
    pos: int

    def __str__(self) -> str:
        return f"attributes.{self.name}" if self.attribute else self.name


@dataclass(frozen=True)
class Literal:
    value: str | int | float | bool
    pos: int


@dataclass(frozen=True)
class Compare:
    """``field op value``: op one of :data:`COMPARISONS`, ``contains``, ``in`` (value
    a tuple of literals), ``startswith`` or ``endswith`` (the methods)."""

    field: Field
    op: str
    value: Literal | tuple[Literal, ...]
    pos: int


@dataclass(frozen=True)
class Call:
    """``in_list("beta")``, ``exists(attributes.plan)``: the argument a literal or a
    field."""

    name: str
    arg: Literal | Field
    pos: int


@dataclass(frozen=True)
class Not:
    item: Node
    pos: int


@dataclass(frozen=True)
class BoolOp:
    """``and`` / ``or`` of two or more items."""

    op: str
    items: tuple[Node, ...]
    pos: int


Node = Compare | Call | Not | BoolOp


# ---------------------------------------------------------------- tokens


@dataclass(frozen=True)
class Token:
    kind: str  # name, string, number, op, end
    text: str
    pos: int
    value: str | int | float | None = None


_SPACE = re.compile(r"[ \t\r\n]+")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")
_OPS = ("==", "!=", "<=", ">=", "<", ">", "(", ")", "[", "]", ",", ".")
_ESCAPES = {'"': '"', "'": "'", "\\": "\\", "n": "\n", "t": "\t", "/": "/"}
_MAX_NUMBER = 40
_DIGITS = "0123456789"
_DIGITS_1 = tuple(_DIGITS)


def _string(source: str, start: int) -> tuple[str, int]:
    """The string literal opening at ``start`` and the offset after it."""
    quote = source[start]
    out: list[str] = []
    i = start + 1
    while i < len(source):
        ch = source[i]
        if ch == quote:
            return "".join(out), i + 1
        if ch == "\n":
            raise RuleError("a string ends at the end of its line: close it", source, i)
        if ch == "\\":
            nxt = source[i + 1 : i + 2]
            if nxt in _ESCAPES and nxt:
                out.append(_ESCAPES[nxt])
                i += 2
                continue
            if nxt == "u" and re.fullmatch(r"[0-9A-Fa-f]{4}", source[i + 2 : i + 6]):
                code = int(source[i + 2 : i + 6], 16)
                if 0xD800 <= code <= 0xDFFF or code == 0:
                    raise RuleError("no NUL or surrogate in a string", source, i)
                out.append(chr(code))
                i += 6
                continue
            raise RuleError("unknown escape: use \\\" \\' \\\\ \\n \\t or \\uXXXX", source, i)
        if ch == "\x00" or "\ud800" <= ch <= "\udfff":
            raise RuleError("no NUL or surrogate in a string", source, i)
        out.append(ch)
        i += 1
    raise RuleError("this string is never closed", source, start)


def tokenize(source: str) -> list[Token]:
    """The tokens of ``source``, ending with one of kind ``end``."""
    tokens: list[Token] = []
    i = 0
    n = len(source)
    while True:
        m = _SPACE.match(source, i)
        if m:
            i = m.end()
        if i >= n:
            tokens.append(Token("end", "", n))
            return tokens
        ch = source[i]
        if ch in "\"'":
            value, end = _string(source, i)
            tokens.append(Token("string", source[i:end], i, value))
            i = end
            continue
        if ch in _DIGITS or (ch == "-" and source[i + 1 : i + 2] in _DIGITS_1):
            m = _NUMBER.match(source, i)
            assert m is not None
            text = m.group()
            if len(text) > _MAX_NUMBER:
                raise RuleError(f"a number of at most {_MAX_NUMBER} characters", source, i)
            if m.end() < n and (source[m.end()].isalnum() or source[m.end()] == "_"):
                raise RuleError(f"not a number: {source[i : m.end() + 1]!r}", source, i)
            num: int | float
            if re.fullmatch(r"-?[0-9]+", text):
                num = int(text)
            else:
                num = float(text)
                if num in (float("inf"), float("-inf")):
                    raise RuleError("the number is out of range", source, i)
            tokens.append(Token("number", text, i, num))
            i = m.end()
            continue
        m = _NAME.match(source, i)
        if m:
            tokens.append(Token("name", m.group(), i))
            i = m.end()
            continue
        for op in _OPS:
            if source.startswith(op, i):
                tokens.append(Token("op", op, i))
                i += len(op)
                break
        else:
            hint = ""
            if ch == "=":
                hint = " (compare with ==)"
            elif ch in "&|!":
                hint = " (write and, or, not)"
            raise RuleError(f"unexpected character {ch!r}{hint}", source, i)


# ---------------------------------------------------------------- the parser


class _Parser:
    def __init__(self, source: str) -> None:
        self.source = source
        self.tokens = tokenize(source)
        self.i = 0
        self.depth = 0
        self.terms = 0

    @property
    def tok(self) -> Token:
        return self.tokens[self.i]

    def error(self, message: str, tok: Token | None = None) -> RuleError:
        return RuleError(message, self.source, (tok or self.tok).pos)

    def found(self, tok: Token | None = None) -> str:
        t = tok or self.tok
        return "the end of the rule" if t.kind == "end" else repr(t.text)

    def take(self) -> Token:
        tok = self.tok
        self.i += 1
        return tok

    def is_op(self, text: str) -> bool:
        return self.tok.kind == "op" and self.tok.text == text

    def is_word(self, text: str) -> bool:
        return self.tok.kind == "name" and self.tok.text == text

    def expect_op(self, text: str, what: str) -> Token:
        if not self.is_op(text):
            raise self.error(f"expected {text!r} {what}, found {self.found()}")
        return self.take()

    def enter(self, tok: Token) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise self.error(f"nested deeper than {MAX_DEPTH} levels", tok)

    def term(self, tok: Token) -> None:
        self.terms += 1
        if self.terms > MAX_TERMS:
            raise self.error(f"more than {MAX_TERMS} conditions in one rule", tok)

    def rule(self) -> Node:
        if self.tok.kind == "end":
            raise self.error("the rule is empty")
        node = self.or_expr()
        if self.tok.kind != "end":
            if self.tok.kind == "name" and self.tok.text not in KEYWORDS:
                raise self.error(f"expected and, or or the end of the rule, found {self.found()}")
            raise self.error(f"unexpected {self.found()}")
        return node

    def _bool(self, op: str, operand: Callable[[], Node]) -> Node:
        start = self.tok
        items = [operand()]
        while self.is_word(op):
            self.take()
            items.append(operand())
        return items[0] if len(items) == 1 else BoolOp(op, tuple(items), start.pos)

    def or_expr(self) -> Node:
        return self._bool("or", self.and_expr)

    def and_expr(self) -> Node:
        return self._bool("and", self.unary)

    def unary(self) -> Node:
        if self.is_word("not"):
            tok = self.take()
            self.enter(tok)
            item = self.unary()
            self.depth -= 1
            return Not(item, tok.pos)
        return self.primary()

    def primary(self) -> Node:
        tok = self.tok
        if self.is_op("("):
            self.take()
            self.enter(tok)
            node = self.or_expr()
            self.depth -= 1
            self.expect_op(")", "to close the '(' of column " + str(self._column(tok)))
            return node
        if tok.kind != "name":
            raise self.error(f"expected a condition, found {self.found()}")
        if tok.text in FUNCTIONS:
            return self.call()
        if tok.text in COLUMNS or tok.text == "attributes":
            return self.condition()
        if tok.text in KEYWORDS:
            raise self.error(f"expected a condition, found {self.found()}")
        if self.tokens[self.i + 1].kind == "op" and self.tokens[self.i + 1].text == "(":
            raise self.error(f"unknown function {tok.text!r}: one of {', '.join(FUNCTIONS)}")
        raise self.error(
            f"unknown field {tok.text!r}: attributes.<name> or one of {', '.join(COLUMNS)}"
        )

    def _column(self, tok: Token) -> int:
        return RuleError("", self.source, tok.pos).column

    def field(self) -> Field:
        tok = self.take()
        if tok.text != "attributes":
            return Field(tok.text, False, tok.pos)
        self.expect_op(".", "after attributes (attributes.<name>)")
        name = self.tok
        if name.kind != "name":
            raise self.error(f"expected an attribute name, found {self.found()}")
        self.take()
        if len(name.text) > 64:
            raise self.error("an attribute name has at most 64 characters", name)
        return Field(name.text, True, tok.pos)

    def literal(self) -> Literal:
        tok = self.tok
        if tok.kind in ("string", "number"):
            self.take()
            assert tok.value is not None
            return Literal(tok.value, tok.pos)
        if self.is_word("true") or self.is_word("false"):
            self.take()
            return Literal(tok.text == "true", tok.pos)
        raise self.error(
            f"expected a value (a string, a number, true or false), found {self.found()}"
        )

    def call(self) -> Node:
        name = self.take()
        self.term(name)
        self.expect_op("(", f"after {name.text}")
        arg: Literal | Field
        if name.text == "exists":
            if not (
                self.tok.kind == "name"
                and (self.tok.text in COLUMNS or self.tok.text == "attributes")
            ):
                raise self.error(
                    f"exists takes a field (exists(attributes.plan)), found {self.found()}"
                )
            arg = self.field()
        else:
            if self.tok.kind != "string":
                raise self.error(
                    f'{name.text} takes a name in quotes ({name.text}("…")), found {self.found()}'
                )
            arg = self.literal()
        self.expect_op(")", f"to close {name.text}(")
        return Call(name.text, arg, name.pos)

    def condition(self) -> Node:
        start = self.tok
        field = self.field()
        self.term(start)
        tok = self.tok
        if self.is_op("."):
            self.take()
            method = self.tok
            if method.kind != "name" or method.text not in METHODS:
                raise self.error(f"expected a method ({', '.join(METHODS)}), found {self.found()}")
            self.take()
            self.expect_op("(", f"after {method.text}")
            if self.tok.kind != "string":
                raise self.error(f"{method.text} takes a string, found {self.found()}")
            value = self.literal()
            self.expect_op(")", f"to close {method.text}(")
            return Compare(field, method.text, value, method.pos)
        if tok.kind == "op" and tok.text in COMPARISONS:
            self.take()
            return Compare(field, tok.text, self.literal(), tok.pos)
        if self.is_word("contains"):
            self.take()
            return Compare(field, "contains", self.literal(), tok.pos)
        if self.is_word("in"):
            self.take()
            self.expect_op("[", 'after in (in ["a", "b"])')
            values: list[Literal] = []
            while not self.is_op("]"):
                if len(values) >= MAX_VALUES:
                    raise self.error(f"at most {MAX_VALUES} values in one list")
                values.append(self.literal())
                if not self.is_op(","):
                    break
                self.take()
            self.expect_op("]", "to close the list of values")
            if not values:
                raise self.error("an empty list matches nothing: give at least one value", tok)
            return Compare(field, "in", tuple(values), tok.pos)
        raise self.error(
            f"expected a comparison (== != < <= > >=), contains, in or a method after"
            f" {field}, found {self.found()}"
        )


def parse(source: str) -> Node:
    """The AST of ``source``; :class:`RuleError` with the position when it is not a
    rule of the language or passes a limit."""
    if len(source) > MAX_LENGTH:
        raise RuleError(
            f"a rule has at most {MAX_LENGTH} characters", source[:MAX_LENGTH], MAX_LENGTH
        )
    return _Parser(source).rule()
