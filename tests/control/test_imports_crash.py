"""A process killed mid-import: the import resumes from its last committed batch when
the appliance starts again, and the final counts are exact (nothing applied twice,
nothing skipped). A real ``postwarden serve`` child, SIGKILLed, on SQLite and
PostgreSQL."""

from __future__ import annotations

import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from postwarden.store.contact_models import Contact, ContactList, ListMember
from postwarden.store.db import create_engine, sessionmaker
from postwarden.store.import_models import Import, ImportReject
from postwarden.store.models import ApiKey
from postwarden.store.secrets import new_api_key
from tests.pg import postgres  # noqa: F401  (the fixture)
from tests.queue.test_durability import serve
from tests.waiting import eventually

ROWS = 6_000
BATCH = 30


def body() -> tuple[bytes, int, int]:
    """The file, how many of its rows are bad (every 97th), how many join the list."""
    lines = ["email,name,n,list:beta"]
    bad = member = 0
    for i in range(ROWS):
        if i % 97 == 0:
            lines.append(f"broken-{i},B,{i},")
            bad += 1
            continue
        joins = i % 3 == 0
        member += joins
        lines.append(f"u{i}@example.com,User {i},{i},{'yes' if joins else ''}")
    return ("\n".join(lines) + "\n").encode(), bad, member


async def counts(url: str) -> dict[str, Any]:
    engine = create_engine(url)
    try:
        async with sessionmaker(engine)() as s:
            imp = (await s.execute(select(Import))).scalar_one()
            return {
                "state": imp.state,
                "next_record": imp.next_record,
                "rows_done": imp.rows_done,
                "rows_imported": imp.rows_imported,
                "rows_rejected": imp.rows_rejected,
                "contacts_created": imp.contacts_created,
                "contacts": (await s.execute(select(func.count()).select_from(Contact))).scalar(),
                "members": (await s.execute(select(func.count()).select_from(ListMember))).scalar(),
                "rejects": (
                    await s.execute(select(func.count()).select_from(ImportReject))
                ).scalar(),
            }
    finally:
        await engine.dispose()


async def operator_key(url: str) -> str:
    new = new_api_key()
    engine = create_engine(url)
    try:
        async with sessionmaker(engine)() as s:
            s.add(ApiKey(tenant_id=None, prefix=new.prefix, secret_hash=new.secret_hash,
                         name="test operator", scopes="admin"))  # fmt: skip
            await s.commit()
    finally:
        await engine.dispose()
    return new.plaintext


async def make_list(url: str, tenant_id: int) -> None:
    engine = create_engine(url)
    try:
        async with sessionmaker(engine)() as s:
            s.add(ContactList(tenant_id=tenant_id, name="beta"))
            await s.commit()
    finally:
        await engine.dispose()


async def child_config(
    make: Callable[..., tuple[Path, int]], overrides: dict[str, Any]
) -> tuple[Path, dict[str, Any], str, int, str]:
    """The config of a ``postwarden serve`` child: (its file, its content, the
    control plane's base URL and port, an operator key in its database)."""
    config, _smtp = make(overrides)
    conf = tomllib.loads(config.read_text())
    host, port = conf["control"]["listen"].rsplit(":", 1)
    admin = await operator_key(conf["database"]["url"])
    return config, conf, f"http://{host}:{port}", int(port), admin


def client(base: str, key: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=base, timeout=30, headers={"Authorization": f"Bearer {key}"})


@pytest.mark.parametrize("db", ["sqlite", "postgresql"])
@pytest.mark.long(15)
async def test_a_killed_import_resumes_and_counts_exactly(
    db: str,
    request: pytest.FixtureRequest,
    tmp_path: Path,
    subprocess_config: Callable[..., tuple[Path, int]],
) -> None:
    overrides: dict[str, Any] = {"control": {"import_batch": BATCH}, "server": {"workers": 1}}
    if db == "postgresql":
        overrides["database"] = {"url": request.getfixturevalue("postgres").new_database()}
    config, conf, base, port, admin = await child_config(subprocess_config, overrides)
    url = conf["database"]["url"]
    data, bad, member = body()
    log = tmp_path / "serve.log"

    async with serve([], config, port, log) as proc:
        async with client(base, admin) as c:
            tid = (await c.post("/v1/tenants", json={"name": "acme"})).json()["id"]
            r = await c.post(f"/v1/tenants/{tid}/keys", json={"name": "k", "scopes": ["manage"]})
            key = r.json()["key"]
        await make_list(url, tid)
        async with client(base, key) as c:
            r = await c.post("/v1/imports", content=data, headers={"Content-Type": "text/csv"})
            assert r.status_code == 202, r.text
            iid = r.json()["id"]

            async def some_batches() -> bool:
                got = (await c.get(f"/v1/imports/{iid}")).json()
                assert got["state"] in ("queued", "running"), f"ended before the kill: {got}"
                return bool(got["rows_done"] >= 20 * BATCH)

            await eventually(some_batches, 60, "a few batches committed", interval=0.005)
        proc.kill()
        await proc.wait()

    at_kill = await counts(url)
    assert at_kill["state"] == "running"
    assert 0 < at_kill["rows_done"] < ROWS, at_kill
    # What was committed is whole batches, and the contacts agree with the cursor.
    assert at_kill["rows_done"] % BATCH == 0
    assert at_kill["contacts"] == at_kill["rows_imported"]
    assert at_kill["rejects"] == at_kill["rows_rejected"]

    async with serve([], config, port, log):
        async with client(base, key) as c:

            async def ended() -> dict[str, Any] | None:
                got: dict[str, Any] = (await c.get(f"/v1/imports/{iid}")).json()
                return got if got["state"] not in ("queued", "running") else None

            final = await eventually(ended, 60, "the import to end after the restart")
    assert final["state"] == "done", final
    assert (final["rows_total"], final["rows_done"]) == (ROWS, ROWS)
    assert (final["rows_imported"], final["rows_rejected"]) == (ROWS - bad, bad)
    assert final["contacts_created"] == ROWS - bad
    after = await counts(url)
    assert after["contacts"] == ROWS - bad
    assert after["members"] == member
    assert after["rejects"] == bad
