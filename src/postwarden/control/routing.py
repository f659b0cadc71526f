"""Declared API operations: one declaration gives the Starlette route, the checks
(authentication, scope, rate limit, body and query validation) and the OpenAPI entry,
so that the published schema cannot drift from what is served."""

from __future__ import annotations

import json
import logging
import re
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ValidationError
from starlette.datastructures import Headers, MutableHeaders
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from postwarden.control.auth import IMPLIES, Principal, TenantDisabled
from postwarden.control.bodies import BodyBudget
from postwarden.control.errors import ApiError, field_path, from_validation
from postwarden.store.availability import LogLimiter, is_unavailable

log = logging.getLogger("postwarden.control.api")
#: Failures while the database is down come by the thousand: one line per kind and
#: interval, with a count, the traceback once (issue 18).
limited = LogLimiter(log)
#: Seconds a client is asked to wait when the database is unavailable.
RETRY_AFTER_UNAVAILABLE = 5


def database_unavailable() -> ApiError:
    return ApiError(
        503,
        "database_unavailable",
        "the control database is unavailable; the request was not carried out: try again shortly",
        headers={"Retry-After": str(RETRY_AFTER_UNAVAILABLE)},
    )


#: The OpenAPI operation's extension naming the key it needs (key_requirement).
KEY_EXTENSION = "x-postwarden-key"
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
PATH_PARAM = re.compile(r"\{(\w+)(?::(\w+))?\}")
DEFAULT_BODY_LIMIT = 1024 * 1024
MAX_ID = 2**63 - 1
# Deeper JSON than any request schema has (the deepest is about 5): refused before
# it costs a recursion per level in the parser and the validator.
MAX_JSON_DEPTH = 32
# A string no database column can hold (PostgreSQL refuses NUL in text) and no
# encoder can write (a lone surrogate): refused in every body, query and path value.
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")
UNSTORABLE_MESSAGE = "NUL and lone surrogates (\\u0000, \\ud800-\\udfff) are not allowed"
# In the raw body, the only ways to spell one (raw NUL bytes are not JSON, and raw
# surrogates are not UTF-8): only a body with such an escape is walked.
_UNSTORABLE_ESCAPE = re.compile(rb"\\u(?:0000|[dD][89a-fA-F])")


_SCOPE_KEY = "postwarden.request_id"


def scope_request_id(scope: Scope) -> str:
    """The request's id, the same for every part that answers it: the client's
    ``X-Request-Id`` when it is 1-64 of ``A-Za-z0-9._-``, else one made here (once)."""
    rid: str | None = scope.get(_SCOPE_KEY)
    if rid is None:
        given = Headers(scope=scope).get("x-request-id", "")
        rid = given if _REQUEST_ID.match(given) else secrets.token_hex(8)
        scope[_SCOPE_KEY] = rid
    return rid


def request_id(request: Request) -> str:
    return scope_request_id(request.scope)


