"""The control plane's HTTP application (Starlette): health and metrics for now."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

if TYPE_CHECKING:
    from postwarden.appliance import Appliance


def create_app(appliance: Appliance) -> Starlette:
    """Routes served on ``control.listen``."""

    async def metrics(_: Request) -> Response:
        return Response(generate_latest(appliance.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def healthz(_: Request) -> JSONResponse:
        ok = not appliance.spool.closed
        return JSONResponse(
            {
                "status": "ok" if ok else "stopping",
                "inflight": appliance.scheduler.inflight,
                "sessions_in": appliance.ingress.open_sessions,
                "sessions_out": appliance.scheduler.sessions,
            },
            status_code=200 if ok else 503,
        )

    return Starlette(routes=[Route("/metrics", metrics), Route("/healthz", healthz)])
