"""One error envelope for every API answer that is not a success.

``{"error": {"type": ..., "message": ..., "fields": [{"path": "to[0]", "message": ...}],
"request_id": ...}}`` — ``fields`` only for validation errors.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic import ValidationError

# What pydantic puts before the text of a ValueError or AssertionError raised by a
# validator: noise to the client, who reads the field path and the reason.
_PYDANTIC_PREFIXES = ("Value error, ", "Assertion failed, ")


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        type_: str,
        message: str,
        *,
        fields: Sequence[dict[str, str]] = (),
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.type = type_
        self.message = message
        self.fields = list(fields)
        self.headers = headers or {}

    def body(self, request_id: str) -> dict[str, Any]:
        err: dict[str, Any] = {"type": self.type, "message": self.message}
        if self.fields:
            err["fields"] = self.fields
        err["request_id"] = request_id
        return {"error": err}


def not_found(what: str) -> ApiError:
    return ApiError(404, "not_found", f"{what} not found")


def invalid(path: str, message: str) -> ApiError:
    return ApiError(
        422, "validation_error", f"{path}: {message}", fields=[{"path": path, "message": message}]
    )


def field_path(loc: Sequence[str | int]) -> str:
    """``("to", 0, "email")`` → ``to[0].email``."""
    out = ""
    for part in loc:
        if part == "[key]":  # the key itself was refused: the path is the key's
            continue
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "body"


def clean_message(msg: str) -> str:
    """A validator's message without pydantic's ``Value error, `` prefix."""
    for prefix in _PYDANTIC_PREFIXES:
        if msg.startswith(prefix):
            return msg[len(prefix) :]
    return msg


def from_validation(exc: ValidationError, prefix: Sequence[str | int] = ()) -> ApiError:
    fields = []
    for e in exc.errors(include_url=False):
        loc = [
            *prefix,
            *(p for p in e["loc"] if not (isinstance(p, str) and p.startswith("function-"))),
        ]
        msg = clean_message(str(e["msg"]))
        if e["type"] == "extra_forbidden":
            msg = "unknown field"
        elif e["type"] in ("literal_error", "enum") and "expected" in e.get("ctx", {}):
            # A typo in a filter or a field with a fixed set of values: say what was
            # given and every value allowed.
            given = repr(e.get("input"))
            given = given if len(given) <= 80 else given[:77] + "..."
            msg = f"{given} is not one of {e['ctx']['expected']}"
        fields.append({"path": field_path(loc), "message": msg})
    first = fields[0] if fields else {"path": "body", "message": "invalid"}
    return ApiError(422, "validation_error", f"{first['path']}: {first['message']}", fields=fields)
