"""`postwarden queue …` and `postwarden events` run as real commands against a live spool."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from typing import Any

import pytest

from postwarden.appliance import Appliance
from postwarden.lab import Lab
from tests.conftest import ApplianceFactory, postwarden_cli
from tests.mta.test_delivery import has, submit, types, wait_events


async def cli(app: Appliance, *args: str) -> tuple[int, str]:
    return await postwarden_cli(app.cfg.spool.path, *args)


def rows(text: str) -> list[dict[str, Any]]:
    return list(json.loads(text))


@pytest.fixture
async def deferred_app(lab: Lab, appliance: ApplianceFactory) -> Appliance:
    lab.add_domain("later.test", behaviour="tempfail")
    return await appliance({"queue": {"retry_initial": "1h", "retry_max": "1h"}})


async def test_list_show_hold_release_flush(lab: Lab, deferred_app: Appliance) -> None:
    app = deferred_app
    msg_id = await submit(app, ["a@later.test", "b@later.test"])
    await wait_events(app, msg_id, has("deferred", 2))

    rc, out = await cli(app, "queue", "list", "--json")
    assert rc == 0
    listed = rows(out)
    assert {r["rcpt"] for r in listed} == {"a@later.test", "b@later.test"}
    assert all(r["state"] == "deferred" and r["attempts"] == 1 for r in listed)
    assert all(r["last_response"].startswith("451") for r in listed)

    rc, out = await cli(app, "queue", "list")
    assert rc == 0 and '"deferred": 2' in out and msg_id in out

    rc, out = await cli(app, "queue", "show", msg_id)
    info = json.loads(out)
    assert info["in_queue"] and len(info["recipients"]) == 2
    assert [e["type"] for e in info["events"]].count("deferred") == 2

    rc, out = await cli(app, "queue", "show", "nosuchid")
    assert rc == 1 and "no such message" in out

    rc, out = await cli(app, "queue", "hold", msg_id)
    assert rc == 0 and "hold: 2 recipient(s)" in out
    rc, out = await cli(app, "queue", "list", "--state", "held", "--json")
    assert len(rows(out)) == 2
    # A held recipient is not flushed into delivery.
    rc, out = await cli(app, "queue", "flush")
    assert "flush: 0 recipient(s)" in out
    rc, out = await cli(app, "queue", "release", "ALL")
    assert "release: 2 recipient(s)" in out

    # The destination recovers; a flush makes the deferred mail go now, not in an hour.
    lab.set_behaviour("later.test", "accept")
    rc, out = await cli(app, "queue", "flush", msg_id)
    assert "flush: 2 recipient(s)" in out
    evs = await wait_events(app, msg_id, has("delivered", 2))
    assert types(evs).count("held") == 2 and types(evs).count("released") == 2
    rc, out = await cli(app, "queue", "list", "--json")
    assert rows(out) == []


async def test_delete_and_events(lab: Lab, deferred_app: Appliance) -> None:
    app = deferred_app
    msg_id = await submit(app, ["c@later.test"])
    await wait_events(app, msg_id, has("deferred"))
    rc, out = await cli(app, "queue", "delete")
    assert rc == 2 and "give a message id" in out  # never delete everything by accident
    rc, out = await cli(app, "queue", "delete", msg_id)
    assert rc == 0 and "delete: 1 recipient(s)" in out
    rc, out = await cli(app, "queue", "list", "--json")
    assert rows(out) == []

    rc, out = await cli(app, "events", "--msg", msg_id)
    evs = [json.loads(line) for line in out.splitlines()]
    assert [e["type"] for e in evs] == ["accepted", "deferred", "deleted"]
    assert all(e["msg_id"] == msg_id and e["rcpt"] == "c@later.test" for e in evs)


async def test_events_tail_follows_new_events(lab: Lab, appliance: ApplianceFactory) -> None:
    lab.add_domain("inbox.test")
    app = await appliance()
    first = await submit(app, ["old@inbox.test"])
    await wait_events(app, first, has("delivered"))
    env = {**os.environ, "POSTWARDEN_SPOOL__PATH": app.cfg.spool.path}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "postwarden.cli", "events", "--tail",
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
    )  # fmt: skip
    try:
        await asyncio.sleep(1.0)  # let it start and note where the log ends
        msg_id = await submit(app, ["new@inbox.test"])
        assert proc.stdout is not None
        seen: list[dict[str, Any]] = []
        while not any(e["type"] == "delivered" for e in seen):
            line = await asyncio.wait_for(proc.stdout.readline(), 10)
            seen.append(json.loads(line))
        # Only what happened after it started: the earlier message is not replayed.
        assert {e["msg_id"] for e in seen} == {msg_id}
        assert [e["type"] for e in seen] == ["accepted", "delivered"]
    finally:
        proc.terminate()
        await proc.wait()
