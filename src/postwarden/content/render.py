"""Templates rendered in a Jinja2 sandbox that holds against hostile templates.

A tenant's template is code run by the appliance. The sandbox
(:class:`jinja2.sandbox.ImmutableSandboxedEnvironment`: no attribute starting with
``_``, no internals, no changes to lists and dicts) gets no loader (no files: no
``include``, ``import`` or ``extends``) and these limits, enforced inside the render
so that it stops itself (no thread is left running):

* a **deadline** (:attr:`Limits.deadline`, 2 s for all parts of a message), checked
  at every loop step, call, attribute lookup, filter and piece of output;
* an **output cap** (1 MiB per part, counted while :meth:`Template.generate` yields)
  and a cap on all text written anywhere, captures and macros included (4 MiB);
* every string or list a template makes is held to 1 MiB characters or 100 000
  items *before* it is made: ``*``, ``+``, ``%``, ``**``, ``~``, ``replace``,
  ``join`` and the padding filters (``center``, ``indent``, ``format``, ...) are
  checked on their operands; ``str.center``, ``.ljust``, ``.zfill``, ``.format`` and
  the like are not callable; integers stay under 10 000 bits;
* ``range()`` gives at most 10 000 numbers, all loops together at most 1 000 000
  steps, and calls nest at most 64 deep (recursive macros).

The compiler is given these checks by rewriting the template's tree before it is
compiled (:class:`_Guard`): every ``for`` loop iterates through ``_pw_iter``, every
piece of output passes ``_pw_out``, every ``~`` is ``_pw_concat``.

Undefined variables render as nothing (:class:`jinja2.ChainableUndefined`:
``{{ contact.attributes.plan }}`` of a contact without a plan is empty and
``| default("free")`` works): a variable's absence in one contact must not stop a
campaign. The linter (``content.lint``) reports names outside the contract before
anything is sent. Compiled templates are kept in an LRU keyed by the source's hash.
"""

from __future__ import annotations

import contextvars
import html as html_lib
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from jinja2 import ChainableUndefined, Template, nodes, pass_context
from jinja2.compiler import CodeGenerator, Frame
from jinja2.exceptions import SecurityError, TemplateError, TemplateSyntaxError
from jinja2.runtime import Context, markup_join, str_join
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Cycler, Joiner, Namespace
from jinja2.visitor import NodeTransformer

from postwarden.content.text import html_to_text, text_template, tidy


@dataclass(frozen=True)
class Limits:
    """What one render may use (all parts of a message together, but the output cap,
    which is per part)."""

    deadline: float = 2.0  # seconds
    max_output: int = 1 << 20  # characters of one rendered part
    max_produced: int = 4 << 20  # characters written anywhere (captures, macros too)
    max_value: int = 1 << 20  # characters of one string a template makes
    max_items: int = 100_000  # items of one list a template makes
    max_range: int = 10_000
    max_iterations: int = 1_000_000  # loop steps
    max_depth: int = 64  # nested calls
    max_int_bits: int = 10_000


LIMITS = Limits()


