"""Fixtures for the control plane: an appliance with its API on loopback, an operator
key, and helpers to make tenants and publish a domain's records in the lab DNS."""

from __future__ import annotations

import functools
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from postwarden.appliance import Appliance
from postwarden.lab import Lab
from postwarden.store.db import upgrade_sync
from postwarden.store.models import ApiKey
from postwarden.store.secrets import new_api_key
from tests.conftest import deep_merge
from tests.pg import postgres  # noqa: F401  (the fixture)
from tests.waiting import eventually


@functools.cache
def tls_context() -> ssl.SSLContext:
    """One TLS context for the tests' HTTP clients: httpx builds one per client
    otherwise, loading the system's CA certificates each time (23 ms of CPU, for
    clients that only speak plain HTTP to the appliance)."""
    return ssl.create_default_context()


@dataclass
class ControlApi:
    app: Appliance
    base: str
    admin_key: str
    lab: Lab

    def client(self, key: str | None = None, **kw: Any) -> httpx.AsyncClient:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        kw.setdefault("verify", tls_context())
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
        lambda: any(domain in d for d in api.app.control.signing.verified.values()),
        15,
        f"{domain} in the verified-domain cache",
    )


ControlFactory = Callable[..., Awaitable[ControlApi]]


# Which database a test runs on. The `control` fixture runs each test twice, on SQLite
# and on PostgreSQL, and that stays the default: a test whose subject touches the
# database (queries and listings, migrations, outages, transactions, isolation,
# idempotency, events, keys, suppressions, the change feed, strings PostgreSQL cannot
# store, schemathesis' boundary values: its other phases run on SQLite) runs on both.
# A test whose subject is the HTTP or SMTP layer (error envelopes, request ids, the
# docs page, body limits, validation answers that never reach the database, header
# checks) learns nothing more from PostgreSQL: it is marked `@pytest.mark.sqlite_only`
# (or a module's `pytestmark`) and runs on SQLite alone. When unsure, leave a test on
# both.
SQLITE_ONLY = "sqlite_only"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", f"{SQLITE_ONLY}: an HTTP/SMTP-level test; `control` runs it on SQLite only"
    )


@pytest.hookimpl(tryfirst=True)
def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    # As a parametrize mark on the test (what tests/lab/test_publish.py writes by
    # hand), before pytest expands marks and the fixture's own params.
    marks = list(metafunc.definition.iter_markers("parametrize"))
    if any("control" in str(m.args[0]) for m in marks):
        return  # the test chose its database itself
    if "control" in metafunc.fixturenames and metafunc.definition.get_closest_marker(SQLITE_ONLY):
        only = pytest.mark.parametrize("control", ["sqlite"], indirect=True)
        metafunc.definition.add_marker(only)


@pytest.fixture(params=["sqlite", "postgresql"])
def migrated_url(request: pytest.FixtureRequest, tmp_path: Any) -> str:
    """An empty control database at the newest revision: SQLite in the test's
    directory, or a fresh database of the private PostgreSQL."""
    if request.param == "postgresql":
        url: str = request.getfixturevalue("postgres").new_database()
        return url
    url = f"sqlite+aiosqlite:///{tmp_path / 'control.db'}"
    upgrade_sync(url)
    return url


@pytest.fixture(params=["sqlite", "postgresql"])
async def control(
    request: pytest.FixtureRequest, appliance: Any, lab: Lab
) -> AsyncIterator[ControlFactory]:
    """An appliance with its API, on SQLite and on PostgreSQL (or on SQLite alone for
    a test marked sqlite_only: see the rule above)."""
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