class RequestIdMiddleware:
    """Gives every answer an ``X-Request-Id`` header (the id :func:`request_id` gives
    the handlers for their error bodies): the API's routes, Starlette's own 404 and
    405, /metrics and /healthz alike."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = scope_request_id(scope)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                if "x-request-id" not in headers:
                    headers["X-Request-Id"] = rid
            await send(message)

        await self.app(scope, receive, send_with_id)


@dataclass
class Call:
    """What a handler gets."""

    request: Request
    ctx: Any
    principal: Principal | None
    body: Any = None
    query: Any = None
    path: dict[str, Any] = field(default_factory=dict)
    raw: bytes = b""
    request_id: str = ""
    reserved: int = 0  # bytes of the body budget this request holds
    # The Idempotency-Key the request carries and its body's hash (control.idempotency).
    idempotency: tuple[str, str] | None = None

    @property
    def tenant_id(self) -> int:
        # A real check, not an assert: ``python -O`` strips asserts, and a tenant route
        # reached without a tenant key must never fall through to tenant_id None.
        if self.principal is None or self.principal.tenant_id is None:
            raise ApiError(
                403, "forbidden", "this route needs a tenant key; this is an operator key"
            )
        return self.principal.tenant_id


Handler = Callable[[Call], Awaitable[Any]]
# A route's body limit in bytes, or a function of the context (the configuration).
BodyLimit = int | Callable[[Any], int]


@dataclass
class Operation:
    method: str
    path: str
    handler: Handler
    summary: str
    scope: str | None
    tenant: bool  # a tenant's key is needed (False: an operator key for "admin")
    body: type[BaseModel] | None
    query: type[BaseModel] | None
    response: type[BaseModel] | None
    status: int
    errors: tuple[int, ...]
    body_limit: BodyLimit
    request_media: str = "application/json"
    response_media: str = "application/json"
    description: str = ""
    headers: dict[str, str] = field(default_factory=dict)  # request header name → description
    # A change the answer waits to see in force in this process's caches (see
    # apply_changes); False for routes that change nothing the caches hold.
    sync: bool = True
    # The handler reads the body itself (call.request.stream()): a body too large to
    # hold in memory, stored as it comes (POST /v1/imports).
    stream: bool = False
    # Other success statuses the handler answers with, with the same body (an upsert:
    # 201 created, 200 updated).
    also: tuple[int, ...] = ()
    # Other media types the success answers in (a query parameter chooses: CSV), each
    # a string in the schema.
    also_media: tuple[str, ...] = ()


class Api:
    def __init__(self, title: str, version: str) -> None:
        self.title = title
        self.version = version
        self.ops: list[Operation] = []

    def op(
        self,
        method: str,
        path: str,
        *,
        summary: str,
        scope: str | None,
        body: type[BaseModel] | None = None,
        query: type[BaseModel] | None = None,
        response: type[BaseModel] | None = None,
        status: int = 200,
        errors: tuple[int, ...] = (),
        body_limit: BodyLimit = DEFAULT_BODY_LIMIT,
        request_media: str = "application/json",
        response_media: str = "application/json",
        headers: dict[str, str] | None = None,
        sync: bool = True,
        stream: bool = False,
        also: tuple[int, ...] = (),
        also_media: tuple[str, ...] = (),
    ) -> Callable[[Handler], Handler]:
        def register(fn: Handler) -> Handler:
            self.ops.append(
                Operation(
                    method,
                    path,
                    fn,
                    summary,
                    scope,
                    scope != "admin",
                    body,
                    query,
                    response,
                    status,
                    errors,
                    body_limit,
                    request_media,
                    response_media,
                    (fn.__doc__ or "").strip(),
                    headers or {},
                    sync,
                    stream,
                    also,
                    also_media,
                )
            )
            return fn

        return register

    # ------------------------------------------------------------------ serving

    def routes(self, ctx: Any) -> list[Route]:
        by_path: dict[str, dict[str, Operation]] = {}
        for op in self.ops:
            by_path.setdefault(op.path, {})[op.method] = op
        routes = []
        # Fixed paths first: /v1/suppressions/export before /v1/suppressions/{address}.
        for path, methods in sorted(by_path.items(), key=lambda kv: kv[0].count("{")):
            routes.append(Route(path, self._endpoint(ctx, methods), methods=list(methods)))
        return routes

    def _endpoint(
        self, ctx: Any, methods: dict[str, Operation]
    ) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            op = methods[request.method if request.method != "HEAD" else "GET"]
            rid = request_id(request)
            call = Call(request, ctx, None, request_id=rid)
            try:
                result = await self._run(ctx, op, call)
            except ApiError as exc:
                return error_response(exc, rid)
            except Exception as exc:
                if is_unavailable(exc):
                    db = getattr(ctx, "db", None)
                    if db is not None:
                        db.down(exc)
                    limited(logging.WARNING, "api_unavailable",
                            "event=api_database_unavailable method=%s path=%s rid=%s",
                            op.method, op.path, rid, exc=exc)  # fmt: skip
                    return error_response(database_unavailable(), rid)
                limited(logging.ERROR, f"api_error {op.method} {op.path} {type(exc).__name__}",
                        "event=api_error method=%s path=%s rid=%s",
                        op.method, op.path, rid, exc=exc)  # fmt: skip
                return error_response(ApiError(500, "internal", "internal error"), rid)
            finally:
                if call.reserved:
                    await ctx.body_budget.release(call.reserved)
            if isinstance(result, Response):
                result.headers["X-Request-Id"] = rid
                return result
            status = op.status
            if isinstance(result, tuple):
                status, result = result
            if status == 204:
                return Response(status_code=204, headers={"X-Request-Id": rid})
            if isinstance(result, BaseModel):
                # pydantic's own encoder: a 1000-event page renders in about a quarter of
                # the time model_dump + json.dumps takes (bench/events_query.py)
                return Response(result.model_dump_json(), status_code=status,
                                media_type="application/json",
                                headers={"X-Request-Id": rid})  # fmt: skip
            return JSONResponse(result, status_code=status, headers={"X-Request-Id": rid})

        return endpoint

    async def _run(self, ctx: Any, op: Operation, call: Call) -> Any:
        request = call.request
        principal = None
        if op.scope is not None:
            principal = await authenticate(ctx, request)
            refusal = key_refusal(op, principal)
            if refusal is not None:
                raise ApiError(403, "forbidden", refusal)
            wait = ctx.limiter.take(principal.key_id)
            if wait > 0:
                raise ApiError(
                    429,
                    "rate_limited",
                    "too many requests for this key",
                    headers={"Retry-After": str(max(1, round(wait + 0.5)))},
                )
        call.principal = principal
        call.path = dict(request.path_params)
        for name, value in call.path.items():
            if isinstance(value, str) and _UNSTORABLE.search(value):
                raise ApiError(404, "not_found", f"no such {name.removesuffix('_id')}")
            # Ids are 64-bit in every database: a larger number names nothing.
            if isinstance(value, int) and value > MAX_ID:
                raise ApiError(404, "not_found", f"no such {name.removesuffix('_id')}")
        if op.query is not None:
            params: dict[str, Any] = {}
            for k, v in request.query_params.multi_items():
                if k in params:
                    raise ApiError(
                        422,
                        "validation_error",
                        f"{k}: given more than once",
                        fields=[{"path": k, "message": "given more than once"}],
                    )
                params[k] = v
                if _UNSTORABLE.search(v):
                    raise ApiError(
                        422,
                        "validation_error",
                        f"{k}: {UNSTORABLE_MESSAGE}",
                        fields=[{"path": k, "message": UNSTORABLE_MESSAGE}],
                    )
            try:
                call.query = op.query.model_validate(params)
            except ValidationError as exc:
                raise from_validation(exc) from None
        elif request.query_params:
            name = next(iter(request.query_params))
            raise ApiError(
                422,
                "validation_error",
                f"{name}: unknown query parameter",
                fields=[{"path": name, "message": "unknown query parameter"}],
            )
        if (op.body is not None or op.request_media != "application/json") and not op.stream:
            limit = op.body_limit(ctx) if callable(op.body_limit) else op.body_limit
            call.raw = await read_body(call, limit, getattr(ctx, "body_budget", None))
        if op.body is not None:
            ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
            if ctype != "application/json":
                raise ApiError(415, "unsupported_media_type", "send application/json")
            data = parse_json(call.raw)
            try:
                call.body = op.body.model_validate(data)
            except ValidationError as exc:
                raise from_validation(exc) from None
            except RecursionError:
                raise _too_deep() from None
        result = await op.handler(call)
        if op.method != "GET":
            await apply_changes(ctx, op)
        return result


class ErrorDetail(BaseModel):
    path: str
    message: str


class ErrorBody(BaseModel):
    type: str
    message: str
    fields: list[ErrorDetail] | None = None
    request_id: str


class ErrorEnvelope(BaseModel):
    error: ErrorBody


def error_response(exc: ApiError, rid: str) -> JSONResponse:
    return JSONResponse(
        exc.body(rid), status_code=exc.status, headers={"X-Request-Id": rid, **exc.headers}
    )


def _too_deep() -> ApiError:
    msg = f"nested deeper than {MAX_JSON_DEPTH} levels"
    return ApiError(
        422, "validation_error", f"body: {msg}", fields=[{"path": "body", "message": msg}]
    )


def _depth_ok(raw: bytes) -> bool:
    """Whether the brackets of ``raw`` nest at most MAX_JSON_DEPTH deep. Brackets inside
    strings count too, so a body that passes really is shallow; one that fails is
    parsed anyway and its real depth decides. Two byte scans in C for a flat body."""
    if raw.count(b"[") + raw.count(b"{") <= MAX_JSON_DEPTH:
        return True
    depth = 0
    for m in _BRACKETS.finditer(raw):
        depth += 1 if m.group() in b"[{" else -1
        if depth > MAX_JSON_DEPTH:
            return False
    return True


_BRACKETS = re.compile(rb"[\[\]{}]")


def _deepest(value: Any, limit: int) -> bool:
    """Whether ``value`` nests deeper than ``limit`` (walking at most limit levels)."""
    if limit < 0:
        return True
    if isinstance(value, dict):
        return any(_deepest(v, limit - 1) for v in value.values())
    if isinstance(value, list):
        return any(_deepest(v, limit - 1) for v in value)
    return False


def _unstorable_path(value: Any, loc: tuple[str | int, ...] = ()) -> tuple[str | int, ...] | None:
    if isinstance(value, str):
        return loc if _UNSTORABLE.search(value) else None
    if isinstance(value, dict):
        for k, v in value.items():
            if _UNSTORABLE.search(k):
                return (*loc, k)
            found = _unstorable_path(v, (*loc, k))
            if found is not None:
                return found
    elif isinstance(value, list):
        for i, v in enumerate(value):
            found = _unstorable_path(v, (*loc, i))
            if found is not None:
                return found
    return None


def parse_json(raw: bytes) -> Any:
    """A request body as JSON, or ApiError: 400 when it is not JSON, 422 naming the
    path when it nests too deep or holds a string that cannot be stored."""
    try:
        data = json.loads(raw)
    except RecursionError:
        raise _too_deep() from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, "invalid_json", f"the body is not JSON: {exc}") from None
    if not _depth_ok(raw) and _deepest(data, MAX_JSON_DEPTH):
        raise _too_deep()
    if _UNSTORABLE_ESCAPE.search(raw):
        loc = _unstorable_path(data)
        if loc is not None:
            path = field_path(loc) if loc else "body"
            raise ApiError(
                422,
                "validation_error",
                f"{path}: {UNSTORABLE_MESSAGE}",
                fields=[{"path": path, "message": UNSTORABLE_MESSAGE}],
            )
    return data


async def apply_changes(ctx: Any, op: Operation) -> None:
    """After a change: wait until this process's caches hold it (a domain verified is
    one mail may come From in the next request), or, for routes that change nothing
    they hold, only wake the change-feed reader. A failure to read the feed does not
    fail the change, which is committed: the reader tries again."""
    if not op.sync:
        ctx.wake()
        return
    try:
        await ctx.sync()
    except Exception as exc:
        limited(logging.WARNING, "change_feed_sync", "event=change_feed_sync_failed path=%s",
                op.path, exc=exc)  # fmt: skip
        ctx.wake()


async def authenticate(ctx: Any, request: Request) -> Principal:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(
            401,
            "unauthorized",
            "send Authorization: Bearer <key>",
            headers={"WWW-Authenticate": "Bearer"},
        )
    found = await ctx.auth.resolve(token.strip())
    if isinstance(found, TenantDisabled):
        # The key is real: its tenant may not act. Saying so spares the operator a
        # hunt for a revoked key that is not.
        raise ApiError(
            403,
            "tenant_disabled",
            f"tenant {found.tenant_name!r} is disabled; its keys may not act",
        )
    if found is None:
        raise ApiError(
            401, "unauthorized", "unknown or revoked key", headers={"WWW-Authenticate": "Bearer"}
        )
    return found


def key_requirement(op: Operation) -> str:
    """The key an operation needs, in words: ``tenant key, scope send``,
    ``operator key (admin)`` or ``no key`` (the docs page and the OpenAPI entry)."""
    if op.scope is None:
        return "no key"
    if not op.tenant:
        return "operator key (admin)"
    return f"tenant key, scope {op.scope}"


def _scopes_text(principal: Principal) -> str:
    return ", ".join(repr(s) for s in sorted(principal.scopes)) or "none"


def key_refusal(op: Operation, principal: Principal) -> str | None:
    """Why ``principal`` may not use ``op`` (the 403's message, naming what is needed
    and what the key is), or None when it may."""
    assert op.scope is not None
    if op.tenant and principal.tenant_id is None:
        return (
            f"this route needs a tenant key with the {op.scope!r} scope; this is an operator key"
            " (operator keys manage tenants and their keys, nothing inside a tenant)"
        )
    if not op.tenant and principal.tenant_id is not None:
        return (
            "this route needs an operator key (scope 'admin'); this is a key of tenant"
            f" {principal.tenant_name!r}"
        )
    if not principal.has(op.scope):
        implied = "".join(f" or {k!r}" for k, v in IMPLIES.items() if op.scope in v)
        return (
            f"this route needs the {op.scope!r} scope{implied}; this key has"
            f" {_scopes_text(principal)}"
        )
    return None


async def read_body(call: Call, limit: int, budget: BodyBudget | None) -> bytes:
    """The body, at most ``limit`` bytes (413 as soon as it is known to be larger:
    from Content-Length before reading, else when the stream passes it), its size held
    in ``budget`` until the request ends (503 when there is no room for it)."""
    request = call.request
    declared = request.headers.get("content-length")
    size_known = declared is not None and declared.isdigit()
    if size_known and int(declared or 0) > limit:
        raise _too_large(limit)

    async def hold(n: int) -> None:
        if budget is None or n <= 0:
            return
        if not await budget.reserve(n, call.reserved):
            log.warning("event=api_body_refused reason=busy bytes=%d", n)
            raise ApiError(
                503,
                "busy",
                "too many large requests at once; retry shortly",
                headers={"Retry-After": "1"},
            )
        call.reserved += n

    if size_known:
        await hold(int(declared or 0))
    chunks = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        if size > call.reserved:  # chunked, or more than declared
            await hold(size - call.reserved)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(limit: int) -> ApiError:
    return ApiError(
        413,
        "too_large",
        f"the body is larger than {limit} bytes",
        fields=[{"path": "body", "message": f"larger than {limit} bytes"}],
    )
