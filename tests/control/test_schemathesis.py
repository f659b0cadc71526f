"""The published OpenAPI schema against the live API: schemathesis generates requests
from /openapi.json (valid and invalid ones) and checks every answer — no 5xx, only
documented status codes and content types, bodies that match their schemas."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from tests.conftest import VENV_BIN
from tests.control.conftest import ControlApi, ControlFactory

CHECKS = ",".join(
    (
        "not_a_server_error",
        "status_code_conformance",
        "content_type_conformance",
        "response_schema_conformance",
        "response_headers_conformance",
    )
)


def phases(api: ControlApi) -> tuple[str, ...]:
    """Each phase once, on the database where it finds most. PostgreSQL: the coverage
    phase, the boundary values of each parameter (64-bit ids, lengths, NUL and other
    characters, times), which PostgreSQL refuses where SQLite stores them without a
    word. SQLite: the rest (the schema's examples, fuzzing, the stateful sequences),
    which exercise the routes themselves, the same on both."""
    if api.app.cfg.database.url.startswith("postgresql"):
        return ("--phases", "coverage")
    return ("--phases", "examples,fuzzing,stateful")


async def schemathesis(base: str, key: str, tmp: Path, *extra: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        str(VENV_BIN / "schemathesis"),
        "run",
        f"{base}/openapi.json",
        "--checks",
        CHECKS,
        "-H",
        f"Authorization: Bearer {key}",
        "--max-examples",
        # Per operation, for the fuzzing and stateful phases (the coverage phase tries
        # every boundary value whatever this is); 6 keeps `make test` in its budget as
        # routes grow (they tripled with issue 20, and grew again with 21): set
        # POSTWARDEN_SCHEMATHESIS_EXAMPLES=100 for a deeper run.
        os.environ.get("POSTWARDEN_SCHEMATHESIS_EXAMPLES", "6"),
        "--seed",
        "1",
        "--no-color",
        "--request-timeout",
        "20",
        "--workers",
        "1",
        "--generation-database",
        "none",
        *extra,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        cwd=tmp,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 600)
    return proc.returncode or 0, out.decode()


# The tenant routes in three runs of about the same length (pytest-xdist spreads them).
TENANT_GROUPS = {
    "sending": "^/v1/(domains|keys|suppressions|messages|events)",
    "engagement": "^/v1/(shaping|tracking|webhooks|analytics)",
    "contacts": "^/v1/(contacts|contact-attributes|lists|topics|imports|data-sources)",
    "content": "^/v1/(audiences|templates|campaigns)",
}


def test_the_groups_cover_every_tenant_route() -> None:
    import importlib
    import pkgutil
    import re

    import postwarden.control
    from postwarden.control.api import api

    for mod in pkgutil.iter_modules(postwarden.control.__path__):
        importlib.import_module(f"postwarden.control.{mod.name}")  # each declares its ops
    tenant = [op.path for op in api.ops if op.tenant]
    assert len(tenant) > 50
    for rx in TENANT_GROUPS.values():
        assert any(re.match(rx, path) for path in tenant), rx
    assert [p for p in tenant if not any(re.match(rx, p) for rx in TENANT_GROUPS.values())] == []


# PostgreSQL: the coverage phase (see phases()) in three runs that pytest-xdist spreads
# over its workers. SQLite: the other phases over every tenant route in one run, so that
# the stateful sequences follow links from one group to another (an audience and a
# template into a campaign).
TENANT_RUNS = [("postgresql", g) for g in sorted(TENANT_GROUPS)] + [("sqlite", "all")]


@pytest.mark.parametrize(("control", "group"), TENANT_RUNS, indirect=["control"])
@pytest.mark.long(10)
async def test_tenant_routes_conform_to_the_schema(
    control: ControlFactory, tmp_path: Path, group: str
) -> None:
    api = await control({"control": {"rate_limit": 100000, "rate_burst": 100000}})
    api.lab.add_domain("inbox.test")
    key = await api.tenant("acme")
    await api.verified_domain(key, "acme.test")
    # Revoking its own key would leave the run with 401s only (revocation has its test).
    code, out = await schemathesis(
        api.base,
        key,
        tmp_path,
        "--include-path-regex",
        "|".join(TENANT_GROUPS.values()) if group == "all" else TENANT_GROUPS[group],
        "--exclude-operation-id",
        "revoke_key",
        *phases(api),
    )
    assert code == 0, out[-6000:]


@pytest.mark.long(8)
async def test_operator_routes_conform_to_the_schema(
    control: ControlFactory, tmp_path: Path
) -> None:
    api = await control({"control": {"rate_limit": 100000, "rate_burst": 100000}})
    await api.tenant("acme")  # a tenant with a key: its keys and messages are listed
    # Not revoking operator keys: the run's own is among them.
    code, out = await schemathesis(
        api.base,
        api.admin_key,
        tmp_path,
        "--include-path-regex",
        "^/v1/(tenants|pools|operator-keys|analytics/appliance)",
        "--exclude-operation-id",
        "revoke_operator_key",
        *phases(api),
    )
    assert code == 0, out[-6000:]
