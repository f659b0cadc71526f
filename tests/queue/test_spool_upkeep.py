"""The spool's upkeep: copied events are pruned after ``spool.event_retention`` (never
one the control plane has not copied), and segments go when their last message does,
also when the queue commands delete it while the appliance runs."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from postwarden.lab import Lab
from postwarden.queue.admin import QueueAdmin
from postwarden.queue.spool import Spool
from postwarden.values import Envelope
from tests.conftest import ApplianceFactory, postwarden_cli
from tests.mta.test_delivery import has, submit, wait_events
from tests.waiting import eventually


def event_ids(spool_path: Path | str) -> list[int]:
    db = sqlite3.connect(Path(spool_path) / "index.db")
    try:
        return [r[0] for r in db.execute("SELECT id FROM events ORDER BY id")]
    finally:
        db.close()


def spool_events(spool_path: str, msg_id: str) -> list[dict[str, object]]:
    admin = QueueAdmin(spool_path)
    try:
        return admin.events(msg_id=msg_id)
    finally:
        admin.close()


async def test_only_copied_events_past_retention_are_pruned(tmp_path: Path) -> None:
    spool = Spool(tmp_path, event_retention=0.001, upkeep_interval=0.02, prune_batch=2)
    await spool.open()
    for i in range(6):
        await spool.store(Envelope(f"s{i}@x.test", ["r@y.test"]), b"Subject: x\r\n\r\nx\r\n")
    assert event_ids(tmp_path) == [1, 2, 3, 4, 5, 6]
    # Nothing has been copied yet: nothing goes, however old.
    assert spool.copied_through is None
    spool.mark_copied(4)
    # Batches of two: the backlog drains in rounds, and stops at the copier's cursor.
    await eventually(
        lambda: event_ids(tmp_path) == [5, 6] and spool.stats["events_pruned"] == 4,
        10,
        "copied events to go",
    )
    spool.mark_copied(6)
    await eventually(lambda: event_ids(tmp_path) == [6], 10, "the rest to go")
    # The newest event stays, so that ids keep growing past the copier's cursor (6
    # itself may go now that it is not the newest).
    await spool.store(Envelope("t@x.test", ["r@y.test"]), b"Subject: x\r\n\r\nx\r\n")
    assert event_ids(tmp_path)[-1] == 7
    await spool.close()


async def test_events_within_retention_stay(tmp_path: Path) -> None:
    spool = Spool(tmp_path, event_retention=3600, upkeep_interval=0.02)
    await spool.open()
    for i in range(3):
        await spool.store(Envelope(f"s{i}@x.test", ["r@y.test"]), b"Subject: x\r\n\r\nx\r\n")
    spool.mark_copied(3)
    done = spool.stats["upkeeps"]
    await eventually(lambda: spool.stats["upkeeps"] >= done + 2, 10, "two upkeep rounds")
    assert event_ids(tmp_path) == [1, 2, 3]
    await spool.close()


async def test_appliance_prunes_what_the_copier_copied(
    lab: Lab, appliance: ApplianceFactory
) -> None:
    lab.add_domain("inbox.test")
    app = await appliance({"spool": {"event_retention": "50ms", "upkeep_interval": "50ms"}})
    first = await submit(app, ["a@inbox.test"])
    await wait_events(app, first, has("delivered"))
    second = await submit(app, ["b@inbox.test"])
    await wait_events(app, second, has("delivered"))
    # The first message's events are copied (the cursor passed them) and old: gone.
    await eventually(lambda: not spool_events(app.cfg.spool.path, first), 10, "pruning")
    assert app.spool.copied_through is not None and app.spool.copied_through >= 2
    assert event_ids(app.spool_path)  # the newest stays


async def test_cli_delete_reclaims_segments_while_running(
    lab: Lab, appliance: ApplianceFactory
) -> None:
    lab.add_domain("later.test", behaviour="tempfail")
    app = await appliance({
        "queue": {"retry_initial": "1h", "retry_max": "1h"},
        "spool": {"segment_size": "100", "upkeep_interval": "50ms"},
    })  # fmt: skip
    ids = []
    for _ in range(3):  # one segment each (they are larger than segment_size)
        ids.append(await submit(app, ["x@later.test"]))
        await wait_events(app, ids[-1], has("deferred"))
    admin = QueueAdmin(app.cfg.spool.path)
    segs = {}
    for msg_id in ids:
        info = admin.show(msg_id)
        assert info is not None
        segs[msg_id] = info["message"]["segment"]
    admin.close()
    seg_dir = app.spool_path / "segments"

    def seg_file(msg_id: str) -> Path:
        return seg_dir / f"{segs[msg_id]:012d}.seg"

    assert len(set(segs.values())) == 3 and all(seg_file(m).exists() for m in ids)
    # The last message's segment is the one being written: it must stay.
    rc, out = await postwarden_cli(app.cfg.spool.path, "queue", "delete", ids[2])
    assert rc == 0 and "delete: 1 recipient(s)" in out
    rc, out = await postwarden_cli(app.cfg.spool.path, "queue", "delete", ids[0])
    assert rc == 0 and "delete: 1 recipient(s)" in out
    await eventually(lambda: not seg_file(ids[0]).exists(), 10, "the emptied segment to go")
    assert seg_file(ids[1]).exists()  # still holds a message
    assert seg_file(ids[2]).exists()  # empty, but being written
    # The appliance goes on writing there.
    fourth = await submit(app, ["y@later.test"])
    await wait_events(app, fourth, has("deferred"))


async def test_spool_act_runs_the_same_state_changes_as_the_queue_commands(
    tmp_path: Path,
) -> None:
    spool = Spool(tmp_path, segment_size=100)  # one message per segment
    await spool.open()
    env = Envelope("s@x.test", ["r@y.test"])
    first = await spool.store(env, b"Subject: a\r\n\r\n" + b"a" * 200)
    second = await spool.store(env, b"Subject: b\r\n\r\n" + b"b" * 200)
    third = await spool.store(env, b"Subject: c\r\n\r\n" + b"c" * 200)
    assert await spool.act("hold", first.msg_id) == 1
    assert await spool.act("hold", first.msg_id) == 0  # already held
    leases = await spool.lease_due(time.time() + 1, 10)
    assert {x.msg_id for x in leases} == {second.msg_id, third.msg_id}
    assert await spool.act("release") == 1
    admin = QueueAdmin(tmp_path)
    info = admin.show(first.msg_id)
    assert info is not None and [e["type"] for e in info["events"]] == [
        "accepted", "held", "released",
    ]  # fmt: skip
    segment = tmp_path / "segments" / f"{info['message']['segment']:012d}.seg"
    admin.close()
    assert segment.exists()
    assert await spool.act("delete", first.msg_id) == 1
    assert not segment.exists()  # its last message went: unlinked at once
    await spool.close()
