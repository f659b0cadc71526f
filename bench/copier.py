"""How fast the control plane copies spool events into its database (not a test).

Writes N one-recipient tenant messages into a scratch spool (fsync off), marks each
delivered, then times EventCopier copying the 2N events into a fresh SQLite control
database (or the one named by --db-url). Prints events/s and CPU seconds.

    python bench/copier.py [--messages 20000] [--db-url postgresql+asyncpg://...]
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import tempfile
import time
from pathlib import Path

from postwarden.control.events import EventCopier
from postwarden.queue.spool import Spool
from postwarden.store.db import create_engine, sessionmaker, upgrade
from postwarden.values import DELIVERED, Envelope, Outcome


async def main(args: argparse.Namespace) -> None:
    scratch = Path(tempfile.mkdtemp(prefix="pw-copier-"))
    spool = Spool(scratch / "spool", fsync=False)
    await spool.open()
    body = b"From: a@acme.test\r\nSubject: x\r\n\r\n" + b"x" * 4000 + b"\r\n"
    stored = []
    for i in range(0, args.messages, 500):
        batch = [
            spool.store(Envelope("a@acme.test", [f"u{j}@inbox.test"], tenant="1",
                                 meta={"source": "api", "tags": ["bench"]}), body)
            for j in range(i, min(i + 500, args.messages))
        ]  # fmt: skip
        stored += await asyncio.gather(*batch)
    await spool.record([Outcome(m.rcpt_ids[0], m.msg_id, DELIVERED, "250 ok") for m in stored])
    await spool.close()
    url = args.db_url or f"sqlite+aiosqlite:///{scratch / 'control.db'}"
    await upgrade(url)
    engine = create_engine(url)
    copier = EventCopier(scratch / "spool", sessionmaker(engine))
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    while await copier.copy_once():
        pass
    wall = time.perf_counter() - t0
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    await engine.dispose()
    print(
        f"copier: events={copier.copied} wall_s={wall:.2f} events_per_s={copier.copied / wall:.0f}"
        f" cpu_ms_per_event={1000 * cpu / max(1, copier.copied):.3f}"
    )


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--messages", type=int, default=20000)
    p.add_argument("--db-url", default="")
    asyncio.run(main(p.parse_args()))
