"""What `postwarden queue list`, `postwarden events` and `postwarden --help` print, run
in-process (``cli.main``) against real spools written by :class:`Spool`."""

from __future__ import annotations

import datetime
import json
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from postwarden import cli
from postwarden.queue.admin import QueueAdmin
from postwarden.queue.spool import Spool
from postwarden.values import DEFERRED, DELIVERED, QUEUED, Envelope, Outcome

BODY = b"Subject: t\r\n\r\nbody\r\n"
# A long answer of short words (the 5th word is long, to see the cut fall between words).
LONG_ANSWER = "452 4.2.2 " + " ".join(
    f"word{i}" if i != 5 else "Supercalifragilisticexpialidocious" for i in range(120)
)


@pytest.fixture(autouse=True)
def _spool_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("POSTWARDEN_CONFIG", raising=False)
    monkeypatch.setenv("POSTWARDEN_SPOOL__PATH", str(tmp_path))


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out + err


def local(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def events_of(path: Path) -> list[dict[str, Any]]:
    admin = QueueAdmin(path)
    try:
        return admin.events(limit=1000)
    finally:
        admin.close()


async def store(spool: Spool, rcpts: list[str], **kw: Any) -> Any:
    return await spool.store(Envelope("s@sender.test", rcpts, **kw), BODY)


# ------------------------------------------------------------------ --help


def test_help_does_not_list_the_internal_worker_command(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as done:
        cli.main(["--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "SUPPRESS" not in out
    assert "worker" not in out
    for public in ("serve", "queue", "events", "lab", "dkim-genkey"):
        assert public in out
    # Still there for the supervisor, which starts `postwarden worker ...`.
    args = cli.build_parser().parse_args(
        ["worker", "--index", "1", "--count", "2", "--fds", "3", "--parent", "1"]
    )
    assert args.fn is cli.cmd_worker and (args.index, args.count) == (1, 2)
    with pytest.raises(SystemExit):
        cli.main(["worker", "--help"])
    assert "--index" in capsys.readouterr().out


# ------------------------------------------------------------------ events


@pytest.fixture
async def history(tmp_path: Path) -> dict[str, Any]:
    """One message to three recipients: delivered (a multi-line answer), deferred (a
    very long answer), dropped at acceptance; then an operator's hold."""
    spool = Spool(tmp_path, fsync=False)
    await spool.open()
    try:
        m = await store(
            spool,
            ["a@y.test", "b@y.test", "c@y.test"],
            drops={"c@y.test": "suppressed: hard_bounce"},
        )
        later = time.time() + 3600
        await spool.record(
            [
                Outcome(
                    m.rcpt_ids[0], m.msg_id, DELIVERED,
                    "250-2.0.0 Ok: queued\n250 2.0.0 as 4XyZ", detail={"mx": "mx1.y.test"},
                ),
                Outcome(m.rcpt_ids[1], m.msg_id, DEFERRED, LONG_ANSWER, next_attempt=later),
            ]
        )  # fmt: skip
        await spool.act("hold", m.msg_id)
    finally:
        await spool.close()
    return {"msg": m.msg_id, "later": later, "events": events_of(tmp_path)}


async def test_events_are_one_readable_line_each(
    history: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    rc, out = run(capsys, "events")
    assert rc == 0
    lines = out.splitlines()
    evs = history["events"]
    msg = history["msg"]
    assert [e["type"] for e in evs] == [
        "accepted", "accepted", "accepted", "dropped", "delivered", "deferred", "held",
    ]  # fmt: skip
    assert len(lines) == len(evs)
    for line, ev in zip(lines, evs, strict=True):
        # local time, type, recipient, message id
        assert line.startswith(f"{local(ev['ts'])}  {ev['type']:<9} {ev['rcpt']}  msg={msg}"), line
    accepted, _, _, dropped, delivered, deferred, held = lines
    assert "from=<s@sender.test>" in accepted
    assert dropped.endswith("reason: suppressed: hard_bounce (at acceptance)")
    # A multi-line answer on one line, whole.
    assert delivered.endswith("mx=mx1.y.test 250-2.0.0 Ok: queued 250 2.0.0 as 4XyZ")
    # A very long answer: cut between two words, with an ellipsis; the next try.
    assert f"next try {local(history['later'])} 452 4.2.2 word0" in deferred
    assert deferred.endswith(" …")
    shown = deferred.split(" 452 4.2.2 ", 1)[1].removesuffix(" …")
    assert LONG_ANSWER.startswith("452 4.2.2 " + shown + " ")  # ends on a whole word
    assert "Supercalifragilisticexpialidocious" in shown and len(shown) < len(LONG_ANSWER)
    assert held.endswith("by operator")
    # No raw JSON, no epoch floats.
    assert "{" not in out and str(evs[0]["ts"]) not in out


async def test_events_json_keeps_every_field_and_adds_iso_time(
    history: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    rc, out = run(capsys, "events", "--json")
    assert rc == 0
    got = [json.loads(line) for line in out.splitlines()]
    for g, ev in zip(got, history["events"], strict=True):
        assert {k: g[k] for k in ev} == ev  # the original fields, as they are
        when = datetime.datetime.fromisoformat(g["time"])
        assert when.utcoffset() == datetime.timedelta(0)
        assert abs(when.timestamp() - ev["ts"]) < 0.001
    # The whole answer, for machines.
    assert got[5]["detail"]["response"] == LONG_ANSWER


async def test_events_shows_the_newest_or_all(
    history: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    evs = history["events"]
    rc, out = run(capsys, "events", "-n", "2", "--json")
    assert [json.loads(x)["type"] for x in out.splitlines()] == ["deferred", "held"]
    rc, out = run(capsys, "events", "--limit", "3", "--msg", history["msg"], "--json")
    assert [json.loads(x)["type"] for x in out.splitlines()] == ["delivered", "deferred", "held"]
    rc, out = run(capsys, "events", "--msg", "nosuchid")
    assert rc == 0 and out == ""
    rc, out = run(capsys, "events", "--all", "-n", "1", "--json")  # --all: from the first
    assert [json.loads(x)["id"] for x in out.splitlines()] == [e["id"] for e in evs]
    rc, out = run(capsys, "events", "-n", "-1")
    assert rc == 2 and "0 or more" in out


async def test_recent_events_across_shards_then_follow_from_there(tmp_path: Path) -> None:
    """`recent` merges the shards' newest events by time; following from its cursors
    gives exactly what comes after, in every shard."""
    from postwarden.queue.shards import shard_path

    spools = [Spool(shard_path(tmp_path, k), fsync=False) for k in (0, 1)]
    for s in spools:
        await s.open()
    try:
        ids = [(await store(spools[i % 2], [f"r{i}@y.test"])).msg_id for i in range(6)]
        admin = QueueAdmin(tmp_path)
        try:
            last, cursors = admin.recent(3)
            assert [e["msg_id"] for e in last] == ids[3:]
            assert {e["shard"] for e in last} == {0, 1}
            everything, _ = admin.recent(100)
            assert [e["msg_id"] for e in everything] == ids
            mine, _ = admin.recent(100, msg_id=ids[1])
            assert [e["msg_id"] for e in mine] == [ids[1]]
            more = [(await store(spools[i % 2], [f"n{i}@y.test"])).msg_id for i in range(2)]
            it = admin.tail(poll=0.01, after=cursors)
            assert [next(it)["msg_id"] for _ in range(2)] == more
            # Following one message: the others' events (newer ones, one in the same
            # shard) are passed over.
            await spools[1].act("hold", ids[1])
            await spools[0].act("hold", ids[2])
            await spools[0].act("hold", ids[0])
            only = admin.tail(poll=0.01, after=cursors, msg_id=ids[0])
            ev = next(only)
            assert (ev["msg_id"], ev["type"]) == (ids[0], "held")
        finally:
            admin.close()
    finally:
        for s in spools:
            await s.close()


# ------------------------------------------------------------------ queue list


@pytest.fixture
async def waiting(tmp_path: Path) -> dict[str, Any]:
    """A recipient in each situation: being delivered, deferred, due now, held,
    waiting for a warming cap, and a delivered one beside the deferred one."""
    spool = Spool(tmp_path, fsync=False)
    await spool.open()
    try:
        active = await store(spool, ["f@y.test"])
        [lease] = await spool.lease_due(time.time() + 1, 1)
        assert lease.msg_id == active.msg_id
        now = time.time()
        m1 = await store(spool, ["a@y.test", "b@y.test"])
        m2 = await store(spool, ["c@y.test"])
        m3 = await store(spool, ["d@y.test"])
        m4 = await store(spool, ["e@y.test"])
        later, until = now + 3600, now + 7200
        await spool.record(
            [
                Outcome(m1.rcpt_ids[0], m1.msg_id, DELIVERED, "250 2.0.0 ok"),
                Outcome(
                    m1.rcpt_ids[1], m1.msg_id, DEFERRED, "451 4.7.1 Greylisted, try again later",
                    next_attempt=later,
                ),
                Outcome(
                    m4.rcpt_ids[0], m4.msg_id, QUEUED, next_attempt=until, counted_attempt=False,
                    wait_reason="warming_cap: warming cap reached: a",
                ),
            ]
        )  # fmt: skip
        assert await spool.act("hold", m3.msg_id) == 1
    finally:
        await spool.close()
    return {"active": active.msg_id, "m1": m1.msg_id, "m2": m2.msg_id, "m3": m3.msg_id,
            "m4": m4.msg_id, "later": later, "until": until}  # fmt: skip


def by_rcpt(out: str) -> dict[str, str]:
    """The recipient lines of `queue list` (not its summary or notes), by recipient."""
    return {
        line.split("to=<")[1].split(">")[0]: line
        for line in out.splitlines()[1:]
        if " to=<" in line
    }


async def test_queue_list_says_what_waits_and_why(
    waiting: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    rc, out = run(capsys, "queue", "list")
    assert rc == 0
    assert out.splitlines()[0] == (
        "5 message(s) in the queue; recipients: queued 3, active 1, deferred 1, delivered 1, held 1"
    )
    lines = by_rcpt(out)
    # What waits only: not the delivered recipient, and no next= time for it.
    assert set(lines) == {"f@y.test", "b@y.test", "c@y.test", "d@y.test", "e@y.test"}
    assert "active: being delivered" in lines["f@y.test"]
    assert lines["b@y.test"].endswith(
        "deferred: the remote answered 451 4.7.1 Greylisted, try again later;"
        f" next try {local(waiting['later'])}"
    )
    assert lines["b@y.test"].startswith(f"{waiting['m1']}  deferred ")
    assert "tries=1" in lines["b@y.test"] and "from=<s@sender.test>" in lines["b@y.test"]
    assert lines["c@y.test"].endswith("queued: due now")
    assert lines["d@y.test"].endswith("held by an operator: not tried until released")
    assert lines["e@y.test"].endswith(
        "waiting for traffic shaping, warming cap: warming cap reached: a;"
        f" next try {local(waiting['until'])}"
    )
    assert "tries=0" in lines["e@y.test"]  # a shaping wait is no attempt

    rc, out = run(capsys, "queue", "list", "--all")
    lines = by_rcpt(out)
    assert len(lines) == 6 and lines["a@y.test"].endswith("delivered: 250 2.0.0 ok")

    rc, out = run(capsys, "queue", "list", "--state", "delivered")
    assert list(by_rcpt(out)) == ["a@y.test"]
    rc, out = run(capsys, "queue", "list", "--state", "held")
    assert list(by_rcpt(out)) == ["d@y.test"]
    rc, out = run(capsys, "queue", "list", "--limit", "2")
    assert len(by_rcpt(out)) == 2 and "(the first 2: --limit N for more)" in out

    rc, out = run(capsys, "queue", "list", "--json")
    rows = {r["rcpt"]: r for r in json.loads(out)}
    assert set(rows) == {"f@y.test", "b@y.test", "c@y.test", "d@y.test", "e@y.test"}
    assert rows["e@y.test"]["wait_reason"] == "warming_cap: warming cap reached: a"
    assert rows["e@y.test"]["why"].startswith("waiting for traffic shaping, warming cap")
    assert rows["c@y.test"]["wait_reason"] is None and rows["c@y.test"]["why"] == "queued: due now"


async def test_flush_ends_a_shaping_wait_hold_keeps_it(
    waiting: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    m4 = waiting["m4"]
    run(capsys, "queue", "hold", m4)
    rc, out = run(capsys, "queue", "release", m4)
    assert "release: 1 recipient(s)" in out
    rc, out = run(capsys, "queue", "list", "--json")
    [row] = [r for r in json.loads(out) if r["msg_id"] == m4]
    assert row["wait_reason"] == "warming_cap: warming cap reached: a"  # still so
    rc, out = run(capsys, "queue", "flush", m4)
    assert "flush: 1 recipient(s)" in out
    rc, out = run(capsys, "queue", "list", "--json")
    [row] = [r for r in json.loads(out) if r["msg_id"] == m4]
    assert row["wait_reason"] is None and row["why"] == "queued: due now"
    rc, out = run(capsys, "queue", "show", m4)
    assert rc == 0 and json.loads(out)["recipients"][0]["why"] == "queued: due now"


async def test_queue_commands_read_a_schema_3_spool(
    waiting: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An appliance of the previous version still running on its spool (schema 3, no
    wait_reason): the commands list and act on it all the same."""
    db = sqlite3.connect(tmp_path / "index.db")
    db.execute("ALTER TABLE recipients DROP COLUMN wait_reason")
    db.execute("UPDATE meta SET value = '3' WHERE key = 'schema_version'")
    db.commit()
    db.close()
    rc, out = run(capsys, "queue", "list")
    assert rc == 0 and by_rcpt(out)["c@y.test"].endswith("queued: due now")
    rc, out = run(capsys, "queue", "flush", waiting["m4"])
    assert rc == 0 and "flush: 1 recipient(s)" in out
    rc, out = run(capsys, "queue", "show", waiting["m4"])
    assert json.loads(out)["recipients"][0]["wait_reason"] is None
