"""The visual builder's design document, compiled to responsive email HTML (issue 20).

A design is JSON (``docs/design-json.md``): settings, then sections of one to four
columns holding blocks. :func:`parse_design` checks it (every error carries its field
path, ``sections[2].columns[0].blocks[1].href``) and :func:`compile_design` turns it
into MJML, MJML into HTML (``mjml-python``, the Rust port MRML), and inlines the CSS
(``css-inline``). The Jinja the design holds — ``{{ … }}`` in text and links, the
``{% if %}`` / ``{% for %}`` of condition and loop blocks — comes out byte for byte as
written, for the template renderer to fill at send time: each piece travels through
MJML and the CSS inliner as an opaque token (a comment where it stands between
blocks) and is put back at the end.

Pure: no I/O, no clock, no randomness; the same design gives the same bytes.
"""

from __future__ import annotations

import html
import json
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from html.parser import HTMLParser
from typing import Annotated, Any, Literal

import css_inline
import jinja2
import nh3
from jinja2 import nodes
from mjml import mjml2html
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    model_validator,
)

# Caps on what one design may hold: a design is edited by people, and anything far
# past these is a mistake or an attack on the compiler.
MAX_SECTIONS = 40
MAX_COLUMNS = 4
MAX_BLOCKS = 300  # in the whole design, counting blocks inside conditions and loops
MAX_BLOCKS_PER_LIST = 50
MAX_NESTING = 3  # conditions and loops inside one another
MAX_HTML_CHARS = 20_000  # one text or footer block
MAX_TEXT_CHARS = 1_000  # a heading, a button's label, a default
MAX_URL_CHARS = 2_000
MAX_EXPRESSION_CHARS = 500
MAX_SOCIAL_LINKS = 12
# Checked on the raw JSON before the models see it, so that no shape (a list of a
# million items, a nesting thousands deep) costs more than a walk to refuse.
MAX_JSON_DEPTH = 32
MAX_JSON_NODES = 20_000
MAX_JSON_CHARS = 1_000_000

# The URL variables every send provides (docs/api.md, Templates): the only Jinja a URL
# may consist of. Any other URL starts with its scheme, so that no contact's data can
# turn a link into ``javascript:``.
SEND_URL_VARIABLES = ("unsubscribe_url", "preferences_url", "view_online_url")

# MJML's icons for these networks; the ``-noshare`` ones link to the profile given
# rather than to the network's "share this page" form.
SOCIAL_NETWORKS: Mapping[str, str] = {
    "facebook": "facebook-noshare",
    "x": "x-noshare",
    "twitter": "twitter-noshare",
    "linkedin": "linkedin-noshare",
    "pinterest": "pinterest-noshare",
    "tumblr": "tumblr-noshare",
    "xing": "xing-noshare",
    "instagram": "instagram",
    "github": "github",
    "youtube": "youtube",
    "vimeo": "vimeo",
    "medium": "medium",
    "soundcloud": "soundcloud",
    "dribbble": "dribbble",
    "snapchat": "snapchat",
    "web": "web",
}
_SOCIAL_LABELS = {"x": "X", "github": "GitHub", "linkedin": "LinkedIn", "youtube": "YouTube"}

# What a text block's HTML may keep: inline formatting, links, lists, headings.
TEXT_TAGS = frozenset(
    {
        "a", "b", "blockquote", "br", "code", "em", "h1", "h2", "h3", "h4", "i", "li",
        "ol", "p", "s", "small", "span", "strong", "sub", "sup", "u", "ul",
    }
)  # fmt: skip
_TEXT_ATTRIBUTES = {"a": {"href", "title", "data-notrack"}}


class DesignError(ValueError):
    """A design refused: ``fields`` lists ``{"path", "message"}``, paths relative to the
    design (``sections[0].columns[1].blocks[2].href``; ``""`` is the design itself)."""

    def __init__(self, fields: Sequence[Mapping[str, str]]) -> None:
        self.fields = [dict(f) for f in fields] or [{"path": "", "message": "invalid design"}]
        first = self.fields[0]
        super().__init__(f"{first['path'] or 'design'}: {first['message']}")

    @property
    def path(self) -> str:
        return self.fields[0]["path"]

    def under(self, prefix: str) -> list[dict[str, str]]:
        """The fields with paths below ``prefix`` (the request field holding the design)."""
        return [{**f, "path": join_path(prefix, f["path"])} for f in self.fields]


