"""Fixtures for the control plane: an appliance with its API on loopback, an operator
key, and helpers to make tenants and publish a domain's records in the lab DNS."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from postwarden.appliance import Appliance
from postwarden.lab import Lab
from postwarden.store.models import ApiKey
from postwarden.store.secrets import new_api_key
from tests.conftest import deep_merge
from tests.pg import postgres  # noqa: F401  (the fixture)
from tests.waiting import eventually


@dataclass
class ControlApi:
    app: Appliance
    base: str
    admin_key: str
    lab: Lab

    def client(self, key: str | None = None, **kw: Any) -> httpx.AsyncClient:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.AsyncClient(base_url=self.base, headers=headers, timeout=30, **kw)

    async def tenant(self, name: str, scopes: tuple[str, ...] = ("send", "read", "manage")) -> str:
        """Create a tenant and return a key of it with ``scopes``."""
        async with self.client(self.admin_key) as c:
            r = await c.post("/v1/tenants", json={"name": name})
            assert r.status_code == 201, r.text
            tid = r.json()["id"]
            r = await c.post(f"/v1/tenants/{tid}/keys", json={"name": "k", "scopes": list(scopes)})
            assert r.status_code == 201, r.text
            key: str = r.json()["key"]
            return key

    def publish(self, domain: dict[str, Any], *, skip: tuple[str, ...] = ()) -> None:
        """Put the records the API asked for into the lab DNS (but those in ``skip``)."""
        for rec in domain["records"]:
            if rec["purpose"] in skip:
                continue
            self.lab.dns.remove(rec["name"], rec["type"])
            self.lab.dns.add(rec["name"], rec["type"], rec["value"])

    async def verified_domain(self, key: str, name: str) -> dict[str, Any]:
        async with self.client(key) as c:
            r = await c.post("/v1/domains", json={"name": name})
            assert r.status_code == 201, r.text
            self.publish(r.json())
            r = await c.post(f"/v1/domains/{r.json()['id']}/verify")
            assert r.status_code == 200 and r.json()["verified"], r.text
            out: dict[str, Any] = r.json()
            return out


async def make_admin_key(app: Appliance) -> str:
    new = new_api_key()
    async with app.control.sessions() as s:
        s.add(
            ApiKey(
                tenant_id=None,
                prefix=new.prefix,
                secret_hash=new.secret_hash,
                name="test operator",
                scopes="admin",
            )
        )
        await s.commit()
    return new.plaintext


async def domain_in_force(api: ControlApi, domain: str) -> None:
    """The process's cache of verified domains follows the change feed: wait for it."""
    await eventually(
        lambda: any(domain in d for d in api.app.control.verified.values()),
        15,
        f"{domain} in the verified-domain cache",
    )


ControlFactory = Callable[..., Awaitable[ControlApi]]


@pytest.fixture(params=["sqlite", "postgresql"])
async def control(
    request: pytest.FixtureRequest, appliance: Any, lab: Lab
) -> AsyncIterator[ControlFactory]:
    """An appliance with its API; every test using it runs on SQLite and on PostgreSQL."""
    db: dict[str, Any] = {}
    if request.param == "postgresql":
        server = request.getfixturevalue("postgres")
        db = {"database": {"url": server.new_database()}}

    async def make(overrides: dict[str, Any] | None = None) -> ControlApi:
        app = await appliance(deep_merge(db, overrides or {}))
        assert app.control_address is not None
        host, port = app.control_address
        return ControlApi(app, f"http://{host}:{port}", await make_admin_key(app), lab)

    yield make
