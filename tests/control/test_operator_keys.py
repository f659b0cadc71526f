"""Operator keys through the API (list, create, revoke; never a secret in a list; the
last one cannot be revoked) and the ``postwarden admin`` command (list-keys,
revoke-key); an operator lists and revokes a tenant's keys. Revocation is in force on
the process that answered at once, and on the others after a change-feed poll."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

from postwarden.store.secrets import key_prefix
from tests.conftest import base_overrides, cli_here, deep_merge, write_toml
from tests.control.conftest import ControlApi, ControlFactory


async def test_operator_keys_list_create_revoke(control: ControlFactory) -> None:
    api = await control()
    tenant_key = await api.tenant("acme")
    async with api.client(api.admin_key) as op:
        r = await op.get("/v1/operator-keys")
        assert r.status_code == 200, r.text
        [mine] = r.json()["data"]
        assert r.json()["next_cursor"] is None
        assert mine["prefix"] == key_prefix(api.admin_key) and mine["current"] is True
        assert mine["scopes"] == ["admin"] and mine["tenant_id"] is None
        assert mine["revoked_at"] is None and mine["last_used_at"] is not None
        # The only one not revoked: refused, and still working.
        r = await op.delete(f"/v1/operator-keys/{mine['id']}")
        assert r.status_code == 409 and r.json()["error"]["type"] == "last_operator_key", r.text
        assert "make another first" in r.json()["error"]["message"]
        assert (await op.get("/v1/operator-keys")).status_code == 200
        # A second one; its secret is shown once, never in the list.
        r = await op.post("/v1/operator-keys", json={"name": "rotation"})
        assert r.status_code == 201, r.text
        second = r.json()
        assert second["key"].startswith("pw_") and second["current"] is False
        assert second["name"] == "rotation" and second["scopes"] == ["admin"]
        listed = (await op.get("/v1/operator-keys")).json()["data"]
        assert [k["id"] for k in listed] == [mine["id"], second["id"]]
        text = (await op.get("/v1/operator-keys")).text
        assert second["key"] not in text and "secret" not in text and '"key"' not in text
        # Pages.
        r = await op.get("/v1/operator-keys", params={"limit": 1})
        assert [k["id"] for k in r.json()["data"]] == [mine["id"]]
        r = await op.get(
            "/v1/operator-keys", params={"limit": 1, "cursor": r.json()["next_cursor"]}
        )
        assert [k["id"] for k in r.json()["data"]] == [second["id"]]
        # Tenant keys are not operator keys: 404 here.
        async with api.client(tenant_key) as t:
            tkey = (await t.get("/v1/keys")).json()["data"][0]
        r = await op.delete(f"/v1/operator-keys/{tkey['id']}")
        assert r.status_code == 404 and r.json()["error"]["message"] == "operator key not found"
        assert (await op.delete("/v1/operator-keys/999999")).status_code == 404
    async with api.client(second["key"]) as op2:
        # The new key revokes the first (another remains): in force at once.
        r = await op2.delete(f"/v1/operator-keys/{mine['id']}")
        assert r.status_code == 200, r.text
        assert r.json()["revoked_at"] is not None and r.json()["current"] is False
        # Again: the same answer, the time of the first revocation kept.
        again = await op2.delete(f"/v1/operator-keys/{mine['id']}")
        assert again.status_code == 200 and again.json() == r.json()
    async with api.client(api.admin_key) as op:
        r = await op.get("/v1/operator-keys")
        assert r.status_code == 401 and r.json()["error"]["type"] == "unauthorized"
    async with api.client(second["key"]) as op2:
        # Now the last one, in use: refused.
        r = await op2.delete(f"/v1/operator-keys/{second['id']}")
        assert r.status_code == 409
        # A third, then the key in use revokes itself: the answer says so, and from the
        # next request on it is refused.
        third = (await op2.post("/v1/operator-keys", json={})).json()
        assert third["name"] == "operator"
        r = await op2.delete(f"/v1/operator-keys/{second['id']}")
        assert r.status_code == 200 and r.json()["current"] is True
        assert (await op2.get("/v1/operator-keys")).status_code == 401
    async with api.client(third["key"]) as op3:
        listed = (await op3.get("/v1/operator-keys")).json()["data"]
        assert [(k["id"], k["revoked_at"] is None, k["current"]) for k in listed] == [
            (mine["id"], False, False),
            (second["id"], False, False),
            (third["id"], True, True),
        ]


async def test_operator_keys_are_for_operators_only(control: ControlFactory) -> None:
    api = await control()
    manager = await api.tenant("acme")  # send, read, manage
    async with api.client(api.admin_key) as op:
        op_id = (await op.get("/v1/operator-keys")).json()["data"][0]["id"]
    async with api.client(manager) as c:
        for method, path, body in (
            ("GET", "/v1/operator-keys", None),
            ("POST", "/v1/operator-keys", {"name": "sneaky"}),
            ("DELETE", f"/v1/operator-keys/{op_id}", None),
            ("GET", "/v1/tenants/1/keys", None),
            ("DELETE", "/v1/tenants/1/keys/1", None),
        ):
            r = await c.request(method, path, json=body)
            assert r.status_code == 403, (method, path, r.text)
            assert "needs an operator key" in r.json()["error"]["message"]
    async with api.client() as anon:
        assert (await anon.get("/v1/operator-keys")).status_code == 401
    async with api.client(api.admin_key) as op:
        keys = (await op.get("/v1/operator-keys")).json()["data"]
        assert len(keys) == 1 and keys[0]["revoked_at"] is None


async def test_operator_lists_and_revokes_a_tenants_keys(control: ControlFactory) -> None:
    api = await control()
    key_a = await api.tenant("alpha")
    key_b = await api.tenant("bravo")
    async with api.client(key_a) as c:
        r = await c.post("/v1/keys", json={"name": "second", "scopes": ["send"]})
        second_a = r.json()
        tid_a = second_a["tenant_id"]
        first_a = (await c.get("/v1/keys")).json()["data"][0]
    async with api.client(key_b) as c:
        b_key = (await c.get("/v1/keys")).json()["data"][0]
    async with api.client(api.admin_key) as op:
        r = await op.get(f"/v1/tenants/{tid_a}/keys")
        assert r.status_code == 200, r.text
        assert [k["id"] for k in r.json()["data"]] == [first_a["id"], second_a["id"]]
        assert second_a["key"] not in r.text and '"key"' not in r.text
        assert all(k["tenant_id"] == tid_a for k in r.json()["data"])
        r = await op.get(f"/v1/tenants/{tid_a}/keys", params={"limit": 1})
        assert len(r.json()["data"]) == 1 and r.json()["next_cursor"]
        assert (await op.get("/v1/tenants/999999/keys")).status_code == 404
        # B's key is not A's: 404 through A's path, and B's key keeps working.
        r = await op.delete(f"/v1/tenants/{tid_a}/keys/{b_key['id']}")
        assert r.status_code == 404
        r = await op.delete(f"/v1/tenants/{tid_a}/keys/{second_a['id']}")
        assert r.status_code == 200 and r.json()["revoked_at"] is not None
    async with api.client(second_a["key"]) as c:
        assert (await c.get("/v1/domains")).status_code == 401
    async with api.client(key_a) as c:
        keys = (await c.get("/v1/keys")).json()["data"]
        assert [k["revoked_at"] is None for k in keys] == [True, False]
    async with api.client(key_b) as c:
        assert (await c.get("/v1/keys")).status_code == 200


async def cli(config: Path, *args: str) -> tuple[int, str, str]:
    return await asyncio.to_thread(cli_here, "admin", *args, "--config", str(config))


async def until_refused(api: ControlApi, key: str) -> None:
    deadline = time.monotonic() + 30
    async with api.client(key) as c:
        while (await c.get("/v1/operator-keys")).status_code != 401:
            assert time.monotonic() < deadline, "the revocation never took effect"
            await asyncio.sleep(0.05)


async def test_admin_cli_lists_and_revokes_operator_keys(
    control: ControlFactory, tmp_path: Path
) -> None:
    api = await control()
    tenant_key = await api.tenant("acme")
    config = write_toml(
        tmp_path / "cli.toml",
        deep_merge(
            base_overrides(tmp_path, api.lab), {"database": {"url": api.app.cfg.database.url}}
        ),
    )
    code, out, err = await cli(config, "create-key", "--name", "night shift")
    assert code == 0 and out.strip().startswith("pw_"), err
    made = out.strip()
    code, out, err = await cli(config, "list-keys")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["ID", "PREFIX", "CREATED", "LAST", "USED", "REVOKED", "NAME"]
    assert len(lines) == 3 and lines[2].endswith("night shift")
    assert key_prefix(made) in lines[2] and made not in out and api.admin_key not in out
    code, out, err = await cli(config, "list-keys", "--json")
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["prefix"] for r in rows] == [key_prefix(api.admin_key), key_prefix(made)]
    assert rows[0]["last_used_at"] is not None and rows[1]["last_used_at"] is None
    assert set(rows[0]) == {"id", "prefix", "name", "created_at", "last_used_at", "revoked_at"}
    # Revoke the test's key from the command line: the running appliance refuses it
    # once its change-feed poll has run; the other key still works.
    code, out, err = await cli(config, "revoke-key", str(rows[0]["id"]))
    assert code == 0 and out.startswith(f"revoked operator key {rows[0]['id']} "), err
    await until_refused(api, api.admin_key)
    async with api.client(made) as op:
        assert (await op.get("/v1/operator-keys")).status_code == 200
    # The last one is refused; an unknown id, a missing id, a tenant's key: each said.
    code, _, err = await cli(config, "revoke-key", str(rows[1]["id"]))
    assert code == 1 and "last operator key" in err
    code, _, err = await cli(config, "revoke-key", "999999")
    assert code == 1 and "no operator key with id 999999" in err
    async with api.client(tenant_key) as c:
        tenant_key_id = (await c.get("/v1/keys")).json()["data"][0]["id"]
    code, _, err = await cli(config, "revoke-key", str(tenant_key_id))
    assert code == 1 and f"no operator key with id {tenant_key_id}" in err
    code, _, err = await cli(config, "revoke-key")
    assert code == 2 and "needs the key's id" in err
    code, out, _ = await cli(config, "list-keys", "--json")
    assert [json.loads(x)["revoked_at"] is None for x in out.splitlines()] == [False, True]


async def test_two_revocations_at_once_leave_one_key(control: ControlFactory) -> None:
    """Two operators, each revoking the other's key at the same moment: one succeeds,
    the other is refused, never both: one operator key is left."""
    api = await control()
    async with api.client(api.admin_key) as op:
        mine = (await op.get("/v1/operator-keys")).json()["data"][0]
        other = (await op.post("/v1/operator-keys", json={"name": "other"})).json()
    for _round in range(5):
        async with api.client(api.admin_key) as a, api.client(other["key"]) as b:
            ra, rb = await asyncio.gather(
                a.delete(f"/v1/operator-keys/{other['id']}"),
                b.delete(f"/v1/operator-keys/{mine['id']}"),
            )
        # The loser is refused as the last key (409), or, when the winner's revocation
        # was in force before it was even authenticated, as revoked (401).
        codes = sorted([ra.status_code, rb.status_code])
        assert codes in ([200, 401], [200, 409]), (ra.text, rb.text)
        survivor = api.admin_key if ra.status_code == 200 else other["key"]
        async with api.client(survivor) as s:
            keys = (await s.get("/v1/operator-keys")).json()["data"]
            assert [k["revoked_at"] is None for k in keys].count(True) == 1
            # A fresh pair for the next round.
            fresh = (await s.post("/v1/operator-keys", json={"name": "next"})).json()
            mine = next(k for k in keys if k["revoked_at"] is None)
        api.admin_key, other = survivor, fresh
