"""Authentication, scopes, the error envelope, rate limits and the operator's routes."""

from __future__ import annotations

import asyncio
import sys

import pytest

from postwarden.control.auth import RateLimiter
from postwarden.store.models import ApiKey
from tests.control.conftest import ControlFactory


async def test_no_key_wrong_key_and_revoked_key_are_401(control: ControlFactory) -> None:
    api = await control()
    async with api.client() as c:
        r = await c.get("/v1/domains")
        assert r.status_code == 401
        err = r.json()["error"]
        assert err["type"] == "unauthorized" and err["request_id"] == r.headers["x-request-id"]
        assert r.headers["www-authenticate"] == "Bearer"
    # A key that looks right but is not one (forged secret on a real prefix).
    key = await api.tenant("acme")
    forged = key[:-4] + ("AAAA" if not key.endswith("AAAA") else "BBBB")
    async with api.client(forged) as c:
        assert (await c.get("/v1/domains")).status_code == 401
    async with api.client(key) as c:
        assert (await c.get("/v1/domains")).status_code == 200
        keys = (await c.get("/v1/keys")).json()["data"]
        assert len(keys) == 1 and keys[0]["prefix"] in key and "key" not in keys[0]
        r = await c.delete(f"/v1/keys/{keys[0]['id']}")
        assert r.status_code == 200 and r.json()["revoked_at"]
        assert (await c.get("/v1/domains")).status_code == 401


async def test_secrets_are_stored_hashed(control: ControlFactory) -> None:
    api = await control()
    key = await api.tenant("acme")
    async with api.app.control.sessions() as s:
        from sqlalchemy import select

        rows = (await s.execute(select(ApiKey))).scalars().all()
    assert rows and all(key not in (r.secret_hash + r.prefix + r.name) for r in rows)
    assert all(len(r.secret_hash) == 64 for r in rows)


async def test_scopes_and_key_kinds(control: ControlFactory) -> None:
    api = await control()
    reader = await api.tenant("acme", scopes=("read",))
    async with api.client(reader) as c:
        assert (await c.get("/v1/domains")).status_code == 200
        r = await c.post("/v1/domains", json={"name": "acme.test"})
        assert r.status_code == 403 and "manage" in r.json()["error"]["message"]
        # A tenant key never reaches the operator's routes.
        assert (await c.get("/v1/tenants")).status_code == 403
    async with api.client(api.admin_key) as c:
        # …and the operator key never reaches inside a tenant.
        assert (await c.get("/v1/domains")).status_code == 403
        r = await c.post("/v1/tenants", json={"name": "acme"})
        assert r.status_code == 409
        r = await c.post("/v1/tenants", json={"name": "Bad Name"})
        assert r.status_code == 422 and r.json()["error"]["fields"][0]["path"] == "name"


@pytest.mark.sqlite_only  # HTTP/SMTP-level: see tests/control/conftest.py
async def test_validation_errors_name_the_field(control: ControlFactory) -> None:
    api = await control()
    key = await api.tenant("acme")
    async with api.client(key) as c:
        r = await c.post("/v1/suppressions", json={"address": "x@example.com", "colour": "red"})
        assert r.status_code == 422
        assert r.json()["error"]["fields"] == [{"path": "colour", "message": "unknown field"}]
        r = await c.post("/v1/suppressions", json={"address": "not an address"})
        assert r.status_code == 422 and r.json()["error"]["fields"][0]["path"] == "address"
        r = await c.post("/v1/keys", json={"scopes": ["send", "fly"]})
        assert r.status_code == 422 and r.json()["error"]["fields"][0]["path"] == "scopes[1]"
        r = await c.post(
            "/v1/suppressions", content=b"{not json", headers={"content-type": "application/json"}
        )
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_json"
        r = await c.post(
            "/v1/suppressions",
            content=b"a=b",
            headers={"content-type": "application/x-www-form-urlencoded"},
        )
        assert r.status_code == 415
        r = await c.get("/v1/suppressions", params={"cursor": "!!"})
        assert r.status_code == 422 and r.json()["error"]["fields"][0]["path"] == "cursor"
        r = await c.get("/v1/suppressions", params={"colour": "red"})
        assert r.status_code == 422
        r = await c.get("/v1/nowhere")
        assert r.status_code == 404 and r.json()["error"]["type"] == "not_found"
        r = await c.put("/v1/domains")
        assert r.status_code == 405 and r.json()["error"]["type"] == "method_not_allowed"
        big = b'{"address": "' + b"a" * (1024 * 1024) + b'@example.com"}'
        r = await c.post(
            "/v1/suppressions", content=big, headers={"content-type": "application/json"}
        )
        assert r.status_code == 413


