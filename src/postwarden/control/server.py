"""Run the control plane's HTTP application with uvicorn inside an existing event loop."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Generator
from typing import Any

import uvicorn


class _QuietServer(uvicorn.Server):
    """uvicorn leaves the signals alone: SIGTERM and SIGHUP belong to the appliance,
    and uvicorn's ``serve`` would otherwise take them over while it runs."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


class HttpServer:
    """The control plane's HTTP listener, inside the appliance's event loop."""

    def __init__(
        self, app: Any, host: str = "127.0.0.1", port: int = 0, *, sock: socket.socket | None = None
    ) -> None:
        config = uvicorn.Config(
            app,
            host=host,
            port=port,
            log_level="warning",
            access_log=False,
            lifespan="off",
            server_header=False,
        )
        self._server = _QuietServer(config)
        self._sock = sock  # an inherited listening socket (a worker's), else bind host:port
        self._task: asyncio.Task[None] | None = None
        self.address: tuple[str, int] | None = None

    async def start(self) -> tuple[str, int]:
        socks = [self._sock] if self._sock is not None else None
        self._task = asyncio.create_task(self._server.serve(sockets=socks))
        while not self._server.started:
            if self._task.done():
                self._task.result()
                raise RuntimeError("control plane failed to start")
            await asyncio.sleep(0.01)
        sock = self._server.servers[0].sockets[0]
        self.address = sock.getsockname()[:2]
        return self.address

    async def stop(self) -> None:
        self._server.should_exit = True
        if self._task is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._task, 5)
