"""Pools (issue 7) through the API: the operator's CRUD with its validation paths,
pools of the configuration read-only, a pool in use not deleted; tenants' default
and allowed pools; a message naming a pool and a priority, which reach the spool."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
from sqlalchemy import select

from postwarden.control.plane import ControlPlane
from postwarden.control.pool_cache import PoolNotAllowed
from postwarden.queue.admin import QueueAdmin
from postwarden.store.models import Change
from postwarden.values import LANE_BULK, LANE_HIGH
from tests.control.conftest import ControlApi, ControlFactory
from tests.control.test_messages import ready_tenant
from tests.mta.test_ingress_pools import spooled as spooled_message
from tests.waiting import eventually

# Two sources and a pool of the configuration ("default", all sources, comes with it).
POOLS: dict[str, Any] = {
    "sources": [
        {"name": "a", "address": "127.0.0.1"},
        {"name": "b", "address": "127.0.0.1"},
    ],
    "pools": [{"name": "cfg", "members": [{"source": "a", "weight": 2}]}],
}


def field(r: httpx.Response) -> tuple[int, str, str]:
    """(status, the first field path, its message) of an error answer."""
    err = r.json()["error"]
    first = (err.get("fields") or [{"path": "", "message": err["message"]}])[0]
    return r.status_code, first["path"], first["message"]


def spooled(api: ControlApi, msg_id: str) -> dict[str, Any]:
    return spooled_message(api.app.cfg.spool.path, msg_id)


async def test_pool_crud_and_validation(control: ControlFactory) -> None:
    api = await control(POOLS)
    async with api.client(api.admin_key) as c:
        r = await c.get("/v1/pools")
        assert r.status_code == 200, r.text
        listed = {p["name"]: p for p in r.json()["data"]}
        assert listed["cfg"]["origin"] == "config"
        assert listed["cfg"]["members"] == [{"source": "a", "weight": 2}]
        assert listed["default"]["origin"] == "config"
        assert {m["source"] for m in listed["default"]["members"]} == {"a", "b"}
        assert r.json()["next_cursor"] is None

        body = {
            "name": "warm_1",
            "members": [{"source": "a", "weight": 1}, {"source": "b", "weight": 3}],
            "overflow": "spill",
        }
        r = await c.post("/v1/pools", json=body)
        assert r.status_code == 201, r.text
        made = r.json()
        assert made["origin"] == "api" and made["overflow"] == "spill"
        assert made["members"] == body["members"] and made["created_at"]
        assert (await c.post("/v1/pools", json=body)).status_code == 409

        # The configuration's names are taken, "default" included.
        for name in ("cfg", "default"):
            r = await c.post("/v1/pools", json={**body, "name": name})
            assert r.status_code == 409 and "configuration" in r.json()["error"]["message"]

        bad: list[tuple[dict[str, Any], str, str]] = [
            ({"members": [{"source": "a"}, {"source": "x"}]}, "members[1].source", "no source"),
            ({"members": [{"source": "a", "weight": 0}]}, "members[0].weight", "greater than 0"),
            ({"members": [{"source": "a", "weight": -2}]}, "members[0].weight", "greater than 0"),
            ({"members": []}, "members", ""),
            ({"members": [{"source": "a"}, {"source": "a"}]}, "members[1].source", "twice"),
            ({"name": "Bad"}, "name", ""),
            ({"name": "-x"}, "name", ""),
            ({"name": "x" * 65}, "name", ""),
            ({"overflow": "maybe"}, "overflow", ""),
            ({"colour": "red"}, "colour", "unknown field"),
        ]
        for change, path, words in bad:
            r = await c.post("/v1/pools", json={**body, "name": "other", **change})
            status, got, message = field(r)
            assert (status, got) == (422, path), (change, r.text)
            assert words in message, (change, message)
        r = await c.post("/v1/pools", json={**body, "name": "other", "members": [{"source": "x"}]})
        assert r.json()["error"]["message"] == "members[0].source: no source named 'x'"

        r = await c.get("/v1/pools/warm_1")
        assert r.status_code == 200 and r.json() == made
        assert (await c.get("/v1/pools/cfg")).json()["origin"] == "config"
        assert (await c.get("/v1/pools/nope")).status_code == 404
        assert (await c.get("/v1/pools/NOT%20A%20NAME")).status_code == 404

        r = await c.patch("/v1/pools/warm_1", json={"members": [{"source": "b", "weight": 5}]})
        assert r.status_code == 200, r.text
        assert r.json()["members"] == [{"source": "b", "weight": 5}]
        assert r.json()["overflow"] == "spill" and r.json()["updated_at"] >= made["updated_at"]
        r = await c.patch("/v1/pools/warm_1", json={"overflow": "wait"})
        assert r.json()["overflow"] == "wait" and r.json()["members"][0]["source"] == "b"
        # This process's cache has it at once (the others from the change feed).
        pool = api.app.control.pool_cache.members("warm_1")
        assert pool is not None and pool.overflow == "wait"
        assert [(m.source, m.weight) for m in pool.members] == [("b", 5)]
        r = await c.patch("/v1/pools/warm_1", json={"members": [{"source": "zz"}]})
        assert field(r)[:2] == (422, "members[0].source")
        assert field(await c.patch("/v1/pools/warm_1", json={"members": []}))[:2] == (
            422,
            "members",
        )
        for name in ("cfg", "default"):
            r = await c.patch(f"/v1/pools/{name}", json={"overflow": "spill"})
            assert r.status_code == 409 and "configuration" in r.json()["error"]["message"]
            assert (await c.delete(f"/v1/pools/{name}")).status_code == 409
        assert (await c.patch("/v1/pools/nope", json={})).status_code == 404

        # In use by a tenant (default or allowed pool): not deleted.
        r = await c.post("/v1/tenants", json={"name": "acme", "allowed_pools": ["warm_1"]})
        assert r.status_code == 201, r.text
        tid = r.json()["id"]
        r = await c.delete("/v1/pools/warm_1")
        assert r.status_code == 409 and "acme" in r.json()["error"]["message"]
        await c.patch(f"/v1/tenants/{tid}", json={"allowed_pools": [], "default_pool": "warm_1"})
        assert (await c.delete("/v1/pools/warm_1")).status_code == 409
        await c.patch(f"/v1/tenants/{tid}", json={"default_pool": None})
        r = await c.delete("/v1/pools/warm_1")
        assert r.status_code == 200 and r.json() == {"deleted": True}
        assert (await c.get("/v1/pools/warm_1")).status_code == 404
        assert (await c.delete("/v1/pools/warm_1")).status_code == 404
        assert api.app.control.pool_cache.members("warm_1") is None
        names = [p["name"] for p in (await c.get("/v1/pools")).json()["data"]]
        assert sorted(names) == ["cfg", "default"]
    # Every write is on the change feed.
    async with api.app.control.sessions() as s:
        refs = (await s.execute(select(Change.ref).where(Change.kind == "pool"))).scalars()
        assert list(refs) == ["warm_1"] * 4
    # Pools are the operator's: a tenant's key is refused.
    key = await api.tenant("other")
    async with api.client(key) as c:
        assert (await c.get("/v1/pools")).status_code == 403
        assert (await c.post("/v1/pools", json=body)).status_code == 403


async def test_tenant_default_and_allowed_pools(control: ControlFactory) -> None:
    api = await control(POOLS)
    async with api.client(api.admin_key) as c:
        r = await c.post("/v1/pools", json={"name": "warm", "members": [{"source": "b"}]})
        assert r.status_code == 201
        r = await c.post("/v1/tenants", json={"name": "acme", "default_pool": "nope"})
        assert field(r) == (422, "default_pool", "no pool named 'nope'")
        r = await c.post("/v1/tenants", json={"name": "acme", "allowed_pools": ["cfg", "nope"]})
        assert field(r)[:2] == (422, "allowed_pools[1]")
        r = await c.post("/v1/tenants", json={"name": "acme", "allowed_pools": ["Not-A-Name"]})
        assert field(r)[:2] == (422, "allowed_pools[0]")
        assert (await c.get("/v1/tenants")).json()["data"] == []  # nothing was made
        r = await c.post(
            "/v1/tenants",
            json={"name": "acme", "default_pool": "warm", "allowed_pools": ["cfg", "cfg"]},
        )
        assert r.status_code == 201, r.text
        t = r.json()
        assert t["default_pool"] == "warm" and t["allowed_pools"] == ["cfg"]
        r = await c.post("/v1/tenants", json={"name": "plain"})
        assert r.json()["default_pool"] is None and r.json()["allowed_pools"] == []
        plain = r.json()["id"]
        # A PATCH that does not name them keeps them; null takes the default away.
        r = await c.patch(f"/v1/tenants/{t['id']}", json={"disabled": False})
        assert r.json()["default_pool"] == "warm" and r.json()["allowed_pools"] == ["cfg"]
        r = await c.patch(f"/v1/tenants/{t['id']}", json={"allowed_pools": ["default", "x"]})
        assert field(r)[:2] == (422, "allowed_pools[1]")
        r = await c.patch(f"/v1/tenants/{t['id']}", json={"default_pool": "gone"})
        assert field(r)[:2] == (422, "default_pool")
        assert (await c.get(f"/v1/tenants/{t['id']}")).json()["default_pool"] == "warm"
        r = await c.patch(f"/v1/tenants/{t['id']}", json={"default_pool": None})
        assert r.status_code == 200 and r.json()["default_pool"] is None
        assert r.json()["allowed_pools"] == ["cfg"]
        r = await c.patch(f"/v1/tenants/{t['id']}", json={"default_pool": "cfg"})
        assert r.json()["default_pool"] == "cfg"
    plane = api.app.control
    tid = t["id"]
    # The rules of pool_for, from this process's cache.
    assert plane.pool_cache.pool_for(tid, None) == "cfg"
    assert plane.pool_cache.pool_for(tid, "cfg") == "cfg"
    assert plane.pool_cache.pool_for(plain, None) is None
    assert (
        plane.pool_cache.pool_for(plain, "default") == "default"
    )  # the appliance's, no own default
    assert plane.pool_cache.pool_for(None, "warm") == "warm"  # a trusted submitter: any pool
    assert plane.pool_cache.pool_for(None, None) is None
    for tenant, name, words in (
        (tid, "default", "may not"),  # has a default of its own
        (tid, "warm", "may not"),
        (plain, "cfg", "may not"),
        (plain, "nope", "no pool named 'nope'"),
        (None, "nope", "no pool named 'nope'"),
    ):
        try:
            plane.pool_cache.pool_for(tenant, name)
        except PoolNotAllowed as exc:
            assert words in str(exc), exc
            assert isinstance(exc, ValueError)
        else:
            raise AssertionError(f"{tenant} may use {name}")


async def test_other_processes_follow_the_change_feed(control: ControlFactory) -> None:
    api = await control(POOLS)
    other = ControlPlane(api.app.cfg, api.app.resolver)
    await other.start()
    try:
        assert set(other.pool_cache.pools) == {"cfg", "default"}
        async with api.client(api.admin_key) as c:
            await c.post("/v1/pools", json={"name": "warm", "members": [{"source": "b"}]})
            r = await c.post("/v1/tenants", json={"name": "acme", "default_pool": "warm"})
            tid = r.json()["id"]
        await eventually(
            lambda: other.pool_cache.pool_for(tid, None) == "warm",
            10,
            "the other process to see the pool",
        )
        pool = other.pool_cache.members("warm")
        assert pool is not None and [m.source for m in pool.members] == ["b"]
        # The configuration's pool wins its name in every process.
        cfg_pool = other.pool_cache.members("cfg")
        assert cfg_pool is not None and cfg_pool.members[0].weight == 2
    finally:
        await other.stop()


async def test_messages_name_a_pool_and_a_priority(control: ControlFactory) -> None:
    api = await control(POOLS)
    api.lab.add_domain("later.test", behaviour="tempfail")  # stays in the spool
    key = await ready_tenant(api)
    async with api.client(api.admin_key) as c:
        await c.post("/v1/pools", json={"name": "warm", "members": [{"source": "b"}]})
        tid = (await c.get("/v1/tenants")).json()["data"][0]["id"]
        r = await c.patch(f"/v1/tenants/{tid}", json={"allowed_pools": ["warm"]})
        assert r.status_code == 200, r.text
    one = {"from": "a@acme.test", "to": ["u@later.test"], "subject": "s", "text": "t"}
    async with api.client(key) as c:
        r = await c.post("/v1/messages", json={**one, "pool": "cfg"})
        assert field(r) == (422, "pool", "this account may not send from pool 'cfg'")
        r = await c.post("/v1/messages", json={**one, "pool": "nope"})
        assert field(r) == (422, "pool", "no pool named 'nope'")
        r = await c.post("/v1/messages", json={**one, "pool": "Bad Name"})
        assert field(r)[:2] == (422, "pool")
        r = await c.post("/v1/messages", json={**one, "priority": "urgent"})
        assert field(r)[:2] == (422, "priority")
        r = await c.post(
            "/v1/messages/batch", json={"messages": [one, {**one, "pool": "cfg"}, one]}
        )
        assert field(r)[:2] == (422, "messages[1].pool")
        # Nothing should happen, so nothing to wait for: a window in which a wrongly
        # accepted message's events would show.
        await asyncio.sleep(0.3)
        assert not events_of(api)  # nothing was spooled

        sent = {}
        for label, extra in (
            ("warm-bulk", {"pool": "warm", "priority": "bulk"}),
            ("plain", {}),
            ("default", {"pool": "default", "priority": "high"}),
        ):
            r = await c.post("/v1/messages", json={**one, **extra})
            assert r.status_code == 202, r.text
            sent[label] = r.json()["id"]
        r = await c.post(
            "/v1/messages/batch",
            json={"messages": [one, {**one, "pool": "warm", "priority": "bulk"}]},
        )
        assert r.status_code == 202, r.text
        batch = [x["message"]["id"] for x in r.json()["results"]]

        # A default pool of its own applies to mail that names none.
        async with api.client(api.admin_key) as a:
            r = await a.patch(f"/v1/tenants/{tid}", json={"default_pool": "cfg"})
            assert r.status_code == 200
        r = await c.post("/v1/messages", json=one)
        assert r.status_code == 202
        sent["own-default"] = r.json()["id"]
        # …and the appliance's default is no longer its to name.
        r = await c.post("/v1/messages", json={**one, "pool": "default"})
        assert field(r)[:2] == (422, "pool")

        # The pool and priority are part of the request an Idempotency-Key stands for.
        h = {"Idempotency-Key": "k1"}
        assert (await c.post("/v1/messages", json=one, headers=h)).status_code == 202
        r = await c.post("/v1/messages", json={**one, "priority": "bulk"}, headers=h)
        assert r.status_code == 409 and r.json()["error"]["type"] == "idempotency_conflict"
        r = await c.post("/v1/messages", json={**one, "pool": "warm"}, headers=h)
        assert r.status_code == 409

    def pool_lane(msg_id: str) -> tuple[str | None, int]:
        row = spooled(api, msg_id)
        return row["pool"], row["lane"]

    assert pool_lane(sent["warm-bulk"]) == ("warm", LANE_BULK)
    assert pool_lane(sent["plain"]) == (None, LANE_HIGH)
    assert pool_lane(sent["default"]) == ("default", LANE_HIGH)
    assert pool_lane(sent["own-default"]) == ("cfg", LANE_HIGH)
    assert [pool_lane(m) for m in batch] == [(None, LANE_HIGH), ("warm", LANE_BULK)]


def events_of(api: ControlApi) -> list[dict[str, Any]]:
    admin = QueueAdmin(api.app.cfg.spool.path)
    try:
        return admin.events(limit=1000)
    finally:
        admin.close()
