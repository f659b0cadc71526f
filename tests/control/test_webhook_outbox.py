"""The webhook outbox (issue 23; docs/decisions/0012): every event inserted into
``events`` — one by one or a batch in one statement, as the event copier writes them —
gets, in its own transaction, one outbox row per enabled endpoint of its tenant whose
filter takes its type; on SQLite and on PostgreSQL."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import insert, select

from postwarden.store.db import create_engine, sessionmaker
from postwarden.store.models import Event, Tenant
from postwarden.store.webhook_models import WebhookEndpoint, WebhookOutbox

T0 = dt.datetime(2026, 12, 7, 2, 0, tzinfo=dt.UTC)


async def test_events_fill_the_outbox_in_their_transaction(migrated_url: str) -> None:
    engine = create_engine(migrated_url)
    sessions = sessionmaker(engine)
    try:
        async with sessions() as s:
            acme, other = Tenant(name="acme"), Tenant(name="other")
            s.add_all([acme, other])
            await s.flush()

            def endpoint(tenant: Tenant, events: str, enabled: int = 1) -> WebhookEndpoint:
                return WebhookEndpoint(
                    tenant_id=tenant.id,
                    url="https://hooks.test/x",
                    events=events,
                    signing_key=b"k",
                    enabled=enabled,
                )

            every, bounces, off, theirs = (
                endpoint(acme, "*"),
                endpoint(acme, ",bounced,complained,"),
                endpoint(acme, "*", enabled=0),
                endpoint(other, "*"),
            )
            s.add_all([every, bounces, off, theirs])
            await s.commit()
        rows = [
            {
                "tenant_id": acme.id,
                "ts": T0,
                "type": t,
                "message_id": f"m{i}",
                "tags": "",
                "detail": {},
            }
            for i, t in enumerate(["delivered", "bounced", "deliveredx", "complained"])
        ]
        rows.append(
            {
                "tenant_id": None,
                "ts": T0,
                "type": "delivered",
                "message_id": "relay",
                "tags": "",
                "detail": {},
            }
        )
        async with sessions() as s:
            await s.execute(insert(Event), rows)  # one statement, as the copier writes
            s.add(Event(tenant_id=other.id, ts=T0, type="opened", message_id="o", detail={}))
            await s.commit()
        async with sessions() as s:
            # A transaction rolled back leaves no outbox row.
            s.add(Event(tenant_id=acme.id, ts=T0, type="delivered", message_id="gone", detail={}))
            await s.flush()
            await s.rollback()
        async with sessions() as s:
            ids = {e.message_id: e.id for e in (await s.execute(select(Event))).scalars()}
            got = list((await s.execute(select(WebhookOutbox))).scalars())
        pairs = sorted((o.endpoint_id, o.event_id) for o in got)
        want = sorted(
            [(every.id, ids[m]) for m in ("m0", "m1", "m2", "m3")]
            + [(bounces.id, ids["m1"]), (bounces.id, ids["m3"]), (theirs.id, ids["o"])]
        )
        assert pairs == want
        assert {(o.state, o.attempts) for o in got} == {("pending", 0)}
        assert {o.next_at for o in got} == {T0}  # the event's time: due at once
        assert {o.tenant_id for o in got if o.endpoint_id != theirs.id} == {acme.id}
    finally:
        await engine.dispose()
