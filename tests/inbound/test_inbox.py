"""The inbox on a real directory: durable delivery, claims shared by processes,
crash recovery, unparsed reports kept with their reason."""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from pathlib import Path

import pytest

from postwarden.bounces import inbox as inbox_mod
from postwarden.bounces.inbox import Inbox, valid_id

DSN = b"From: MAILER-DAEMON@mx.example\r\nSubject: Undelivered\r\n\r\nsorry\r\n"


def files(path: Path) -> list[str]:
    return sorted(os.listdir(path))


def test_deliver_writes_a_durable_item_with_its_envelope(tmp_path: Path) -> None:
    box = Inbox(tmp_path / "inbound")
    item_id = box.deliver("<>", ["b-1@pwb.shop.test"], DSN, "192.0.2.7", "mx.example")
    assert valid_id(item_id)
    assert files(box.new) == [item_id] and files(box.tmp) == []
    raw = (box.new / item_id).read_bytes()
    header_line, _, data = raw.partition(b"\n")
    header = json.loads(header_line)
    assert header["id"] == item_id
    assert header["mail_from"] == ""  # the null reverse-path
    assert header["rcpt_tos"] == ["b-1@pwb.shop.test"]
    assert (header["peer"], header["helo"], header["size"]) == ("192.0.2.7", "mx.example", len(DSN))
    assert data == DSN
    assert box.pending() == 1 and box.unparsed_count() == 0

    (item,) = box.claim(10)
    assert (item.id, item.mail_from, item.rcpt_tos, item.data) == (
        item_id, "", ["b-1@pwb.shop.test"], DSN,
    )  # fmt: skip
    assert files(box.new) == [] and len(files(box.cur)) == 1
    assert box.claim(10) == []  # nobody gets it twice
    box.done(item)
    assert files(box.cur) == [] and box.pending() == 0
    box.done(item)  # already gone: not an error


def test_a_failed_delivery_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    box = Inbox(tmp_path / "inbound")

    def broken(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", broken)
    with pytest.raises(OSError):
        box.deliver("a@b.test", ["x@pwb.shop.test"], DSN, "192.0.2.7", "h")
    assert files(box.tmp) == [] and files(box.new) == []

    # The data is on disk but the directory entry could not be made durable: taken back.
    monkeypatch.undo()

    def dir_broken(path: Path) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(inbox_mod, "_fsync_dir", dir_broken)
    with pytest.raises(OSError):
        box.deliver("a@b.test", ["x@pwb.shop.test"], DSN, "192.0.2.7", "h")
    assert files(box.tmp) == [] and files(box.new) == []


def test_claims_are_in_arrival_order_and_limited(tmp_path: Path) -> None:
    box = Inbox(tmp_path)
    ids = [box.deliver("", [f"r{i}@pwb.shop.test"], DSN, "", "") for i in range(5)]
    got = box.claim(3)
    assert [i.id for i in got] == sorted(ids)[:3]
    assert [i.id for i in box.claim(10)] == sorted(ids)[3:]


def _claim_all(path: str, start: float) -> list[str]:
    """One "process" of the shared inbox: claims in small batches until it is empty."""
    box = Inbox(path)
    while time.time() < start:
        time.sleep(0.001)
    out: list[str] = []
    while True:
        items = box.claim(3)
        if not items:
            return out
        for item in items:
            out.append(item.id)
            box.done(item)


def test_processes_sharing_the_inbox_never_claim_the_same_item(tmp_path: Path) -> None:
    path = tmp_path / "inbound"
    box = Inbox(path)
    ids = {box.deliver("", ["x@pwb.shop.test"], b"%d\r\n" % i, "", "") for i in range(300)}
    ctx = multiprocessing.get_context("spawn")
    start = time.time() + 1.5  # let every process start before any claims
    with ctx.Pool(3) as pool:
        results = [pool.apply_async(_claim_all, (str(path), start)) for _ in range(3)]
        mine = _claim_all(str(path), start)  # and a fourth claimer: this process
        claimed = [r.get(60) for r in results] + [mine]
    flat = [i for part in claimed for i in part]
    assert len(flat) == len(set(flat)), "an item was handed out twice"
    assert set(flat) == ids
    assert box.pending() == 0


def test_recover_puts_back_items_of_a_dead_processor(tmp_path: Path) -> None:
    box = Inbox(tmp_path)
    item_id = box.deliver("", ["x@pwb.shop.test"], DSN, "", "")
    (item,) = box.claim(1)
    assert box.recover(stale_after=60) == 0  # claimed a moment ago: its processor lives
    assert files(box.new) == []
    # A crashed writer's left-over in tmp/ goes too, once old.
    junk = box.tmp / "0000000000000-000000000000.dead"
    junk.write_bytes(b"half")
    old = time.time() - 2 * inbox_mod.TMP_MAX_AGE
    os.utime(junk, (old, old))
    assert box.recover(stale_after=60, now=time.time() + 120) == 1
    assert files(box.new) == [item_id] and files(box.cur) == [] and files(box.tmp) == []
    # The slow processor finishing late is harmless; the item is processed again.
    box.done(item)
    (again,) = box.claim(1)
    assert again.id == item_id and again.data == DSN


def test_unparsed_items_keep_their_reason_and_are_pruned(tmp_path: Path) -> None:
    box = Inbox(tmp_path)
    item_id = box.deliver("<>", ["x@pwb.shop.test"], DSN, "192.0.2.9", "mx")
    (item,) = box.claim(1)
    box.unparsed(item, "no delivery-status part\nfound")
    assert box.pending() == 0 and box.unparsed_count() == 1
    (info,) = box.list_unparsed()
    assert info.id == item_id
    assert info.reason == "no delivery-status part found"
    assert (info.mail_from, info.rcpt_tos, info.peer, info.size) == (
        "", ["x@pwb.shop.test"], "192.0.2.9", len(DSN),
    )  # fmt: skip
    assert info.unparsed_at >= info.received_at > 0
    kept = box.read(item_id)
    assert kept is not None and kept.data == DSN and kept.reason == info.reason
    assert box.read("../../etc/passwd") is None and box.read("0000000000000-000000000000") is None
    # A second inbox object (another process) sees the same.
    assert [i.id for i in Inbox(tmp_path, create=False).list_unparsed()] == [item_id]

    assert box.prune_unparsed(older_than=3600) == 0
    assert box.prune_unparsed(older_than=3600, now=time.time() + 7200) == 1
    assert box.list_unparsed() == [] and box.unparsed_count() == 0


def test_a_damaged_file_is_set_aside_not_lost(tmp_path: Path) -> None:
    box = Inbox(tmp_path)
    name = "1700000000000-0123456789ab"
    (box.new / name).write_bytes(b"not json\nbody")
    assert box.claim(10) == []
    (info,) = box.list_unparsed()
    assert info.id == name and "unreadable" in info.reason
    kept = box.read(name)
    assert kept is not None and kept.data == b"not json\nbody"


def test_a_missing_inbox_reads_as_empty(tmp_path: Path) -> None:
    box = Inbox(tmp_path / "absent", create=False)
    assert box.claim(5) == [] and box.list_unparsed() == []
    assert box.pending() == 0 and box.unparsed_count() == 0 and box.recover(1) == 0
    assert not (tmp_path / "absent").exists()