class _FieldError(ValueError):
    """A model validator's error about one of the model's fields."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class DesignWarning:
    """Something the design allows but the lint reports (an image without alt text)."""

    code: str
    path: str
    message: str


@dataclass(frozen=True)
class Compiled:
    html: str  # with the design's Jinja intact, for the template renderer
    mjml: str  # the intermediate MJML, Jinja intact too (for debugging a layout)
    warnings: tuple[DesignWarning, ...]


def join_path(prefix: str, path: str) -> str:
    if not prefix:
        return path
    if not path:
        return prefix
    return prefix + path if path.startswith("[") else f"{prefix}.{path}"


# --- Jinja: checked with jinja2's parser, never evaluated here ---------------------

_PARSER = jinja2.Environment(autoescape=True)  # parses only; the renderer renders
_EXPRESSION = re.compile(r"\{\{(.*?)\}\}", re.S)
_DELIMITERS = ("{{", "}}", "{%", "%}", "{#", "#}")
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
_VARIABLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}(?:\.[A-Za-z_][A-Za-z0-9_]{0,63}){0,7}")
_RESERVED_NAMES = frozenset(
    {"loop", "self", "caller", "varargs", "kwargs", "true", "false", "none", "True",
     "False", "None", "contact", "postal_address", *SEND_URL_VARIABLES}
)  # fmt: skip
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def _expression_node(expr: str) -> nodes.Expr:
    """The parsed expression, or ValueError saying what is wrong with it."""
    if len(expr) > MAX_EXPRESSION_CHARS:
        raise ValueError(f"a Jinja expression is limited to {MAX_EXPRESSION_CHARS} characters")
    if any(d in expr for d in _DELIMITERS) or _CONTROL.search(expr) or "\n" in expr:
        raise ValueError(f"Jinja expression {expr.strip()!r} holds a delimiter or a line break")
    try:
        tree = _PARSER.parse("{{ " + expr + " }}")
    except jinja2.TemplateSyntaxError as exc:
        raise ValueError(f"Jinja expression {expr.strip()!r}: {exc.message}") from None
    body = tree.body
    if (
        len(body) == 1
        and isinstance(body[0], nodes.Output)
        and len(body[0].nodes) == 1
        and not isinstance(body[0].nodes[0], nodes.TemplateData)
    ):
        return body[0].nodes[0]
    raise ValueError(f"Jinja expression {expr.strip()!r} is not one expression")


def _check_expression(expr: str) -> str:
    if not expr.strip():
        raise ValueError("an empty Jinja expression")
    _expression_node(expr)
    return expr


def _check_inline_jinja(text: str) -> str:
    """Text may hold ``{{ expression }}``; statements belong to condition and loop blocks."""
    for m in _EXPRESSION.finditer(text):
        _check_expression(m.group(1))
    rest = _EXPRESSION.sub("", text)
    if "{%" in rest or "%}" in rest:
        raise ValueError("Jinja statements ({% … %}) go in condition and loop blocks, not in text")
    for d in _DELIMITERS:
        if d in rest:
            raise ValueError(f"{d!r} outside a Jinja expression")
    return text


def _check_plain_text(text: str) -> str:
    if _CONTROL.search(text):
        raise ValueError("control characters are not allowed")
    return _check_inline_jinja(text)


def _check_attribute_jinja(text: str) -> str:
    """Jinja inside an attribute value (quoted with ``"``) may not hold ``"`` itself:
    the template, read as HTML before it is rendered, must keep its shape."""
    for m in _EXPRESSION.finditer(text):
        if '"' in m.group(1):
            raise ValueError("in an attribute, strings inside {{ }} take single quotes")
    return text


def _check_attribute_text(text: str) -> str:
    return _check_attribute_jinja(_check_plain_text(text))


# --- URLs ----------------------------------------------------------------------------

_URL_REFUSED = re.compile(r"[\s\"'<>\\`\x00-\x1f\x7f]")


def _check_url(url: str, *, schemes: tuple[str, ...], jinja: bool) -> str:
    """A URL that starts with one of ``schemes`` (and a host for http/https), or — if
    ``jinja`` — one of the send's URL variables alone; Jinja may follow the scheme."""
    if len(url) > MAX_URL_CHARS:
        raise ValueError(f"a URL is limited to {MAX_URL_CHARS} characters")
    if jinja and (m := _EXPRESSION.fullmatch(url.strip())):
        name = m.group(1).strip()
        if name in SEND_URL_VARIABLES:
            return url.strip()
        raise ValueError(
            f"a URL made only of Jinja must be one of {', '.join(SEND_URL_VARIABLES)} "
            "in {{ }}; others start with their scheme (https://…)"
        )
    if jinja:
        _check_attribute_jinja(_check_inline_jinja(url))
        literal = _EXPRESSION.sub("", url)
    elif any(d in url for d in _DELIMITERS):
        raise ValueError("Jinja is not allowed in this URL")
    else:
        literal = url
    if _URL_REFUSED.search(literal):
        raise ValueError("a URL may not hold spaces, quotes, angle brackets or backslashes")
    lowered = url.lower()
    for scheme in schemes:
        if lowered.startswith(scheme + ":"):
            if scheme in ("http", "https") and not re.match(
                r"https?://[A-Za-z0-9\[]", url, re.IGNORECASE
            ):
                raise ValueError("an http(s) URL needs a host")
            return url
    raise ValueError(f"a URL must start with {' or '.join(s + ':' for s in schemes)}")


def _link_url(url: str) -> str:
    return _check_url(url, schemes=("https", "http", "mailto"), jinja=True)


def _image_url(url: str) -> str:
    return _check_url(url, schemes=("https", "http"), jinja=True)


def _background_url(url: str) -> str:
    # It lands inside CSS url('…') too, where Jinja output would be escaped for HTML
    # but not for CSS: a fixed address only.
    url = _check_url(url, schemes=("https", "http"), jinja=False)
    if "(" in url or ")" in url:
        raise ValueError("a background image URL may not hold parentheses")
    return url


# --- Text HTML: sanitized to a small allow-list ----------------------------------------


def sanitize_html(fragment: str) -> str:
    """``fragment`` cut down to TEXT_TAGS, links http(s)/mailto or a send URL variable.

    Jinja expressions are checked and kept byte for byte (they pass the sanitizer as
    tokens). Tags outside the list are dropped (their text stays; scripts and styles go
    whole); a link to anything else is refused with ValueError rather than dropped, so
    the author learns of it."""
    _check_inline_jinja(fragment)
    # The sanitizer decodes character references: "pwj&#105;nja" must count too.
    tokens = _Tokens(_marker(fragment + html.unescape(fragment)))
    protected = tokens.inline(fragment)
    # The sanitizer drops a javascript: link without a word: look at the links first,
    # to tell the author. The sanitizer stays the guard (the filter below).
    links = _Links()
    links.feed(protected)
    links.close()
    for href in links.hrefs:
        _check_link(tokens.restore_all(href))

    refused: list[str] = []

    def keep(tag: str, attribute: str, value: str) -> str | None:
        try:
            _check_attribute_jinja(tokens.restore_all(value))
        except ValueError as exc:
            refused.append(f"<{tag} {attribute}>: {exc}")
        if tag == "a" and attribute == "href":
            try:
                _link_url(tokens.restore_all(value))
            except ValueError:
                return None
        return value

    cleaned = nh3.clean(
        protected,
        tags=set(TEXT_TAGS),
        attributes={k: set(v) for k, v in _TEXT_ATTRIBUTES.items()},
        attribute_filter=keep,
        url_schemes={"http", "https", "mailto"},
        link_rel=None,
    )
    if refused:
        raise ValueError(refused[0])
    return tokens.restore_all(cleaned)


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.hrefs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "a":
            self.hrefs.extend(v for k, v in attrs if k == "href" and v is not None)


def _check_link(href: str) -> None:
    try:
        _link_url(href)
    except ValueError as exc:
        shown = href if len(href) <= 80 else href[:77] + "..."
        raise ValueError(f"link {shown!r}: {exc}") from None


def _sanitized(fragment: str) -> str:
    if _CONTROL.search(fragment):
        raise ValueError("control characters are not allowed")
    return sanitize_html(fragment)


# --- The document ------------------------------------------------------------------


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=False)


