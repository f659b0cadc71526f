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
    assert rc == 0 and "deferred 2" in out and msg_id in out

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

    rc, out = await cli(app, "events", "--msg", msg_id, "--json")
    evs = [json.loads(line) for line in out.splitlines()]
    assert [e["type"] for e in evs] == ["accepted", "deferred", "deleted"]
    assert all(e["msg_id"] == msg_id and e["rcpt"] == "c@later.test" for e in evs)


async def _tail(app: Appliance, *args: str) -> asyncio.subprocess.Process:
    env = {**os.environ, "POSTWARDEN_SPOOL__PATH": app.cfg.spool.path}
    env.pop("POSTWARDEN_CONFIG", None)
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "postwarden.cli", "events", "--tail", *args,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
    )  # fmt: skip


async def _lines(proc: asyncio.subprocess.Process, n: int) -> list[str]:
    assert proc.stdout is not None
    return [(await asyncio.wait_for(proc.stdout.readline(), 10)).decode() for _ in range(n)]


async def test_events_tail_shows_the_mail_just_sent_then_follows(
    lab: Lab, appliance: ApplianceFactory
) -> None:
    """`events --tail` starts with the last events (the mail just sent is there), as
    readable lines, then prints new ones as they happen: nothing twice, none missed."""
    lab.add_domain("inbox.test")
    app = await appliance()
    older = await submit(app, ["older@inbox.test"])
    await wait_events(app, older, has("delivered"))
    just_sent = await submit(app, ["new@inbox.test"])
    await wait_events(app, just_sent, has("delivered"))
    proc = await _tail(app, "-n", "2")
    try:
        first = await _lines(proc, 2)
        # The last two events: the mail just sent, accepted then delivered; not the older.
        assert [line.split()[2] for line in first] == ["accepted", "delivered"], first
        assert all(f"new@inbox.test  msg={just_sent}" in line for line in first), first
        assert "250" in first[1]  # the remote answer
        later = await submit(app, ["later@inbox.test"])
        followed = await _lines(proc, 2)
        assert [line.split()[2] for line in followed] == ["accepted", "delivered"], followed
        assert all(f"msg={later}" in line for line in followed), followed
    finally:
        proc.terminate()
        await proc.wait()
    assert proc.stdout is not None
    rest = (await proc.stdout.read()).decode()
    assert older not in rest and just_sent not in rest  # nothing replayed


async def test_events_tail_json_all_and_msg(lab: Lab, appliance: ApplianceFactory) -> None:
    lab.add_domain("inbox.test")
    app = await appliance()
    one = await submit(app, ["one@inbox.test"])
    await wait_events(app, one, has("delivered"))
    two = await submit(app, ["two@inbox.test"])
    await wait_events(app, two, has("delivered"))
    # --all: from the first event; --json: one object a line, with an ISO time.
    proc = await _tail(app, "--all", "--json")
    try:
        seen = [json.loads(line) for line in await _lines(proc, 4)]
        assert [(e["msg_id"], e["type"]) for e in seen] == [
            (one, "accepted"), (one, "delivered"), (two, "accepted"), (two, "delivered"),
        ]  # fmt: skip
        assert all(e["time"].endswith("+00:00") and isinstance(e["ts"], float) for e in seen)
    finally:
        proc.terminate()
        await proc.wait()
    # --msg: only that message's events (the newer message's are left out).
    proc = await _tail(app, "--msg", one, "--json")
    try:
        got = [json.loads(x) for x in await _lines(proc, 2)]
        assert [(e["msg_id"], e["type"]) for e in got] == [(one, "accepted"), (one, "delivered")]
    finally:
        proc.terminate()
        await proc.wait()
