"""What waits in the scheduler's memory for one destination (a domain, from a pool):
its jobs by lane and tenant (:class:`JobQueue`), and the sessions serving it
(:class:`DomainQueue`)."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

from postwarden.values import Job


class JobQueue:
    """Jobs for one destination: the transactional lane first, then bulk; within a
    lane, tenants take turns (one job each, round robin)."""

    __slots__ = ("lanes", "n")

    def __init__(self) -> None:
        self.lanes: tuple[dict[str, deque[Job]], dict[str, deque[Job]]] = ({}, {})
        self.n = 0

    def __len__(self) -> int:
        return self.n

    def __bool__(self) -> bool:
        return self.n > 0

    def __iter__(self) -> Iterator[Job]:
        for lane in self.lanes:
            for d in lane.values():
                yield from d

    def append(self, job: Job, left: bool = False) -> None:
        lane = self.lanes[1 if job.lane else 0]
        d = lane.get(job.tenant)
        if d is None:
            d = lane[job.tenant] = deque()
        if left:
            d.appendleft(job)
        else:
            d.append(job)
        self.n += 1

    def popleft(self) -> Job:
        for lane in self.lanes:
            if lane:
                tenant = next(iter(lane))
                d = lane.pop(tenant)
                job = d.popleft()
                if d:
                    lane[tenant] = d  # to the back of the turn
                self.n -= 1
                return job
        raise IndexError("empty")

    def clear(self) -> None:
        for lane in self.lanes:
            lane.clear()
        self.n = 0


@dataclass
class DomainQueue:
    domain: str = ""
    pool: str = ""
    jobs: JobQueue = field(default_factory=JobQueue)
    sessions: int = 0
    waiters: int = 0
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    blocked_until: float = 0.0  # event-loop time: no new session before
    timer: asyncio.TimerHandle | None = None
    site: str = ""  # the provider site, once a session has resolved it
