"""Retention of the control database (issue 15, item 20; issues 22, 23): events, message
records, tracking hits and analytics' hourly counts past database.event_retention /
message_retention / tracking_retention / analytics_retention go, in batches, on SQLite
and on PostgreSQL; recent ones, and suppressions, stay; one worker prunes."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import func, select

from postwarden.store.analytics_models import StatHour
from postwarden.store.engagement_models import TrackingHit
from postwarden.store.models import Event, Message, Recipient, Suppression, Tenant
from postwarden.store.retention import Pruner
from tests.control.conftest import ControlFactory

NOW = dt.datetime(2027, 6, 1, tzinfo=dt.UTC)


async def count(sessions: Any, model: Any) -> int:
    async with sessions() as s:
        return int((await s.execute(select(func.count()).select_from(model))).scalar_one())


async def test_old_rows_go_recent_stay(control: ControlFactory) -> None:
    api = await control()
    app = api.app
    assert app.pruner is not None  # the one process of this appliance prunes
    sessions = app.control.sessions
    old, recent = NOW - dt.timedelta(days=91), NOW - dt.timedelta(days=89)
    async with sessions() as s:
        tenant = Tenant(name="acme")
        s.add(tenant)
        await s.flush()
        for i in range(25):
            at = old if i < 17 else recent
            s.add(Message(id=f"m{i}", tenant_id=1, created_at=at, mail_from="a@x.test"))
            for j in range(2):
                s.add(
                    Recipient(
                        id=f"m{i}.{j}",
                        message_id=f"m{i}",
                        tenant_id=1,
                        address=f"r{j}@y.test",
                        state="delivered",
                        updated_at=at,
                    )
                )
            s.add(Event(tenant_id=1, ts=at, type="delivered", message_id=f"m{i}", detail={}))
            s.add(TrackingHit(tenant_id=tenant.id, kind="open", at=at, user_agent="x"))
        s.add(
            Suppression(tenant_id=tenant.id, address="keep@y.test", reason="manual", created_at=old)
        )
        # Hourly counts: two of an hour past analytics_retention (400 days), one of the
        # hour after, which stays.
        for hour, metric in [(401, "delivered"), (401, "bounced"), (399, "delivered")]:
            s.add(StatHour(tenant_id=tenant.id, scope="tenant", key="", dim="", value="",
                           hour=NOW - dt.timedelta(days=hour), metric=metric, n=7))  # fmt: skip
        await s.commit()
    pruned: dict[str, int] = {}

    def seen(table: str, n: int) -> None:
        pruned[table] = pruned.get(table, 0) + n

    cfg = app.cfg.database
    cfg.prune_batch = 5  # several batches
    pruner = Pruner(cfg, sessions, on_pruned=seen, clock=lambda: NOW)
    done = await pruner.run_once()
    assert done["events"] == 17 and done["messages"] == 17
    assert pruned == {
        "events": 17, "messages": 17, "message_recipients": 34, "tracking_hits": 17,
        "stat_hours": 2,
    }  # fmt: skip
    async with sessions() as s:
        kept = list((await s.execute(select(StatHour.hour).where(StatHour.n == 7))).scalars())
    assert kept == [NOW - dt.timedelta(days=399)]
    assert await count(sessions, TrackingHit) == 8
    assert await count(sessions, Message) == 8
    assert await count(sessions, Recipient) == 16
    assert await count(sessions, Event) == 8
    assert await count(sessions, Suppression) == 1
    async with sessions() as s:
        left = set((await s.execute(select(Message.created_at))).scalars())
    assert left == {recent}
    nothing = {"events": 0, "messages": 0, "message_recipients": 0, "tracking_hits": 0,
               "stat_hours": 0}  # fmt: skip
    assert await pruner.run_once() == nothing

    # 0 keeps for ever.
    cfg.event_retention = cfg.message_retention = cfg.tracking_retention = 0
    cfg.analytics_retention = 0
    later = Pruner(cfg, sessions, clock=lambda: NOW + dt.timedelta(days=3650))
    assert await later.run_once() == nothing
    assert await count(sessions, Event) == 8


def test_only_worker_zero_prunes() -> None:
    from postwarden.appliance import WorkerRole, prunes_control_database

    assert prunes_control_database(None)
    assert prunes_control_database(WorkerRole(0, 2, ()))
    assert not prunes_control_database(WorkerRole(1, 2, ()))