Color = Annotated[str, StringConstraints(pattern=r"^#[0-9a-fA-F]{3}(?:[0-9a-fA-F]{3})?$")]
Align = Literal["left", "center", "right"]
FontFamily = Annotated[
    str, StringConstraints(pattern=r"^[A-Za-z0-9 ,-]+$", min_length=1, max_length=200)
]
PlainText = Annotated[
    str, StringConstraints(max_length=MAX_TEXT_CHARS), AfterValidator(_check_plain_text)
]
AttributeText = Annotated[
    str, StringConstraints(max_length=MAX_TEXT_CHARS), AfterValidator(_check_attribute_text)
]
Label = Annotated[
    str,
    StringConstraints(min_length=1, max_length=MAX_TEXT_CHARS),
    AfterValidator(_check_plain_text),
]
Html = Annotated[str, StringConstraints(max_length=MAX_HTML_CHARS), AfterValidator(_sanitized)]
LinkUrl = Annotated[str, AfterValidator(_link_url)]
ImageUrl = Annotated[str, AfterValidator(_image_url)]
BackgroundUrl = Annotated[str, AfterValidator(_background_url)]
Expression = Annotated[str, AfterValidator(_check_expression)]
FontSize = Annotated[int, Field(ge=8, le=72)]


def _identifier(name: str) -> str:
    if not _IDENTIFIER.fullmatch(name):
        raise ValueError("a name is letters, digits and underscores, not starting with a digit")
    if name in _RESERVED_NAMES:
        raise ValueError(f"{name!r} is taken by the template's own variables")
    return name