@pytest.mark.sqlite_only  # HTTP/SMTP-level: see tests/control/conftest.py
async def test_request_id_is_echoed_or_made(control: ControlFactory) -> None:
    api = await control()
    async with api.client(api.admin_key) as c:
        r = await c.get("/v1/tenants", headers={"X-Request-Id": "abc-123"})
        assert r.headers["x-request-id"] == "abc-123"
        r = await c.get("/v1/tenants", headers={"X-Request-Id": "bad id\x7f"})
        assert len(r.headers["x-request-id"]) == 16


class FakeClock:
    """A monotonic clock that moves only when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def test_rate_limiter_refills_as_its_clock_advances() -> None:
    clock = FakeClock()
    limiter = RateLimiter(rate=1, burst=3, clock=clock)
    assert [limiter.take("k") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.take("k") == pytest.approx(1.0)
    assert limiter.take("other") == 0.0  # each key its own bucket
    clock.advance(0.5)
    assert limiter.take("k") == pytest.approx(0.5)  # half a token back, not yet one
    clock.advance(0.5)
    assert limiter.take("k") == 0.0
    assert limiter.take("k") == pytest.approx(1.0)
    clock.advance(60)  # a long quiet spell refills up to the burst, no further
    assert [limiter.take("k") for _ in range(4)][3] == pytest.approx(1.0)


@pytest.mark.sqlite_only  # HTTP/SMTP-level: see tests/control/conftest.py
async def test_rate_limit_per_key(control: ControlFactory) -> None:
    api = await control({"control": {"rate_limit": 1, "rate_burst": 3}})
    # The API's limiter (set up from the config above) on a clock this test moves.
    clock = FakeClock()
    api.app.control.limiter.clock = clock
    key = await api.tenant("acme")
    clock.advance(2)  # the operator key's bucket refills (1/s, burst 3)
    other = await api.tenant("other")
    async with api.client(key) as c:
        codes = [(await c.get("/v1/domains")).status_code for _ in range(5)]
        assert codes[:3] == [200, 200, 200] and codes[3:] == [429, 429]
        r = await c.get("/v1/domains")
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
    # Another key has its own bucket.
    async with api.client(other) as c:
        assert (await c.get("/v1/domains")).status_code == 200


async def test_tenant_can_be_disabled(control: ControlFactory) -> None:
    api = await control()
    key = await api.tenant("acme")
    async with api.client(api.admin_key) as c:
        tid = (await c.get("/v1/tenants")).json()["data"][0]["id"]
        r = await c.patch(f"/v1/tenants/{tid}", json={"disabled": True})
        assert r.status_code == 200 and r.json()["disabled"] is True
    async with api.client(key) as c:
        # The key is real: its tenant may not act (403 saying so), not "unknown" (401).
        r = await c.get("/v1/domains")
        assert r.status_code == 403, r.text
        err = r.json()["error"]
        assert err["type"] == "tenant_disabled"
        assert err["message"] == "tenant 'acme' is disabled; its keys may not act"
        assert "www-authenticate" not in r.headers
    async with api.client(api.admin_key) as c:
        r = await c.patch(f"/v1/tenants/{tid}", json={"disabled": False})
        assert r.status_code == 200
    async with api.client(key) as c:
        assert (await c.get("/v1/domains")).status_code == 200


async def test_admin_create_key_cli(subprocess_config, tmp_path) -> None:  # type: ignore[no-untyped-def]
    path, _ = subprocess_config()

    async def run(*args: str) -> tuple[int, str, str]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "postwarden.cli",
            *args,
            "--config",
            str(path),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await proc.communicate()
        return proc.returncode or 0, out.decode(), err.decode()

    from postwarden.store.db import head_revision

    code, out, _ = await run("db", "current")
    assert code == 0 and f"at revision {head_revision()}" in out  # the test database comes migrated
    code, out, err = await run("admin", "create-key", "--name", "ops")
    assert code == 0 and out.startswith("pw_") and "shown once" in err
