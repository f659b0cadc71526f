"""CPU seconds and resident memory of a whole process tree, read from /proc.

An MTA is a tree of processes (Postfix's master and its short-lived smtpd, cleanup,
qmgr, smtp children; Postwarden's processes). CPU is summed over the live processes,
including what they reaped from their exited children (cutime/cstime), so work done by
a child that has already exited is counted once its parent waited for it. Memory is
the sum of the live processes' PSS (proportional set size: each shared page divided
among the processes sharing it), sampled; the peak is what is reported. Plain RSS would
count the shared libraries of Postfix's dozens of processes once per process.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from dataclasses import dataclass

TICK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class Sample:
    cpu_s: float
    rss_bytes: int
    processes: int


def _stat(pid: int) -> tuple[int, float, int] | None:
    """(ppid, cpu seconds incl. reaped children, rss bytes) of one process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            raw = fh.read()
    except OSError:
        return None
    fields = raw[raw.rfind(b")") + 2 :].split()
    # After "pid (comm) ": state ppid ... utime(12) stime(13) cutime(14) cstime(15) ... rss(22)
    ppid = int(fields[1])
    cpu = sum(int(fields[i]) for i in (11, 12, 13, 14)) / TICK
    rss = int(fields[21]) * PAGE
    return ppid, cpu, rss


def _pss(pid: int, fallback: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as fh:
            for line in fh:
                if line.startswith(b"Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return fallback


def tree_sample(root: int) -> Sample:
    """CPU and RSS of ``root`` and all its descendants right now."""
    stats: dict[int, tuple[int, float, int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = _stat(int(name))
            if st is not None:
                stats[int(name)] = st
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    todo, seen = [root], []
    while todo:
        pid = todo.pop()
        if pid in stats:
            seen.append(pid)
            todo.extend(children.get(pid, ()))
    return Sample(
        cpu_s=sum(stats[p][1] for p in seen),
        rss_bytes=sum(_pss(p, stats[p][2]) for p in seen),
        processes=len(seen),
    )


class TreeMonitor:
    """Samples a process tree every ``interval`` seconds; keeps the peak RSS and last CPU."""

    def __init__(self, root: int, interval: float = 0.2) -> None:
        self.root = root
        self.interval = interval
        self.peak_rss = 0
        self.first: Sample | None = None
        self.last: Sample | None = None
        self._task: asyncio.Task[None] | None = None

    def sample(self) -> Sample:
        s = tree_sample(self.root)
        if s.processes:
            self.first = self.first or s
            self.last = s
            self.peak_rss = max(self.peak_rss, s.rss_bytes)
        return s

    async def _run(self) -> None:
        while True:
            await asyncio.to_thread(self.sample)
            await asyncio.sleep(self.interval)

    def start(self) -> None:
        self.sample()
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.sample()

    @property
    def cpu_s(self) -> float:
        if self.first is None or self.last is None:
            return 0.0
        return self.last.cpu_s - self.first.cpu_s