class RenderError(Exception):
    """A template that cannot be compiled or rendered. ``code``: ``syntax_error``,
    ``render_error``, ``security_error`` or ``limit_exceeded`` (then ``limit`` says
    which: deadline, output, produced, value, range, iterations, recursion)."""

    def __init__(
        self,
        code: str,
        message: str,
        *,
        part: str = "",
        line: int | None = None,
        column: int | None = None,
        limit: str | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.part = part
        self.line = line
        self.column = column
        self.limit = limit

    def where(self) -> str:
        at = f"line {self.line}" if self.line else ""
        if at and self.column:
            at += f", column {self.column}"
        return f"{at}: {self.message}" if at else self.message


class _Limit(Exception):
    """A limit reached inside a render (turned into a RenderError outside it)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class _Budget:
    __slots__ = ("deadline", "depth", "iterations", "limits", "produced")

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.deadline = time.monotonic() + limits.deadline
        self.iterations = limits.max_iterations
        self.produced = limits.max_produced
        self.depth = 0

    def tick(self) -> None:
        if time.monotonic() > self.deadline:
            raise _Limit("deadline", f"the render took longer than {self.limits.deadline:g} s")


_budget: contextvars.ContextVar[_Budget | None] = contextvars.ContextVar(
    "postwarden_render_budget", default=None
)


def _limits() -> Limits:
    b = _budget.get()
    return LIMITS if b is None else b.limits


def _tick() -> None:
    b = _budget.get()
    if b is not None:
        b.tick()


def _need(chars: int, what: str) -> None:
    limit = _limits().max_value
    if chars > limit:
        raise _Limit("value", f"{what} would make {chars} characters; the limit is {limit}")


def _need_items(items: int, what: str) -> None:
    limit = _limits().max_items
    if items > limit:
        raise _Limit("value", f"{what} would make {items} items; the limit is {limit}")


def _checked(value: Any) -> Any:
    """``value`` if it is within the limits of a value (after the fact: for what
    cannot grow much past what went in)."""
    if isinstance(value, str):
        _need(len(value), "this")
    elif isinstance(value, list | tuple | dict | set | frozenset):
        _need_items(len(value), "this")
    elif isinstance(value, int) and value.bit_length() > _limits().max_int_bits:
        raise _Limit("value", f"an integer of more than {_limits().max_int_bits} bits")
    return value


def _length(value: Any) -> int:
    return len(value) if isinstance(value, str) else len(str(value))


# printf-style conversions: their widths and precisions make text out of nothing.
_PERCENT = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?[hlL]?(.)", re.S)


def _check_percent(fmt: str, args: Any) -> None:
    widths = specs = 0
    for m in _PERCENT.finditer(fmt):
        if m.group(3) == "%":
            continue
        specs += 1
        for g in (m.group(1), m.group(2)):
            if g == "*":
                raise _Limit("value", "'*' widths are not allowed in % formatting")
            if g:
                if len(g) > 7:
                    raise _Limit("value", "a width in % formatting is too large")
                widths += int(g)
    if isinstance(args, Mapping):
        values: Iterable[Any] = args.values()
    elif isinstance(args, tuple):
        values = args
    else:
        values = (args,)
    longest = max((_length(v) for v in values), default=0)
    _need(len(fmt) + widths + specs * (4 * longest + 2), "this % formatting")


def _check_binop(op: str, left: Any, right: Any) -> None:
    seqs = str | list | tuple
    if op == "*":
        if isinstance(left, seqs) and isinstance(right, int):
            seq, n = left, right
        elif isinstance(right, seqs) and isinstance(left, int):
            seq, n = right, left
        else:
            if isinstance(left, int) and isinstance(right, int):
                if left.bit_length() + right.bit_length() > _limits().max_int_bits:
                    raise _Limit("value", "an integer of more than the bits allowed")
            return
        size = len(seq) * max(n, 0)
        (_need if isinstance(seq, str) else _need_items)(size, "this multiplication")
    elif op == "+" and isinstance(left, seqs) and isinstance(right, seqs):
        (_need if isinstance(left, str) else _need_items)(len(left) + len(right), "this sum")
    elif op == "**" and isinstance(left, int) and isinstance(right, int):
        if right > 0 and abs(left) > 1 and right * left.bit_length() > _limits().max_int_bits:
            raise _Limit("value", f"{left} ** {right} has more than the bits allowed")
    elif op == "%" and isinstance(left, str):
        _check_percent(left, right)


# --------------------------------------------------------------- filters and methods

#: str methods a template may call (none pads, repeats or formats with a width).
_STR_METHODS = frozenset(
    """capitalize casefold count endswith find index isalnum isalpha isascii isdecimal
    isdigit islower isnumeric isspace istitle isupper join lower lstrip partition
    removeprefix removesuffix replace rfind rindex rpartition rsplit rstrip split
    splitlines startswith strip swapcase title upper striptags unescape""".split()
)
_NUMBER_METHODS = frozenset(("is_integer",))


def _replace_size(s: str, old: str, new: str, count: Any) -> int:
    n = s.count(old) if old else len(s) + 1
    if isinstance(count, int) and count >= 0:
        n = min(n, count)
    return len(s) + n * max(0, len(new) - len(old))


def _join_size(sep: str, items: list[Any]) -> int:
    return sum(_length(x) for x in items) + len(sep) * max(0, len(items) - 1)


def _arg(args: list[Any], kwargs: dict[str, Any], i: int, name: str, default: Any) -> Any:
    if len(args) > i:
        return args[i]
    return kwargs.get(name, default)


def _pre_center(args: list[Any], kw: dict[str, Any]) -> None:
    width = _arg(args, kw, 1, "width", 80)
    if isinstance(width, int):
        _need(max(_length(args[0]), width), "center")


def _pre_indent(args: list[Any], kw: dict[str, Any]) -> None:
    width = _arg(args, kw, 1, "width", 4)
    text = str(args[0])
    step = len(width) if isinstance(width, str) else width if isinstance(width, int) else 0
    _need(len(text) + (text.count("\n") + 1) * max(step, 0), "indent")


def _pre_replace(args: list[Any], kw: dict[str, Any]) -> None:
    old, new = _arg(args, kw, 1, "old", ""), _arg(args, kw, 2, "new", "")
    count = _arg(args, kw, 3, "count", None)
    _need(_replace_size(str(args[0]), str(old), str(new), count), "replace")


def _pre_join(args: list[Any], kw: dict[str, Any]) -> None:
    args[0] = items = list(args[0])
    _need(_join_size(str(_arg(args, kw, 1, "d", "")), items), "join")


def _pre_format(args: list[Any], kw: dict[str, Any]) -> None:
    _check_percent(str(args[0]), kw or tuple(args[1:]))


#: Longest text wordwrap takes (textwrap is Python: a 750 000-character word takes it
#: 3 s, between two checks of the deadline).
MAX_WORDWRAP = 64 * 1024


def _pre_wordwrap(args: list[Any], kw: dict[str, Any]) -> None:
    text = str(args[0])
    if len(text) > MAX_WORDWRAP:
        raise _Limit("value", f"wordwrap takes at most {MAX_WORDWRAP} characters")
    width = _arg(args, kw, 1, "width", 79)
    wrap = _arg(args, kw, 3, "wrapstring", None) or "\n"
    lines = len(text) // max(width if isinstance(width, int) else 1, 1) + text.count("\n") + 1
    _need(len(text) + lines * len(str(wrap)), "wordwrap")


def _pre_urlize(args: list[Any], kw: dict[str, Any]) -> None:
    for name in ("target", "rel", "extra_schemes"):
        if len(str(kw.get(name) or "")) > 100:
            raise _Limit("value", f"urlize: {name} is too long")
    # Each short address becomes a link tens of characters long.
    _need(len(str(args[0])) * 50, "urlize")


def _pre_batch(args: list[Any], kw: dict[str, Any]) -> None:
    n = _arg(args, kw, 1, "linecount", 0)
    if isinstance(n, int):
        _need_items(n, "batch")


def _pre_slice(args: list[Any], kw: dict[str, Any]) -> None:
    n = _arg(args, kw, 1, "slices", 0)
    if isinstance(n, int):
        _need_items(n, "slice")


def _pre_tojson(args: list[Any], kw: dict[str, Any]) -> None:
    indent = _arg(args, kw, 1, "indent", None)
    if (len(indent) if isinstance(indent, str) else indent if isinstance(indent, int) else 0) > 16:
        raise _Limit("value", "tojson: indent is larger than 16")


def _pre_sum(args: list[Any], kw: dict[str, Any]) -> None:
    start = _arg(args, kw, 2, "start", 0)
    if not isinstance(start, int | float):
        raise _Limit("value", "sum: only numbers are summed")


_PRECHECKS: dict[str, Callable[[list[Any], dict[str, Any]], None]] = {
    "center": _pre_center,
    "indent": _pre_indent,
    "replace": _pre_replace,
    "join": _pre_join,
    "format": _pre_format,
    "wordwrap": _pre_wordwrap,
    "urlize": _pre_urlize,
    "batch": _pre_batch,
    "slice": _pre_slice,
    "tojson": _pre_tojson,
    "sum": _pre_sum,
}


def _guard_filter(name: str, func: Callable[..., Any]) -> Callable[..., Any]:
    """``func`` behind the deadline, its precheck and a check of what it returns."""
    # What Jinja passes first to a filter marked pass_context and the like.
    first: Callable[[Context], Any] | None = {
        "context": lambda ctx: ctx,
        "eval_context": lambda ctx: ctx.eval_ctx,
        "environment": lambda ctx: ctx.environment,
    }.get(getattr(getattr(func, "jinja_pass_arg", None), "name", ""))
    pre = _PRECHECKS.get(name)

    @pass_context
    def guarded(context: Context, *args: Any, **kwargs: Any) -> Any:
        _tick()
        values = list(args)
        if pre is not None and values:
            pre(values, kwargs)
        if first is not None:
            values.insert(0, first(context))
        return _checked(func(*values, **kwargs))

    guarded.__name__ = name
    return guarded


@pass_context
def _pw_out(context: Context, value: Any) -> Any:
    b = _budget.get()
    if b is not None:
        b.produced -= _length(value)
        if b.produced < 0:
            raise _Limit(
                "produced", f"the template wrote more than {b.limits.max_produced} characters"
            )
        b.tick()
    return value


def _steps(items: Iterable[Any], b: _Budget) -> Iterator[Any]:
    for item in items:
        b.iterations -= 1
        if b.iterations < 0:
            raise _Limit("iterations", f"the loops took more than {b.limits.max_iterations} steps")
        b.tick()
        yield item


@pass_context
def _pw_iter(context: Context, items: Any) -> Any:
    b = _budget.get()
    return items if b is None else _steps(items, b)


@pass_context
def _pw_concat(context: Context, items: list[Any]) -> Any:
    _tick()
    _need(sum(_length(x) for x in items), "this ~")
    join = markup_join if context.eval_ctx.autoescape else str_join
    return join(items)


# --------------------------------------------------------------- the environment

_NOT_HERE = (nodes.Extends, nodes.Include, nodes.Import, nodes.FromImport)


class _Guard(NodeTransformer):
    """Routes loops, output and ``~`` through the guards. Output is counted where it
    may repeat or is kept (in a loop, a macro, a call or filter block, a captured
    ``set``): output outside them runs once, and the output cap counts it as it is
    generated."""

    def __init__(self, environment: Any) -> None:
        self.environment = environment
        self.repeated = 0

    def _inside(self, node: nodes.Node) -> nodes.Node:
        self.repeated += 1
        try:
            self.generic_visit(node)
        finally:
            self.repeated -= 1
        return node

    visit_Macro = visit_CallBlock = visit_FilterBlock = visit_AssignBlock = _inside
    visit_Block = _inside  # may be called again: {{ self.name() }}

    def _filter(self, node: nodes.Node, name: str) -> nodes.Filter:
        new = nodes.Filter(node, name, [], [], None, None, lineno=node.lineno)
        new.set_environment(self.environment)
        return new

    def visit_Output(self, node: nodes.Output) -> nodes.Node:
        self.generic_visit(node)
        if self.repeated:
            node.nodes = [self._filter(child, "_pw_out") for child in node.nodes]
        return node

    def visit_For(self, node: nodes.For) -> nodes.Node:
        self._inside(node)
        node.iter = self._filter(node.iter, "_pw_iter")
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Node:
        self.generic_visit(node)
        items = nodes.List(node.nodes, lineno=node.lineno)
        return self._filter(items, "_pw_concat")


class _GuardedCodeGenerator(CodeGenerator):
    def visit_Template(self, node: nodes.Template, frame: Frame | None = None) -> None:
        for bad in node.find_all(_NOT_HERE):
            kind = type(bad).__name__.lower().replace("fromimport", "import")
            raise TemplateSyntaxError(
                f"{kind} is not available in email templates (there are no other files)",
                bad.lineno or 1,
            )
        _Guard(self.environment).visit(node)
        super().visit_Template(node, frame)


class SandboxEnvironment(ImmutableSandboxedEnvironment):
    """The sandbox templates render in (see the module's docstring)."""

    intercepted_binops = frozenset(("+", "*", "**", "%"))
    code_generator_class = _GuardedCodeGenerator

    def __init__(self, *, autoescape: bool) -> None:
        super().__init__(
            autoescape=autoescape,
            undefined=ChainableUndefined,
            extensions=["jinja2.ext.loopcontrols"],
            keep_trailing_newline=True,
            cache_size=0,
        )
        self.globals = {
            "range": self._range,
            "dict": dict,
            "namespace": Namespace,
            "cycler": Cycler,
            "joiner": Joiner,
        }
        self.filters = {name: _guard_filter(name, f) for name, f in self.filters.items()}
        self.filters.update(_pw_out=_pw_out, _pw_iter=_pw_iter, _pw_concat=_pw_concat)

    @staticmethod
    def _range(*args: int) -> range:
        try:
            numbers = range(*args)
            size = len(numbers)
        except OverflowError:
            size = None
        limit = _limits().max_range
        if size is None or size > limit:
            raise _Limit("range", f"range() gives at most {limit} numbers")
        return numbers

    def is_safe_attribute(self, obj: Any, attr: str, value: Any) -> bool:
        if not super().is_safe_attribute(obj, attr, value):
            return False
        if isinstance(obj, str) and callable(value):
            return attr in _STR_METHODS
        if isinstance(obj, int | float) and callable(value):
            return attr in _NUMBER_METHODS
        return not isinstance(obj, bytes | bytearray)

    def unsafe_undefined(self, obj: Any, attribute: str) -> Any:
        # Raised at once: an undefined value that raises only when used would print
        # as nothing and hide the attempt.
        raise SecurityError(
            f"access to attribute {attribute!r} of a {type(obj).__name__!r} value is not allowed"
        )

    def wrap_str_format(self, value: Any) -> None:
        # str.format and format_map are not callable at all (widths pad without
        # limit); is_safe_attribute refuses them.
        return None

    def getattr(self, obj: Any, attribute: str) -> Any:
        _tick()
        return super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        _tick()
        return super().getitem(obj, argument)

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        _tick()
        _check_binop(operator, left, right)
        return _checked(self.binop_table[operator](left, right))

    def call(__self, __context: Context, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        b = _budget.get()
        if b is not None:
            b.tick()
            if b.depth >= b.limits.max_depth:
                raise _Limit("recursion", f"calls nest more than {b.limits.max_depth} deep")
            b.depth += 1
        try:
            owner = getattr(__obj, "__self__", None)
            if isinstance(owner, str) and args:
                name = getattr(__obj, "__name__", "")
                if name == "join":
                    items = list(args[0])
                    _need(_join_size(owner, items), "join")
                    args = (items, *args[1:])
                elif name == "replace" and len(args) >= 2:
                    count = args[2] if len(args) > 2 else kwargs.get("count", -1)
                    _need(_replace_size(owner, str(args[0]), str(args[1]), count), "replace")
            result = super().call(__context, __obj, *args, **kwargs)
        finally:
            if b is not None:
                b.depth -= 1
        return _checked(result)


_ENVIRONMENTS = {
    True: SandboxEnvironment(autoescape=True),
    False: SandboxEnvironment(autoescape=False),
}


# --------------------------------------------------------------- compiling (cached)

CACHE_SIZE = 256
_cache: OrderedDict[tuple[bool, str], Template] = OrderedDict()
_cache_lock = threading.Lock()


def _syntax_error(exc: TemplateSyntaxError, part: str) -> RenderError:
    return RenderError("syntax_error", exc.message or str(exc), part=part, line=exc.lineno)


def compile_template(source: str, *, html: bool, part: str = "") -> Template:
    """The compiled template (from the cache when the same source was compiled
    before); RenderError ``syntax_error`` when it does not compile."""
    # The source itself is the key: a str caches its hash, so a version's template
    # rendered again and again is found without hashing its 30 KB each time.
    key = (html, source)
    with _cache_lock:
        found = _cache.get(key)
        if found is not None:
            _cache.move_to_end(key)
            return found
    try:
        compiled = _ENVIRONMENTS[html].from_string(source)
    except TemplateSyntaxError as exc:
        raise _syntax_error(exc, part) from None
    except (RecursionError, MemoryError, SyntaxError):
        raise RenderError(
            "syntax_error", "the template nests too deeply to compile", part=part
        ) from None
    with _cache_lock:
        _cache[key] = compiled
        while len(_cache) > CACHE_SIZE:
            _cache.popitem(last=False)
    return compiled


_derived: OrderedDict[str, str | None] = OrderedDict()


def derived_text(html_source: str) -> str | None:
    """The text template of an HTML template (``content.text.text_template``), made
    once per source and kept beside the compiled templates."""
    with _cache_lock:
        if html_source in _derived:
            _derived.move_to_end(html_source)
            return _derived[html_source]
    made = text_template(html_source)
    with _cache_lock:
        _derived[html_source] = made
        while len(_derived) > CACHE_SIZE:
            _derived.popitem(last=False)
    return made


def cache_info() -> tuple[int, int]:
    """(templates cached, capacity)."""
    return len(_cache), CACHE_SIZE


# --------------------------------------------------------------- rendering


def _template_line(exc: BaseException) -> int | None:
    line = None
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == "<template>":
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


def _run(template: Template, context: Mapping[str, Any], budget: _Budget) -> str:
    out: list[str] = []
    size = 0
    for chunk in template.generate(dict(context)):
        size += len(chunk)
        if size > budget.limits.max_output:
            raise _Limit(
                "output", f"the output is larger than {budget.limits.max_output} characters"
            )
        budget.tick()
        out.append(chunk)
    return "".join(out)


def render_string(
    source: str,
    context: Mapping[str, Any],
    *,
    html: bool,
    part: str = "",
    limits: Limits = LIMITS,
) -> str:
    """One template rendered (autoescaped when ``html``); RenderError otherwise. Within
    :func:`render_message`, the message's budget is shared by its parts."""
    template = compile_template(source, html=html, part=part)
    budget = _budget.get()
    token = None
    if budget is None:
        budget = _Budget(limits)
        token = _budget.set(budget)
    try:
        return _run(template, context, budget)
    except _Limit as exc:
        raise RenderError(
            "limit_exceeded", str(exc), part=part, line=_template_line(exc), limit=exc.kind
        ) from None
    except RecursionError as exc:
        raise RenderError(
            "limit_exceeded", "calls nest too deep", part=part, line=_template_line(exc),
            limit="recursion",
        ) from None  # fmt: skip
    except MemoryError:
        raise RenderError("limit_exceeded", "out of memory", part=part, limit="value") from None
    except SecurityError as exc:
        raise RenderError("security_error", str(exc), part=part, line=_template_line(exc)) from None
    except TemplateSyntaxError as exc:
        raise _syntax_error(exc, part) from None
    except (TemplateError, Exception) as exc:
        raise RenderError(
            "render_error", f"{type(exc).__name__}: {exc}", part=part, line=_template_line(exc)
        ) from None
    finally:
        if token is not None:
            _budget.reset(token)


@dataclass(frozen=True)
class Parts:
    """A template's parts (a version of it)."""

    subject: str = ""
    preheader: str = ""
    html: str | None = None
    text: str | None = None


@dataclass(frozen=True)
class Rendered:
    subject: str
    preheader: str
    html: str | None
    text: str | None
    text_generated: bool  # the text part was made from the HTML


#: The longest subject line (RFC 5322's line limit).
MAX_SUBJECT = 998
_NOT_ONE_LINE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]+")
_BODY_OPEN = re.compile(r"<body\b[^>]*>", re.I)


def one_line(value: str, limit: int) -> str:
    """Control characters and line breaks as spaces, runs of spaces as one, at most
    ``limit`` characters."""
    return " ".join(_NOT_ONE_LINE.sub(" ", value).split())[:limit]


def with_preheader(html: str, preheader: str) -> str:
    """The HTML with the preheader (the line inboxes show after the subject) as a
    hidden block first in the body."""
    block = (
        '<div style="display:none;max-height:0;overflow:hidden;mso-hide:all">'
        f"{html_lib.escape(preheader)}</div>"
    )
    m = _BODY_OPEN.search(html)
    return html[: m.end()] + block + html[m.end() :] if m else block + html


def render_message(
    parts: Parts, context: Mapping[str, Any], *, limits: Limits = LIMITS
) -> Rendered:
    """Every part rendered under one budget (one deadline); the text part made from
    the HTML when the template has none."""
    budget = _Budget(limits)
    token = _budget.set(budget)
    try:
        subject = one_line(
            render_string(parts.subject, context, html=False, part="subject"), MAX_SUBJECT
        )
        preheader = one_line(
            render_string(parts.preheader, context, html=False, part="preheader"), 500
        )
        html = None
        if parts.html is not None:
            html = render_string(parts.html, context, html=True, part="html")
        text = None
        if parts.text is not None:
            text = render_string(parts.text, context, html=False, part="text")
        elif parts.html is not None:
            derived = derived_text(parts.html)
            if derived is not None:
                try:
                    text = tidy(render_string(derived, context, html=False, part="html"))
                except RenderError:
                    text = None  # made from the rendered HTML below
    finally:
        _budget.reset(token)
    generated = parts.text is None and html is not None
    if generated and html is not None and text is None:
        text = html_to_text(html)
    if html is not None and preheader:
        html = with_preheader(html, preheader)
    return Rendered(subject, preheader, html, text, generated)
