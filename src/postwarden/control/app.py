"""The control plane's HTTP application (Starlette): health and metrics for now."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route


def create_app(
    metrics: Callable[[], bytes], health: Callable[[], tuple[bool, dict[str, Any]]]
) -> Starlette:
    """Routes served on ``control.listen``.

    ``metrics`` renders the Prometheus text exposition; ``health`` says whether the
    appliance is serving, with details. In one process both come from the appliance;
    with workers, from the supervisor (the sum over workers, and the workers alive).
    """

    async def metrics_route(_: Request) -> Response:
        return Response(metrics(), media_type=CONTENT_TYPE_LATEST)

    async def healthz(_: Request) -> JSONResponse:
        ok, details = health()
        return JSONResponse(
            {"status": "ok" if ok else "stopping", **details}, status_code=200 if ok else 503
        )

    return Starlette(routes=[Route("/metrics", metrics_route), Route("/healthz", healthz)])
