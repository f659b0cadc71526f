"""What the lab serves on the control listener: its inbox, read-only, to loopback
clients."""

from __future__ import annotations

import asyncio
import ipaddress
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from starlette.routing import Route

    from postwarden.lab.inbox import LabInbox

#: Most messages one ``GET /lab/messages`` lists.
MAX_LIST = 1000


def inbox_routes(inbox: LabInbox) -> list[Route]:
    """``GET /lab/messages`` (``?to=ADDRESS|DOMAIN&limit=N``, newest first),
    ``GET /lab/messages/{id}`` (JSON with the raw message) and
    ``GET /lab/messages/{id}/raw`` (``message/rfc822``, exactly as received).

    Read-only, without a key, and only to loopback clients: the lab's control
    listener is on loopback by default, and the inbox holds whatever anyone sent.
    """
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    from postwarden.control.errors import ApiError, invalid, not_found
    from postwarden.control.routing import error_response

    def rid(request: Request) -> str:
        return request.headers.get("x-request-id", "")[:64] or "-"

    def refused(request: Request) -> Response | None:
        if _loopback(request.client.host if request.client else ""):
            return None
        err = ApiError(403, "forbidden", "the lab inbox is served to loopback clients only")
        return error_response(err, rid(request))

    async def list_messages(request: Request) -> Response:
        if (no := refused(request)) is not None:
            return no
        to = request.query_params.get("to") or None
        text = request.query_params.get("limit", "100")
        if not text.isdigit() or not 1 <= int(text) <= MAX_LIST:
            return error_response(
                invalid("limit", f"must be an integer from 1 to {MAX_LIST}"), rid(request)
            )
        found = await asyncio.to_thread(inbox.list, to, int(text))
        return JSONResponse({"data": [m.summary() for m in found]})

    async def one(request: Request, raw: bool) -> Response:
        if (no := refused(request)) is not None:
            return no
        msg_id = request.path_params["id"]
        try:
            if raw:
                data = await asyncio.to_thread(inbox.raw, msg_id)
                return Response(data, media_type="message/rfc822")
            return JSONResponse(await asyncio.to_thread(inbox.detail, msg_id))
        except KeyError:
            return error_response(not_found(f"lab message {msg_id}"), rid(request))

    async def get_message(request: Request) -> Response:
        return await one(request, raw=False)

    async def get_raw(request: Request) -> Response:
        return await one(request, raw=True)

    return [
        Route("/lab/messages", list_messages, methods=["GET"]),
        Route("/lab/messages/{id}", get_message, methods=["GET"]),
        Route("/lab/messages/{id}/raw", get_raw, methods=["GET"]),
    ]


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return False
