"""Segment writes that fail (a real full filesystem) and segment reads racing eviction."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from pathlib import Path

from postwarden.queue.spool import Spool
from postwarden.values import Envelope, SpoolFull
from tests.queue.fs import fill, small_fs


def body(i: int, size: int) -> bytes:
    """A message whose every line names it: a mix-up with another message shows."""
    line = f"X-Msg-{i:05d}: {'y' * 60}\r\n".encode()
    return (line * (size // len(line) + 1))[:size]


async def test_failed_segment_write_never_corrupts_later_messages(tmp_path: Path) -> None:
    root = tmp_path / "spool"
    with small_fs(root / "segments", "1m") as segments:
        spool = Spool(root, segment_size=64 * 1024 * 1024)
        await spool.open()
        ballast = fill(segments, leave=200_000)
        stored: dict[str, bytes] = {}
        failures: list[BaseException] = []
        i = 0
        # Batches of three (group commit): the disk fills in the middle of a batch,
        # with part of it written (a short writev) before ENOSPC.
        while len(failures) < 6:
            batch = [body(i + k, 29_000) for k in range(3)]
            i += 3
            results = await asyncio.gather(
                *(spool.store(Envelope("a@x.test", ["b@y.test"]), b) for b in batch),
                return_exceptions=True,
            )
            for data, res in zip(batch, results, strict=True):
                if isinstance(res, BaseException):
                    failures.append(res)
                else:
                    stored[res.msg_id] = data
            assert i < 200, "the filesystem never filled"
        assert stored, "nothing fitted before the disk was full"
        assert all(isinstance(f, SpoolFull) for f in failures), failures

        # Space returns: the spool takes mail again by itself, in a fresh segment.
        ballast.unlink()
        for _ in range(3):
            data = body(i, 29_000)
            i += 1
            stored[(await spool.store(Envelope("a@x.test", ["b@y.test"]), data)).msg_id] = data

        # Every message that was acknowledged reads back byte for byte, before and
        # after a restart.
        for _round in range(2):
            leases = await spool.lease_due(time.time() + 1, 1000)
            assert {lease.msg_id for lease in leases} == set(stored)
            for lease in leases:
                assert spool.read_body(lease) == stored[lease.msg_id], lease.msg_id
            await spool.close()
            spool = Spool(root, segment_size=64 * 1024 * 1024)
            await spool.open()
        await spool.close()


async def test_a_reader_keeps_its_fd_while_the_cache_evicts_or_unlinks(tmp_path: Path) -> None:
    spool = Spool(tmp_path, segment_size=100)  # one message per segment
    await spool.open()
    for i in range(70):
        await spool.store(Envelope("a@x.test", ["b@y.test"]), body(i, 200))
    leases = sorted(await spool.lease_due(time.time() + 1, 100), key=lambda x: x.segment)
    first = leases[0]
    with spool.segment_fd(first.segment) as fd:
        # Another thread reads 65 other segments (evicting this one from the cache of
        # 64) and the segment is unlinked meanwhile: the fd stays this file's.
        reader = threading.Thread(target=lambda: [spool.read_body(x) for x in leases[1:66]])
        reader.start()
        reader.join()
        spool._unlink_segment(first.segment)
        assert os.pread(fd, first.body_length, first.body_offset) == body(0, 200)
        held = os.fstat(fd)
        assert held.st_nlink == 0  # the unlinked segment's file, still readable
    # Closed once its reader was done: the number is free, or another thread of the
    # process (the spool's writer) has opened something else under it since.
    try:
        now = os.fstat(fd)
    except OSError:
        pass
    else:
        assert (now.st_dev, now.st_ino, now.st_nlink) != (held.st_dev, held.st_ino, 0)
    await spool.close()


async def test_concurrent_reads_across_more_segments_than_cached(tmp_path: Path) -> None:
    spool = Spool(tmp_path, segment_size=100)
    await spool.open()
    for i in range(80):
        await spool.store(Envelope(f"s{i}@x.test", ["b@y.test"]), body(i, 300))
    leases = await spool.lease_due(time.time() + 1, 100)
    want = {x.msg_id: body(int(x.mail_from[1:].split("@")[0]), 300) for x in leases}
    errors: list[BaseException] = []

    def read_many(offset: int) -> None:
        try:
            for n in range(400):
                lease = leases[(offset + n * 7) % len(leases)]
                assert spool.read_body(lease) == want[lease.msg_id]
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=read_many, args=(k * 13,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    await spool.close()