def _variable_name(name: str) -> str:
    if not _VARIABLE_NAME.fullmatch(name):
        raise ValueError("a variable is a dotted name such as contact.name")
    return name


class Settings(_Model):
    width: int = Field(600, ge=320, le=800)
    background: Color = "#f4f4f4"
    content_background: Color = "#ffffff"
    font_family: FontFamily = "Arial, Helvetica, sans-serif"
    text_color: Color = "#222222"
    link_color: Color = "#1a73e8"
    preheader: PlainText | None = None


class TextBlock(_Model):
    type: Literal["text"]
    html: Html
    align: Align = "left"
    font_size: FontSize = 16
    color: Color | None = None


class ImageBlock(_Model):
    type: Literal["image"]
    src: ImageUrl
    # Optional in the document so that a design can be saved while still being
    # written; a missing alt is a warning of compile_design and a lint finding.
    alt: AttributeText | None = None
    href: LinkUrl | None = None
    width: int | None = Field(None, ge=16, le=800)
    align: Align = "center"


class ButtonBlock(_Model):
    type: Literal["button"]
    text: Label
    href: LinkUrl
    background_color: Color = "#1a73e8"
    text_color: Color = "#ffffff"
    align: Align = "center"
    border_radius: int = Field(4, ge=0, le=40)
    full_width: bool = False


class DividerBlock(_Model):
    type: Literal["divider"]
    color: Color = "#dddddd"
    thickness: int = Field(1, ge=1, le=10)
    width_percent: int = Field(100, ge=10, le=100)


class SpacerBlock(_Model):
    type: Literal["spacer"]
    height: int = Field(24, ge=1, le=200)


class HeroButton(_Model):
    text: Label
    href: LinkUrl
    background_color: Color = "#ffffff"
    text_color: Color = "#222222"


class HeroBlock(_Model):
    type: Literal["hero"]
    background_image: BackgroundUrl
    background_color: Color = "#333333"  # shown while the image loads, or without it
    heading: Label
    text: PlainText | None = None
    button: HeroButton | None = None
    text_color: Color = "#ffffff"
    align: Align = "center"
    padding_y: int = Field(48, ge=0, le=200)


class FooterBlock(_Model):
    type: Literal["footer"]
    html: Html | None = None
    postal_address: bool = True  # {{ postal_address }}, the tenant's (CAN-SPAM)
    unsubscribe: bool = True  # a link to {{ unsubscribe_url }}
    unsubscribe_text: Label = "Unsubscribe"
    preferences: bool = False  # a link to {{ preferences_url }}
    preferences_text: Label = "Manage preferences"
    align: Align = "center"
    font_size: FontSize = 12
    color: Color = "#777777"


class SocialLink(_Model):
    network: Literal[
        "facebook", "x", "twitter", "linkedin", "pinterest", "tumblr", "xing", "instagram",
        "github", "youtube", "vimeo", "medium", "soundcloud", "dribbble", "snapchat", "web",
    ]  # fmt: skip
    href: LinkUrl
    label: Annotated[AttributeText, StringConstraints(min_length=1, max_length=100)] | None = None


class SocialBlock(_Model):
    type: Literal["social"]
    links: list[SocialLink] = Field(min_length=1, max_length=MAX_SOCIAL_LINKS)
    align: Align = "center"
    icon_size: int = Field(24, ge=16, le=64)


class VariableBlock(_Model):
    type: Literal["variable"]
    name: Annotated[str, AfterValidator(_variable_name)]
    default: PlainText = ""
    align: Align = "left"
    font_size: FontSize = 16
    color: Color | None = None

    @model_validator(mode="after")
    def _default_is_plain(self) -> VariableBlock:
        if any(d in self.default for d in _DELIMITERS):
            raise _FieldError("default", "a default is plain text, without Jinja")
        return self


class ConditionBlock(_Model):
    type: Literal["condition"]
    test: Expression
    blocks: list[Block] = Field(max_length=MAX_BLOCKS_PER_LIST)
    else_blocks: list[Block] = Field(default_factory=list, max_length=MAX_BLOCKS_PER_LIST)


class LoopBlock(_Model):
    type: Literal["loop"]
    item: Annotated[str, AfterValidator(_identifier)]
    over: Expression
    blocks: list[Block] = Field(max_length=MAX_BLOCKS_PER_LIST)


