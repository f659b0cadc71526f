"""Typed contact attributes: JSON values must have their type, text values (CSV
cells) are converted, and every refusal says why."""

from __future__ import annotations

from typing import Any

import pytest

from postwarden.contacts.attributes import (
    MAX_LIST,
    MAX_STRING,
    AttributeValueError,
    check_attributes,
    coerce,
    merge,
)


@pytest.mark.parametrize(
    ("value", "type_", "text", "want"),
    [
        ("pro", "string", False, "pro"),
        (3, "number", False, 3),
        (2.5, "number", False, 2.5),
        (" 42 ", "number", True, 42),
        ("1e3", "number", True, 1000.0),
        (True, "boolean", False, True),
        ("Yes", "boolean", True, True),
        ("0", "boolean", True, False),
        ("2026-02-28", "date", False, "2026-02-28"),
        ("2026-02-28T10:00:00+01:00", "date", True, "2026-02-28T09:00:00Z"),
        ("a; b ;c", "list", True, ["a", "b", "c"]),
        ("x|y;z", "list", True, ["x", "y;z"]),
        (["a", "b"], "list", False, ["a", "b"]),
    ],
)
def test_values_convert_to_their_type(value: Any, type_: str, text: bool, want: Any) -> None:
    assert coerce(value, type_, text=text) == want


@pytest.mark.parametrize(
    ("value", "type_", "text", "says"),
    [
        (3, "string", False, "must be a string"),
        ("x" * (MAX_STRING + 1), "string", False, "at most"),
        ("3", "number", False, "must be a number"),
        (True, "number", False, "must be a number"),
        ("abc", "number", True, "not a number"),
        ("nan", "number", True, "finite"),
        (2**60, "number", False, r"2\^53"),
        ("maybe", "boolean", True, "not a boolean"),
        ("true", "boolean", False, "must be a boolean"),
        ("2026-02-30", "date", False, "not a date"),
        ("2026-02-28T10:00:00", "date", False, "zone"),
        ("tomorrow", "date", True, "ISO 8601"),
        ([1, 2], "list", False, "list of strings"),
        (["x"] * (MAX_LIST + 1), "list", False, "at most"),
    ],
)
def test_wrong_values_are_refused_with_a_reason(
    value: Any, type_: str, text: bool, says: str
) -> None:
    with pytest.raises(AttributeValueError, match=says):
        coerce(value, type_, text=text)


def test_check_attributes_reports_each_bad_one_and_keeps_the_rest() -> None:
    types = {"plan": "string", "seats": "number", "trial": "boolean"}
    got, errors = check_attributes(
        {"plan": "pro", "seats": "ten", "trial": None, "color": "red", "bad-name": 1}, types
    )
    assert got == {"plan": "pro", "trial": None, "color": "red"}
    assert set(errors) == {"seats", "bad-name"}
    # From text: an empty cell is no value; undeclared cells are kept as text.
    got, errors = check_attributes({"seats": "", "trial": "no", "color": "red"}, types, text=True)
    assert (got, errors) == ({"trial": False, "color": "red"}, {})


def test_merge_removes_what_is_set_to_none() -> None:
    assert merge({"a": 1, "b": 2}, {"b": None, "c": 3}) == {"a": 1, "c": 3}
