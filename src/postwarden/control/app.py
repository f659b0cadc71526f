"""The control plane's HTTP application (Starlette): the /v1 API, its OpenAPI schema
and docs page, health and metrics."""

from __future__ import annotations

import html
import time
from collections.abc import Callable
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from postwarden.control.errors import ApiError
from postwarden.control.routing import (
    KEY_EXTENSION,
    RequestIdMiddleware,
    error_response,
    request_id,
)
from postwarden.metrics import Metrics, token_matches

#: Methods counted by name (any other: ``other``): the label stays bounded.
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class HttpMetricsMiddleware:
    """Counts every HTTP request (postwarden_http_requests_total) and times it
    (postwarden_http_request_seconds) by the template of the route that matched
    (``/v1/campaigns/{campaign_id}``; ``other`` when none did), never by its path. The
    router names the route in the scope it shares with this middleware; the label
    children are kept per (route, method, status), so a request costs two dict look-ups
    and a clock read."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics
        self._children: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500  # no answer begun: the error handler outside answers 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope.get("route")
            template = getattr(route, "path_format", None) or "other"
            method = scope["method"] if scope["method"] in _METHODS else "other"
            key = (template, method, status // 100)
            children = self._children.get(key)
            if children is None:
                m = self.metrics
                children = self._children[key] = (
                    m.http_requests.labels(template, method, f"{key[2]}xx"),
                    m.http_latency.labels(template),
                )
            children[0].inc()
            children[1].observe(time.perf_counter() - start)


def _middleware(http_metrics: Metrics | None) -> list[Middleware]:
    counted = [Middleware(HttpMetricsMiddleware, http_metrics)] if http_metrics else []
    return [*counted, Middleware(RequestIdMiddleware)]


def metrics_route(metrics: Callable[[], bytes], token: bytes | None) -> Route:
    """``/metrics``; with ``token`` (the SHA-256 of metrics' bearer token), only for a
    request that presents it."""

    async def serve(request: Request) -> Response:
        if token is not None and not token_matches(token, request.headers.get("authorization", "")):
            err = ApiError(
                401,
                "unauthorized",
                "send Authorization: Bearer <metrics token>",
                headers={"WWW-Authenticate": "Bearer"},
            )
            return error_response(err, request_id(request))
        return Response(metrics(), media_type=CONTENT_TYPE_LATEST)

    return Route("/metrics", serve)


def metrics_app(
    metrics: Callable[[], bytes], token: bytes | None, http_metrics: Metrics | None = None
) -> Starlette:
    """What ``metrics.listen`` serves: ``/metrics`` alone (its requests counted in
    ``http_metrics``, when given)."""
    return Starlette(
        routes=[metrics_route(metrics, token)],
        exception_handlers={HTTPException: http_error},
        middleware=_middleware(http_metrics),
    )


def create_app(
    metrics: Callable[[], bytes],
    health: Callable[[], tuple[bool, dict[str, Any]]],
    plane: Any = None,
    *,
    metrics_token: bytes | None = None,
    serve_metrics: bool = True,
    extra_routes: list[Route] | None = None,
    http_metrics: Metrics | None = None,
) -> Starlette:
    """Routes served on ``control.listen``; with ``http_metrics``, every request
    counted and timed there by route template (:class:`HttpMetricsMiddleware`).

    ``metrics`` renders the Prometheus text exposition (served here unless
    ``serve_metrics`` is off: metrics.listen serves it); ``health`` says whether the
    appliance is serving, with details. With a control plane (``plane``), the /v1 API,
    ``/openapi.json`` and ``/docs`` are served too. ``extra_routes`` are added as they
    are (the lab's inbox, under ``postwarden lab``).
    """

    def state() -> tuple[str, dict[str, Any]]:
        ok, details = health()
        if not ok:
            return "stopping", details
        db = details.get("database") or {}
        if db.get("state") == "down" or db.get("control_plane") == "starting":
            down = ["database"] if db.get("state") == "down" else []
            return "degraded", {**details, "down": down or ["control_plane"]}
        return "ok", details

    async def healthz(_: Request) -> JSONResponse:
        """Liveness: 200 while the process serves (``ok``, or ``degraded`` with what
        is down: mail still flows without the database); 503 when it is stopping."""
        status, details = state()
        code = 503 if status == "stopping" else 200
        return JSONResponse({"status": status, **details}, status_code=code)

    async def readyz(_: Request) -> JSONResponse:
        """Readiness, for a load balancer in front of the API: 200 only when the
        API can answer (the database up, the control plane started)."""
        status, details = state()
        return JSONResponse(
            {"status": status, **details}, status_code=200 if status == "ok" else 503
        )

    routes = [Route("/healthz", healthz), Route("/readyz", readyz)]
    if serve_metrics:
        routes.append(metrics_route(metrics, metrics_token))
    if plane is not None:
        from postwarden.control.api import api
        from postwarden.control.openapi import openapi_bytes, openapi_document

        # Each resource module declares its operations on ``api`` when imported; this
        # order is the order of the route table, /openapi.json and /docs.
        # isort: off
        from postwarden.control import tenants  # noqa: F401
        from postwarden.control import pools  # noqa: F401
        from postwarden.control import keys  # noqa: F401
        from postwarden.control import domains_api  # noqa: F401
        from postwarden.control import suppressions  # noqa: F401
        from postwarden.control import contacts  # noqa: F401
        from postwarden.control import lists  # noqa: F401
        from postwarden.control import topics  # noqa: F401
        from postwarden.control import message_list  # noqa: F401
        from postwarden.control import messages  # noqa: F401
        from postwarden.control import event_list  # noqa: F401
        from postwarden.control import shaping_api  # noqa: F401
        from postwarden.control import templates  # noqa: F401
        from postwarden.control import audiences  # noqa: F401
        from postwarden.control import imports  # noqa: F401
        from postwarden.control import data_sources  # noqa: F401
        from postwarden.control import campaigns  # noqa: F401
        from postwarden.control import campaign_ab  # noqa: F401
        from postwarden.control import campaign_dry_run  # noqa: F401
        from postwarden.control import tracking_keys  # noqa: F401
        from postwarden.control import privacy  # noqa: F401
        from postwarden.control import webhooks  # noqa: F401
        from postwarden.control import analytics  # noqa: F401
        # isort: on

        # Built at the first request for it, once per process (0.2 s: not at every
        # start of an app).
        async def openapi(_: Request) -> Response:
            return Response(openapi_bytes(api), media_type="application/json")

        async def docs(_: Request) -> HTMLResponse:
            return HTMLResponse(docs_page(openapi_document(api)))

        from postwarden.control import preferences, tracking, unsubscribe

        # Public links in mail (no key) first: the pixel and the redirects are hit by
        # every recipient, and Starlette tries routes in order (90-odd API routes
        # cost a pixel 40 µs and more). Then List-Unsubscribe, the preference center,
        # and the extra routes (the lab's inbox; a benchmark's baseline).
        public = [
            *tracking.routes(plane),
            *unsubscribe.routes(plane),
            *preferences.routes(plane),
            *(extra_routes or []),
        ]
        routes = [
            *public,
            *routes,
            Route("/openapi.json", openapi),
            Route("/docs", docs),
            *api.routes(plane),
        ]
    else:
        routes += extra_routes or []

    return Starlette(
        routes=routes,
        exception_handlers={HTTPException: http_error},
        middleware=_middleware(http_metrics),
    )


async def http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own answers (no route: 404; a route without the method: 405) in the
    API's envelope, with the request's id."""
    assert isinstance(exc, HTTPException)
    kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    path = request.url.path[:200]
    if exc.status_code == 404:
        message = f"nothing at {path}: /docs lists the paths and the form of their parameters"
    elif exc.status_code == 405:
        allowed = ", ".join(sorted(filter(None, (exc.headers or {}).get("Allow", "").split(", "))))
        message = f"{path} does not take {request.method}" + (
            f"; it takes {allowed}" if allowed else ""
        )
    else:
        message = str(exc.detail)
    err = ApiError(exc.status_code, kind, message)
    resp = error_response(err, request_id(request))
    if exc.headers:
        resp.headers.update(exc.headers)
    return resp


def docs_page(schema: dict[str, Any]) -> str:
    """A plain page listing every operation: readable without JavaScript or a CDN."""
    rows = []
    for path, ops in schema["paths"].items():
        for method, op in ops.items():
            key = op.get(KEY_EXTENSION, "no key")
            rows.append(
                f"<tr><td><code>{method.upper()}</code></td><td><code>{html.escape(path)}"
                f"</code></td><td>{html.escape(op.get('summary', ''))}</td>"
                f"<td>{html.escape(key)}</td></tr>"
            )
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>Postwarden API</title>"
        "<style>body{font-family:sans-serif;margin:2em}td{padding:.2em 1em}</style></head>"
        "<body><h1>Postwarden API</h1><p>Machine-readable schema: "
        "<a href='/openapi.json'>/openapi.json</a> (OpenAPI 3.1). Authenticate with "
        "<code>Authorization: Bearer &lt;key&gt;</code>: a tenant key with the scope"
        " named, or an operator key.</p><table><tr><th>method</th><th>path</th>"
        "<th>what</th><th>key</th></tr>" + "".join(rows) + "</table></body></html>"
    )