Block = Annotated[
    TextBlock
    | ImageBlock
    | ButtonBlock
    | DividerBlock
    | SpacerBlock
    | HeroBlock
    | FooterBlock
    | SocialBlock
    | VariableBlock
    | ConditionBlock
    | LoopBlock,
    Field(discriminator="type"),
]
BLOCK_TYPES = (
    "text", "image", "button", "divider", "spacer", "hero", "footer", "social",
    "variable", "condition", "loop",
)  # fmt: skip


class Column(_Model):
    width: int | None = Field(None, ge=1, le=100)  # percent of the content width
    background_color: Color | None = None
    blocks: list[Block] = Field(max_length=MAX_BLOCKS_PER_LIST)


class Section(_Model):
    columns: list[Column] = Field(min_length=1, max_length=MAX_COLUMNS)
    background_color: Color | None = None
    padding_y: int = Field(16, ge=0, le=200)

    @model_validator(mode="after")
    def _widths(self) -> Section:
        widths = [c.width for c in self.columns]
        if all(w is None for w in widths):
            return self
        if any(w is None for w in widths):
            raise _FieldError("columns", "give every column a width or none (equal widths)")
        if sum(w for w in widths if w is not None) != 100:
            raise _FieldError("columns", "the widths must add up to 100 (percent)")
        return self


class Design(_Model):
    version: Literal[1]
    settings: Settings = Field(default_factory=lambda: Settings.model_validate({}))
    sections: list[Section] = Field(min_length=1, max_length=MAX_SECTIONS)


ConditionBlock.model_rebuild()
LoopBlock.model_rebuild()


# --- Parsing -------------------------------------------------------------------------

# Messages where pydantic's wording is noise to the designer.
_PYDANTIC_PREFIXES = ("Value error, ", "Assertion failed, ")


_BLOCK_LISTS = ("blocks", "else_blocks")


def _error_path(loc: Sequence[str | int]) -> str:
    """pydantic's loc as a path, without the tag a block's union adds after its index
    (``blocks, 1, "button", "href"`` is ``blocks[1].href``)."""
    out = ""
    for i, part in enumerate(loc):
        if isinstance(part, int):
            out += f"[{part}]"
        elif i >= 2 and isinstance(loc[i - 1], int) and loc[i - 2] in _BLOCK_LISTS:
            continue  # the tag
        else:
            out += f".{part}" if out else part
    return out


def _field_message(err: Mapping[str, Any]) -> tuple[str, str]:
    """(the field below the error's loc, if any; the message)."""
    msg = str(err["msg"])
    for prefix in _PYDANTIC_PREFIXES:
        if msg.startswith(prefix):
            msg = msg[len(prefix) :]
    cause = err.get("ctx", {}).get("error")
    if isinstance(cause, _FieldError):
        return cause.field, msg
    if err["type"] == "extra_forbidden":
        return "", "unknown field"
    if err["type"] == "union_tag_invalid":
        return "type", f"{err['ctx']['tag']!r} is not a block type"
    if err["type"] == "union_tag_not_found":
        return "type", "a block needs a type"
    if err["type"] == "literal_error" and "expected" in err.get("ctx", {}):
        return "", f"{err.get('input')!r} is not one of {err['ctx']['expected']}"
    return "", msg


def _shape_errors(raw: Any) -> list[dict[str, str]]:
    """Refuse a document too big or too deep before the models see it."""
    if not isinstance(raw, Mapping):
        return [{"path": "", "message": "a design is a JSON object"}]
    count = chars = 0
    stack: list[tuple[Any, int]] = [(raw, 1)]
    while stack:
        node, depth = stack.pop()
        count += 1
        if depth > MAX_JSON_DEPTH:
            return [{"path": "", "message": f"nested deeper than {MAX_JSON_DEPTH} levels"}]
        if count > MAX_JSON_NODES:
            return [{"path": "", "message": f"more than {MAX_JSON_NODES} values"}]
        if isinstance(node, str):
            chars += len(node)
        elif isinstance(node, Mapping):
            for k, v in node.items():
                chars += len(str(k))
                stack.append((v, depth + 1))
        elif isinstance(node, list | tuple):
            stack.extend((v, depth + 1) for v in node)
        if chars > MAX_JSON_CHARS:
            return [{"path": "", "message": f"more than {MAX_JSON_CHARS} characters of text"}]
    return []


def _children(block: Any) -> Iterator[tuple[str, Any]]:
    if isinstance(block, ConditionBlock):
        for i, b in enumerate(block.blocks):
            yield f"blocks[{i}]", b
        for i, b in enumerate(block.else_blocks):
            yield f"else_blocks[{i}]", b
    elif isinstance(block, LoopBlock):
        for i, b in enumerate(block.blocks):
            yield f"blocks[{i}]", b


