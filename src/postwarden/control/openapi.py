"""The OpenAPI 3.1 document of the declared API (``/openapi.json``, and the ``/docs``
page built from it): every operation's parameters, body, answers and the key it needs."""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from postwarden.control.routing import (
    KEY_EXTENSION,
    MAX_ID,
    PATH_PARAM,
    Api,
    ErrorEnvelope,
    key_requirement,
)

#: Documents built, by API and its number of operations (they are declared when the
#: resource modules are imported, before any app serves them).
_built: dict[tuple[int, int], tuple[dict[str, Any], bytes]] = {}


def _cached(api: Api) -> tuple[dict[str, Any], bytes]:
    key = (id(api), len(api.ops))
    if key not in _built:
        doc = _document(api)
        _built[key] = (doc, json.dumps(doc).encode())
    return _built[key]


def openapi_document(api: Api) -> dict[str, Any]:
    """The OpenAPI 3.1 document of every declared operation (``/openapi.json``),
    built once per process: do not change it."""
    return _cached(api)[0]


def openapi_bytes(api: Api) -> bytes:
    """:func:`openapi_document` as JSON, as ``/openapi.json`` serves it."""
    return _cached(api)[1]


def _document(api: Api) -> dict[str, Any]:
    models: list[tuple[type[BaseModel], Any]] = [(ErrorEnvelope, "serialization")]
    for op in api.ops:
        if op.body is not None:
            models.append((op.body, "validation"))
        if op.response is not None:
            models.append((op.response, "serialization"))
    keymap, defs = models_json_schema(
        list(dict.fromkeys(models)), ref_template="#/components/schemas/{model}"
    )
    schemas = defs.get("$defs", {})

    def ref(model: type[BaseModel], mode: str) -> dict[str, Any]:
        return keymap[(model, mode)]  # type: ignore[index]

    paths: dict[str, Any] = {}
    for op in api.ops:
        oa_path = PATH_PARAM.sub(lambda m: "{" + m.group(1) + "}", op.path)
        entry: dict[str, Any] = {
            "operationId": op.handler.__name__,
            "summary": op.summary,
            "parameters": [],
            "responses": {},
        }
        # The key it needs, for readers and tools alike (the /docs page shows it).
        needs = key_requirement(op)
        entry[KEY_EXTENSION] = needs
        entry["description"] = f"Key: {needs}." + (
            f"\n\n{op.description}" if op.description else ""
        )
        for m in PATH_PARAM.finditer(op.path):
            typ = {"int": {"type": "integer", "minimum": 0, "maximum": MAX_ID}}.get(
                m.group(2) or "", {"type": "string"}
            )
            entry["parameters"].append(
                {"name": m.group(1), "in": "path", "required": True, "schema": typ}
            )
        if op.query is not None:
            qschema = op.query.model_json_schema(ref_template="#/components/schemas/{model}")
            required = set(qschema.get("required", ()))
            for name, prop in qschema.get("properties", {}).items():
                prop = dict(prop)
                desc = prop.pop("description", None)
                p: dict[str, Any] = {
                    "name": name,
                    "in": "query",
                    "required": name in required,
                    "schema": prop,
                }
                if desc:
                    p["description"] = desc
                entry["parameters"].append(p)
        for hname, hdesc in op.headers.items():
            entry["parameters"].append(
                {
                    "name": hname,
                    "in": "header",
                    "required": False,
                    "description": hdesc,
                    "schema": {"type": "string", "maxLength": 200},
                }
            )
        if op.body is not None:
            entry["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": ref(op.body, "validation")}},
            }
        elif op.request_media != "application/json":
            entry["requestBody"] = {
                "required": True,
                "content": {op.request_media: {"schema": {"type": "string"}}},
            }
        ok: dict[str, Any] = {"description": "success"}
        if op.status != 204:
            if op.response is not None:
                ok["content"] = {op.response_media: {"schema": ref(op.response, "serialization")}}
            else:
                ok["content"] = {op.response_media: {"schema": {"type": "string"}}}
            for media in op.also_media:
                ok["content"][media] = {"schema": {"type": "string"}}
        for status in (op.status, *op.also):
            entry["responses"][str(status)] = ok
        codes = set(op.errors) | {500, 503}  # 503: the database is down
        if op.scope is not None:
            codes |= {401, 403, 429}
        if op.query is not None or op.body is not None:
            codes |= {422}
        if op.body is not None:
            codes |= {400, 413, 415}
        if op.request_media != "application/json":
            codes |= {413, 422}
        for code in sorted(codes):
            entry["responses"][str(code)] = {
                "description": _REASONS.get(code, "error"),
                "content": {"application/json": {"schema": ref(ErrorEnvelope, "serialization")}},
            }
        if op.scope is not None:
            entry["security"] = [{"bearer": []}]
        paths.setdefault(oa_path, {})[op.method.lower()] = entry
    return {
        "openapi": "3.1.0",
        "info": {"title": api.title, "version": api.version},
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }


_REASONS = {
    400: "the body is not JSON",
    401: "no key, or an unknown or revoked one",
    403: "the key may not do this",
    404: "no such resource (for this tenant)",
    409: "conflicts with an existing resource or an earlier request",
    413: "the body is too large",
    415: "wrong content type",
    422: "a field is invalid; the error names it",
    429: "rate limited; see Retry-After",
    500: "internal error",
    503: "unavailable for now (the control database is down); see Retry-After",
}
