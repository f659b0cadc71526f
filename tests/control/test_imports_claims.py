"""The import runner's claims on the database: many runners asking at once never take
the same import; a runner that died is taken over (its lease passed, or its process on
this host gone); two runners empty a queue between them with exact counts; uploads cut
off are reaped. On SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import socket

from sqlalchemy import func, select

from postwarden.control.import_runner import ImportRunner
from postwarden.store.contact_models import Contact
from postwarden.store.db import create_engine, sessionmaker
from postwarden.store.import_models import RECEIVING, Import
from postwarden.store.imports import (
    BodyWriter,
    claim,
    forget_runner,
    prune_finished,
    reap_uploads,
    runner_name,
)
from postwarden.store.models import Tenant, utcnow


async def queue_imports(sessions: object, tid: int, n: int, rows: int, tag: str) -> list[int]:
    ids = []
    for k in range(n):
        w = await BodyWriter.create(sessions, tid, {"on_conflict": "update"})  # type: ignore[arg-type]
        body = "email,n\n" + "".join(f"{tag}{k}-{i}@example.com,{i}\n" for i in range(rows))
        await w.write(body.encode())
        ids.append(await w.finish())
    return ids


async def test_claims_takeovers_and_two_runners(migrated_url: str) -> None:
    engine = create_engine(migrated_url)
    sessions = sessionmaker(engine)
    names = [runner_name() for _ in range(8)]
    try:
        async with sessions() as s:
            tenant = Tenant(name="acme")
            s.add(tenant)
            await s.commit()
            tid = tenant.id
        ids = await queue_imports(sessions, tid, 4, 10, "a")

        # Eight runners ask at once for four imports: each import goes to one of them.
        got = await asyncio.gather(*(claim(sessions, n) for n in names))
        taken = [g for g in got if g is not None]
        assert sorted(taken) == ids
        async with sessions() as s:
            owners = dict((await s.execute(select(Import.id, Import.claimed_by))).all())
        assert len({owners[i] for i in ids}) == 4
        assert await claim(sessions, names[0]) in (None, *[i for i in ids if owners[i] == names[0]])

        # Taken over: a lease that passed (a runner of another host), a process of this
        # host that is gone; not a live runner of another host within its lease.
        gone = f"{socket.gethostname()}:{2**22 + 7}:dead"
        past, future = utcnow() - dt.timedelta(seconds=1), utcnow() + dt.timedelta(hours=1)
        async with sessions() as s:
            for iid, owner, lease in zip(
                ids,
                ["elsewhere:1:a", gone, "elsewhere:2:b", f"{socket.gethostname()}:{os.getpid()}:"],
                [past, future, future, future],
                strict=True,
            ):
                imp = await s.get(Import, iid)
                assert imp is not None
                imp.claimed_by, imp.lease_until = owner, lease
            await s.commit()
        mine = [runner_name() for _ in range(4)]
        names += mine
        got = [await claim(sessions, n) for n in mine[:3]]
        # The last one: this process, a runner name it does not run (stopped): gone too.
        assert got == [ids[0], ids[1], ids[3]]
        assert await claim(sessions, mine[3]) is None
        assert await claim(sessions, mine[0]) == ids[0]  # its own, left by an error
        async with sessions() as s:
            imp = await s.get(Import, ids[2])
            assert imp is not None and imp.claimed_by == "elsewhere:2:b"
            imp.lease_until = past
            await s.commit()

        # Two runners empty the queue (the runners above stopped: their imports are
        # taken over): every import run once, counts exact.
        for n in mine:
            forget_runner(n)
        more = await queue_imports(sessions, tid, 6, 25, "b")
        runners = [ImportRunner(sessions, 7), ImportRunner(sessions, 7)]
        ran = await asyncio.gather(*(r.run_once() for r in runners))
        assert sum(ran) == len(ids) + len(more)
        async with sessions() as s:
            rows = (await s.execute(select(Import))).scalars().all()
            contacts = (await s.execute(select(func.count()).select_from(Contact))).scalar()
        assert {x.state for x in rows} == {"done"}
        assert sum(x.rows_imported for x in rows) == sum(x.contacts_created for x in rows)
        assert contacts == 4 * 10 + 6 * 25
        for r in runners:
            await r.stop()

        # An upload cut off (no chunk for a lease) is reaped; one going on is not.
        async with sessions() as s:
            s.add_all(
                [
                    Import(tenant_id=tid, state=RECEIVING, options={}, lease_until=past),
                    Import(tenant_id=tid, state=RECEIVING, options={}, lease_until=future),
                ]
            )
            await s.commit()
        assert await reap_uploads(sessions) == 1
        # Imports that ended long ago are forgotten.
        async with sessions() as s:
            old = await s.get(Import, ids[0])
            assert old is not None
            old.finished_at = utcnow() - dt.timedelta(days=31)
            await s.commit()
        assert await prune_finished(sessions) == 1
        async with sessions() as s:
            assert await s.get(Import, ids[0]) is None
    finally:
        for n in names:
            forget_runner(n)
        await engine.dispose()