def _walk(block: Any, path: str, depth: int) -> Iterator[tuple[str, Any, int]]:
    yield path, block, depth
    for sub, child in _children(block):
        yield from _walk(child, f"{path}.{sub}", depth + 1)


def all_blocks(design: Design) -> Iterator[tuple[str, Any, int]]:
    """(path, block, depth) of every block, those inside conditions and loops too
    (depth counts the conditions and loops around a block)."""
    for s, section in enumerate(design.sections):
        for c, column in enumerate(section.columns):
            for b, block in enumerate(column.blocks):
                yield from _walk(block, f"sections[{s}].columns[{c}].blocks[{b}]", 0)


def _structure_errors(design: Design) -> list[dict[str, str]]:
    """What the models cannot see one at a time: totals, nesting, where a hero goes."""
    errors: list[dict[str, str]] = []
    for s, section in enumerate(design.sections):
        blocks = [(c, b) for c, col in enumerate(section.columns) for b in range(len(col.blocks))]
        for c, b in blocks:
            alone = len(section.columns) == 1 and len(blocks) == 1
            if isinstance(section.columns[c].blocks[b], HeroBlock) and not alone:
                errors.append(
                    {
                        "path": f"sections[{s}].columns[{c}].blocks[{b}]",
                        "message": "a hero fills its section: put it alone in a section "
                        "of one column",
                    }
                )
    total = 0
    for path, block, depth in all_blocks(design):
        total += 1
        if isinstance(block, HeroBlock) and depth > 0:
            errors.append({"path": path, "message": "a hero cannot be inside a condition or loop"})
        if isinstance(block, ConditionBlock | LoopBlock) and depth == MAX_NESTING:
            errors.append(
                {"path": path, "message": f"conditions and loops nest {MAX_NESTING} deep"}
            )
    if total > MAX_BLOCKS:
        errors.insert(0, {"path": "sections", "message": f"more than {MAX_BLOCKS} blocks"})
    return errors


def parse_design(raw: Mapping[str, Any] | Design) -> Design:
    """The checked design, or DesignError listing every problem with its path."""
    if isinstance(raw, Design):
        design = raw
    else:
        if errors := _shape_errors(raw):
            raise DesignError(errors)
        try:
            design = Design.model_validate(raw)
        except ValidationError as exc:
            fields = []
            for err in exc.errors(include_url=False):
                extra, message = _field_message(err)
                path = _error_path([p for p in err["loc"] if not str(p).startswith("function-")])
                fields.append({"path": join_path(path, extra), "message": message})
            raise DesignError(fields) from None
    if errors := _structure_errors(design):
        raise DesignError(errors)
    return design


def design_warnings(design: Design) -> tuple[DesignWarning, ...]:
    return tuple(
        DesignWarning(
            "image-missing-alt",
            f"{path}.alt",
            'an image without alt text (use "" for a purely decorative one)',
        )
        for path, block, _depth in all_blocks(design)
        if isinstance(block, ImageBlock) and block.alt is None
    )


# --- Jinja through MJML and the inliner: tokens ---------------------------------------


def _marker(text: str) -> str:
    """A token prefix found nowhere in ``text``, chosen the same way every time."""
    marker, n = "pwjinja", 0
    while marker in text:
        n += 1
        marker = f"pwjinja{n}q"
    return marker


class _Tokens:
    """Jinja pieces swapped for ``<marker><n>z`` (letters and digits: nothing MJML, an
    HTML serializer or a CSS inliner changes), and swapped back."""

    def __init__(self, marker: str) -> None:
        self.marker = marker
        self.originals: list[str] = []
        self._pattern = re.compile(rf"(<!--)?{re.escape(marker)}(\d+)z(?(1)-->)")

    def _token(self, original: str) -> str:
        self.originals.append(original)
        return f"{self.marker}{len(self.originals) - 1}z"

    def inline(self, text: str) -> str:
        """Each ``{{ … }}`` of ``text`` as a token."""
        return _EXPRESSION.sub(lambda m: self._token(m.group(0)), text)

    def statement(self, statement: str) -> str:
        """A statement between blocks: a comment, which HTML parsers leave where it is
        (text there would be moved out of the table)."""
        return f"<mj-raw><!--{self._token(statement)}--></mj-raw>"

    def restore_all(self, text: str) -> str:
        return self._pattern.sub(lambda m: self.originals[int(m.group(2))], text)

    def restore(self, text: str) -> str:
        """``restore_all``, checking that every token came through."""
        seen: set[int] = set()

        def back(m: re.Match[str]) -> str:
            seen.add(int(m.group(2)))
            return self.originals[int(m.group(2))]

        out = self._pattern.sub(back, text)
        if len(seen) != len(self.originals):
            missing = sorted(set(range(len(self.originals))) - seen)
            raise RuntimeError(f"Jinja lost in compilation: {self.originals[missing[0]]!r}")
        return out


