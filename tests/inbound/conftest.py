"""Fixtures for the inbound MX: an appliance listening on ``inbound.listen`` (loopback,
any free port), its control API, and a tenant to register sending domains with."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest

from postwarden.appliance import Appliance
from postwarden.bounces.inbox import Inbox
from postwarden.lab import Lab
from tests.conftest import ApplianceFactory, deep_merge
from tests.control.conftest import ControlApi, make_admin_key


@dataclass
class InboundMx:
    app: Appliance
    api: ControlApi
    tenant_key: str

    @property
    def address(self) -> tuple[str, int]:
        return self.app.inbound_addresses[0]

    @property
    def inbox(self) -> Inbox:
        assert self.app.inbox is not None
        return self.app.inbox

    async def register(self, name: str) -> int:
        """Register a sending domain through the API (not verified); its id."""
        async with self.api.client(self.tenant_key) as c:
            r = await c.post("/v1/domains", json={"name": name})
            assert r.status_code == 201, r.text
            domain_id: int = r.json()["id"]
        return domain_id

    async def unregister(self, domain_id: int) -> None:
        async with self.api.client(self.tenant_key) as c:
            r = await c.delete(f"/v1/domains/{domain_id}")
            assert r.status_code == 200, r.text

    async def wait_accepts(self, domain: str, want: bool = True, timeout: float = 10) -> None:
        """Until the control plane's cache (fed by the change feed) says ``want``."""
        deadline = time.monotonic() + timeout
        while self.app.control.inbound.accepts(domain) != want:
            assert time.monotonic() < deadline, f"accepts_inbound({domain!r}) != {want}"
            await asyncio.sleep(0.05)


InboundFactory = Callable[..., Awaitable[InboundMx]]


@pytest.fixture
async def inbound_mx(appliance: ApplianceFactory, lab: Lab) -> InboundFactory:
    async def make(overrides: dict[str, Any] | None = None) -> InboundMx:
        app = await appliance(deep_merge({"inbound": {"listen": ["127.0.0.1:0"]}}, overrides or {}))
        assert app.control_address is not None
        host, port = app.control_address
        api = ControlApi(app, f"http://{host}:{port}", await make_admin_key(app), lab)
        return InboundMx(app, api, await api.tenant("acme"))

    return make
