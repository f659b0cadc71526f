"""Typed contact attributes (issue 20): a tenant declares each attribute's type, and
values are checked and converted to it whether they come as JSON (the API) or as
text (a CSV cell, a pulled data source). Pure: no I/O.

Types and how they are stored (JSON):

* ``string``: text, at most :data:`MAX_STRING` characters;
* ``number``: an int or a finite float (``"3.5"`` from text; ``true`` is no number);
* ``boolean``: ``true``/``false`` (from text also ``yes``/``no``, ``1``/``0``,
  ``y``/``n``, ``t``/``f``, any case);
* ``date``: ``YYYY-MM-DD``, or a time with its zone stored as ISO 8601 in UTC;
* ``list``: a list of strings (from text: split at ``;`` or ``|``; at most
  :data:`MAX_LIST` items).

An attribute nobody declared is kept as given when it is a string, number, boolean or
list of strings (its type is inferred, never enforced); an empty CSV cell means "no
value" (the attribute is left alone on update, absent on create).
"""

from __future__ import annotations

import datetime as dt
import math
import re
from collections.abc import Mapping
from typing import Any

#: Longest string value, in characters.
MAX_STRING = 2000
#: Most items in a list value.
MAX_LIST = 100
#: Most attributes one contact carries.
MAX_ATTRIBUTES = 200
#: What an attribute's name looks like (usable in the audience language and in
#: templates as ``contact.attributes.<name>``).
NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")

TYPES = ("string", "number", "boolean", "date", "list")

_TRUE = {"true", "yes", "y", "1", "t", "on"}
_FALSE = {"false", "no", "n", "0", "f", "off"}
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


class AttributeValueError(ValueError):
    """A value that is not of its attribute's type; the message says why."""


def _string(value: Any) -> str:
    if not isinstance(value, str):
        raise AttributeValueError(f"must be a string, got {type(value).__name__}")
    if len(value) > MAX_STRING:
        raise AttributeValueError(f"at most {MAX_STRING} characters")
    return value


def _number(value: Any, text: bool) -> int | float:
    if text and isinstance(value, str):
        try:
            n: int | float = int(value.strip())
        except ValueError:
            try:
                n = float(value.strip())
            except ValueError:
                raise AttributeValueError(f"{value!r} is not a number") from None
        value = n
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise AttributeValueError(f"must be a number, got {type(value).__name__}")
    if isinstance(value, float) and not math.isfinite(value):
        raise AttributeValueError("must be a finite number")
    if isinstance(value, int) and abs(value) > 2**53:
        raise AttributeValueError("at most 2^53 in magnitude")
    return value


def _boolean(value: Any, text: bool) -> bool:
    if isinstance(value, bool):
        return value
    if text and isinstance(value, str):
        low = value.strip().lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise AttributeValueError(f"{value!r} is not a boolean (true/false, yes/no, 1/0)")
    raise AttributeValueError(f"must be a boolean, got {type(value).__name__}")


def _date(value: Any) -> str:
    if not isinstance(value, str):
        raise AttributeValueError(
            f"must be a date (YYYY-MM-DD) or a time, got {type(value).__name__}"
        )
    text = value.strip()
    if _DATE.match(text):
        try:
            return dt.date.fromisoformat(text).isoformat()
        except ValueError:
            raise AttributeValueError(f"{value!r} is not a date") from None
    try:
        when = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise AttributeValueError(
            f"{value!r} is not a date (YYYY-MM-DD) or an ISO 8601 time"
        ) from None
    if when.tzinfo is None:
        raise AttributeValueError(f"{value!r}: a time needs its zone (Z or +hh:mm)")
    try:
        return when.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")
    except OverflowError:
        raise AttributeValueError(f"{value!r} is out of range") from None


def _list(value: Any, text: bool) -> list[str]:
    if text and isinstance(value, str):
        sep = "|" if "|" in value else ";"
        value = [part.strip() for part in value.split(sep) if part.strip()]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise AttributeValueError("must be a list of strings")
    if len(value) > MAX_LIST:
        raise AttributeValueError(f"at most {MAX_LIST} items")
    for v in value:
        if len(v) > MAX_STRING:
            raise AttributeValueError(f"items of at most {MAX_STRING} characters")
    return list(value)


def coerce(value: Any, type_: str, *, text: bool = False) -> Any:
    """``value`` as an attribute of ``type_``; ``text``: it is a CSV cell or other
    text to convert (else JSON, which must have the type already, but for dates).
    Raises :class:`AttributeValueError`."""
    if type_ == "string":
        return _string(value)
    if type_ == "number":
        return _number(value, text)
    if type_ == "boolean":
        return _boolean(value, text)
    if type_ == "date":
        return _date(value)
    if type_ == "list":
        return _list(value, text)
    raise AttributeValueError(f"unknown attribute type {type_!r}")


def undeclared(value: Any) -> Any:
    """An attribute no type was declared for: kept when it is a plain value."""
    if isinstance(value, bool | str):
        return _string(value) if isinstance(value, str) else value
    if isinstance(value, int | float):
        return _number(value, False)
    if isinstance(value, list):
        return _list(value, False)
    raise AttributeValueError("must be a string, number, boolean or list of strings")


def check_attributes(
    values: Mapping[str, Any], types: Mapping[str, str], *, text: bool = False
) -> tuple[dict[str, Any], dict[str, str]]:
    """The values converted to their declared ``types`` (name -> type), and the
    errors by attribute name. ``None`` (JSON null) removes an attribute and is kept
    as ``None``; an empty text value is left out."""
    out: dict[str, Any] = {}
    errors: dict[str, str] = {}
    if len(values) > MAX_ATTRIBUTES:
        return {}, {"": f"at most {MAX_ATTRIBUTES} attributes"}
    for name, value in values.items():
        if not NAME_RE.match(name):
            errors[name] = "a name is a letter or _ then letters, digits or _ (64 at most)"
            continue
        if value is None or (text and isinstance(value, str) and not value.strip()):
            if not text:
                out[name] = None
            continue
        try:
            type_ = types.get(name)
            out[name] = coerce(value, type_, text=text) if type_ else undeclared(value)
        except AttributeValueError as exc:
            errors[name] = str(exc)
    return out, errors


def merge(current: Mapping[str, Any], changes: Mapping[str, Any]) -> dict[str, Any]:
    """``current`` with ``changes`` on top; a ``None`` change removes the attribute."""
    merged = dict(current)
    for k, v in changes.items():
        if v is None:
            merged.pop(k, None)
        else:
            merged[k] = v
    return merged