# --- MJML ------------------------------------------------------------------------------


def _attrs(**values: str | int | None) -> str:
    parts = []
    for key, value in values.items():
        if value is None:
            continue
        name = key.rstrip("_").replace("_", "-")
        parts.append(f' {name}="{html.escape(str(value), quote=True)}"')
    return "".join(parts)


def _jinja_string(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


class _Writer:
    def __init__(self, design: Design, tokens: _Tokens) -> None:
        self.design = design
        self.tokens = tokens
        self.out: list[str] = []

    def text(self, value: str) -> str:
        """Plain text for MJML: Jinja tokenized, the rest escaped."""
        return html.escape(self.tokens.inline(value), quote=False)

    def attr_text(self, value: str) -> str:
        return self.tokens.inline(value)  # _attrs escapes

    def document(self) -> str:
        st = self.design.settings
        w = self.out.append
        w("<mjml><mj-head>")
        w(f"<mj-attributes><mj-all{_attrs(font_family=st.font_family)} />")
        w(f"<mj-text{_attrs(color=st.text_color, line_height='1.5')} /></mj-attributes>")
        w(f"<mj-style>.pw-text a {{ color: {st.link_color}; }}</mj-style>")
        if st.preheader:
            w(f"<mj-preview>{self.text(st.preheader)}</mj-preview>")
        w(f"</mj-head><mj-body{_attrs(width=f'{st.width}px', background_color=st.background)}>")
        for section in self.design.sections:
            self.section(section)
        w("</mj-body></mjml>")
        return "".join(self.out)

    def section(self, section: Section) -> None:
        first = section.columns[0].blocks
        if len(section.columns) == 1 and len(first) == 1 and isinstance(first[0], HeroBlock):
            self.hero(first[0])
            return
        bg = section.background_color or self.design.settings.content_background
        pad = f"{section.padding_y}px 0"
        self.out.append(f"<mj-section{_attrs(background_color=bg, padding=pad)}>")
        for column in section.columns:
            width = f"{column.width}%" if column.width else None
            self.out.append(
                f"<mj-column{_attrs(width=width, background_color=column.background_color)}>"
            )
            self.blocks(column.blocks)
            self.out.append("</mj-column>")
        self.out.append("</mj-section>")

    def blocks(self, blocks: Sequence[Any]) -> None:
        for block in blocks:
            getattr(self, f"block_{block.type}")(block)

    def block_text(self, b: TextBlock) -> None:
        self.out.append(
            f"<mj-text{_attrs(align=b.align, font_size=f'{b.font_size}px', color=b.color)}"
            f' css-class="pw-text">{self.tokens.inline(b.html)}</mj-text>'
        )

    def block_image(self, b: ImageBlock) -> None:
        width = f"{b.width}px" if b.width else None
        alt = None if b.alt is None else self.attr_text(b.alt)
        href = None if b.href is None else self.attr_text(b.href)
        src = self.attr_text(b.src)
        self.out.append(f"<mj-image{_attrs(src=src, alt=alt, href=href, width=width)}")
        self.out.append(f"{_attrs(align=b.align)} />")

    def button(self, text: str, href: str, bg: str, fg: str, **extra: str | None) -> None:
        attrs = _attrs(
            href=self.attr_text(href),
            background_color=bg,
            color=fg,
            font_size="16px",
            inner_padding="12px 24px",
            **extra,
        )
        self.out.append(f"<mj-button{attrs}>{self.text(text)}</mj-button>")

    def block_button(self, b: ButtonBlock) -> None:
        self.button(
            b.text,
            b.href,
            b.background_color,
            b.text_color,
            align=b.align,
            border_radius=f"{b.border_radius}px",
            width="100%" if b.full_width else None,
        )

    def block_divider(self, b: DividerBlock) -> None:
        attrs = _attrs(
            border_color=b.color, border_width=f"{b.thickness}px", width=f"{b.width_percent}%"
        )
        self.out.append(f"<mj-divider{attrs} />")

    def block_spacer(self, b: SpacerBlock) -> None:
        self.out.append(f"<mj-spacer{_attrs(height=f'{b.height}px')} />")

    def hero(self, b: HeroBlock) -> None:
        attrs = _attrs(
            background_url=b.background_image,
            background_color=b.background_color,
            background_size="cover",
            background_repeat="no-repeat",
            background_position="center center",
            padding=f"{b.padding_y}px 0",
        )
        self.out.append(f"<mj-section{attrs}><mj-column>")
        self.out.append(
            f"<mj-text{_attrs(align=b.align, color=b.text_color)}"
            ' font-size="32px" font-weight="bold" line-height="1.2">'
            f'<h1 style="margin:0;font-size:32px;">{self.text(b.heading)}</h1></mj-text>'
        )
        if b.text:
            self.out.append(
                f'<mj-text{_attrs(align=b.align, color=b.text_color)} font-size="18px">'
                f"{self.text(b.text)}</mj-text>"
            )
        if btn := b.button:
            self.button(btn.text, btn.href, btn.background_color, btn.text_color, align=b.align)
        self.out.append("</mj-column></mj-section>")

    def block_hero(self, b: HeroBlock) -> None:  # only reached through section()
        raise AssertionError("a hero is laid out by its section")

    def block_footer(self, b: FooterBlock) -> None:
        parts = []
        if b.html:
            parts.append(self.tokens.inline(b.html))
        if b.postal_address:
            parts.append(f"<p>{self.tokens.inline('{{ postal_address }}')}</p>")
        links = []
        if b.unsubscribe:
            href = self.tokens.inline("{{ unsubscribe_url }}")
            links.append(f'<a href="{href}">{self.text(b.unsubscribe_text)}</a>')
        if b.preferences:
            href = self.tokens.inline("{{ preferences_url }}")
            links.append(f'<a href="{href}">{self.text(b.preferences_text)}</a>')
        if links:
            parts.append("<p>" + " &middot; ".join(links) + "</p>")
        attrs = _attrs(align=b.align, font_size=f"{b.font_size}px", color=b.color)
        self.out.append(f'<mj-text{attrs} css-class="pw-text">{"".join(parts)}</mj-text>')

    def block_social(self, b: SocialBlock) -> None:
        size = f"{b.icon_size}px"
        self.out.append(f'<mj-social{_attrs(align=b.align, icon_size=size)} mode="horizontal">')
        for link in b.links:
            label = link.label or _SOCIAL_LABELS.get(link.network, link.network.capitalize())
            attrs = _attrs(
                name=SOCIAL_NETWORKS[link.network], href=self.attr_text(link.href), alt=label
            )
            self.out.append(f"<mj-social-element{attrs}></mj-social-element>")
        self.out.append("</mj-social>")

    def block_variable(self, b: VariableBlock) -> None:
        expr = "{{ " + f"{b.name} | default({_jinja_string(b.default)}, true)" + " }}"
        attrs = _attrs(align=b.align, font_size=f"{b.font_size}px", color=b.color)
        self.out.append(f'<mj-text{attrs} css-class="pw-text">{self.tokens.inline(expr)}</mj-text>')

    def block_condition(self, b: ConditionBlock) -> None:
        self.out.append(self.tokens.statement("{% if " + b.test.strip() + " %}"))
        self.blocks(b.blocks)
        if b.else_blocks:
            self.out.append(self.tokens.statement("{% else %}"))
            self.blocks(b.else_blocks)
        self.out.append(self.tokens.statement("{% endif %}"))

    def block_loop(self, b: LoopBlock) -> None:
        self.out.append(self.tokens.statement("{% for " + f"{b.item} in {b.over.strip()}" + " %}"))
        self.blocks(b.blocks)
        self.out.append(self.tokens.statement("{% endfor %}"))


# --- Compiling -------------------------------------------------------------------------

_inline: Callable[[str], str] = css_inline.CSSInliner(
    keep_style_tags=True,  # MJML's media queries make the layout responsive
    load_remote_stylesheets=False,
).inline


def compile_design(
    raw: Mapping[str, Any] | Design, *, social_icon_origin: str | None = None
) -> Compiled:
    """The design as email HTML with its Jinja intact; DesignError if it is refused.

    ``social_icon_origin`` is where the social block's icons are fetched from
    (``<origin><network>.png``; MJML's own host when None)."""
    design = parse_design(raw)
    tokens = _Tokens(_marker(design.model_dump_json()))
    mjml = _Writer(design, tokens).document()
    out = mjml2html(mjml, disable_comments=False, fonts={}, social_icon_origin=social_icon_origin)
    out = _inline(out)
    return Compiled(
        html=tokens.restore(out),
        mjml=tokens.restore_all(mjml),
        warnings=design_warnings(design),
    )


def design_json(design: Design) -> str:
    """The canonical JSON of a checked design (sanitized HTML, defaults filled)."""
    return json.dumps(design.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
