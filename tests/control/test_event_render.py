"""``GET /v1/events`` writes its page itself (control.messages.render_events) from each
event's stored detail text: on SQLite and PostgreSQL, for awkward values (quotes,
backslashes, control characters, text beyond ASCII, nested details, empty and missing
details, whole seconds and microseconds, no recipient), the document is the one the
:class:`EventList` model writes, and it validates as that model."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import pytest
import sqlalchemy as sa

from postwarden.control.event_list import EventList, EventOut, render_events
from postwarden.store.db import create_engine
from postwarden.store.event_query import events_query
from postwarden.store.models import Event
from tests.pg import postgres  # noqa: F401  (the fixture)

EVENTS: sa.Table = Event.__table__  # type: ignore[assignment]
T0 = dt.datetime(2027, 3, 1, 9, 0, tzinfo=dt.UTC)

AWKWARD: list[dict[str, Any]] = [
    {"type": "delivered", "ts": T0, "recipient": "a@b.example",
     "detail": {"response": "250 2.0.0 Ok: queued as 4Xy", "mx": "mx.b.example"}},
    {"type": "bounced", "ts": T0 + dt.timedelta(microseconds=1),
     "recipient": 'quote"back\\slash@b.example',
     "detail": {"response": 'say "no"\\ \t\n\x01', "nested": {"list": [1, 2.5, None, True]}}},
    {"type": "complained", "ts": T0 + dt.timedelta(seconds=1, microseconds=120000),
     "recipient": "jörg@bücher.example",
     "detail": {"text": "Größe ✓ 日本語 \u2028 😀", "empty": {}, "n": -7}},
    {"type": "accepted", "ts": T0 + dt.timedelta(days=400), "recipient": None, "detail": {}},
    {"type": "expired", "ts": T0 + dt.timedelta(hours=5), "recipient": "x@y.example",
     "detail": None},
]  # fmt: skip


@pytest.fixture
def database_url(migrated_url: str) -> str:
    return migrated_url


async def test_the_page_is_the_models_document(database_url: str) -> None:
    engine = create_engine(database_url)
    try:
        rows = [
            {"tenant_id": 1, "message_id": f"m{i:039d}", "recipient_id": f"r{i}" if i else None,
             "tags": ",t,", **e}
            for i, e in enumerate(AWKWARD)
        ]  # fmt: skip
        async with engine.begin() as conn:
            await conn.execute(EVENTS.insert(), rows)
            dialect = engine.dialect.name
            decoded = (await conn.execute(events_query(dialect, 1, limit=100))).all()
            raw = (await conn.execute(events_query(dialect, 1, limit=100, detail_text=True))).all()
    finally:
        await engine.dispose()
    assert len(raw) == len(AWKWARD)
    assert all(isinstance(r.detail, str) for r in raw)  # passed on, not decoded
    for cursor in ("MTI", None):
        want = EventList(
            data=[
                EventOut.model_validate({**r._asdict(), "detail": r.detail or {}}) for r in decoded
            ],
            next_cursor=cursor,
        )
        got = render_events(raw, cursor)
        assert json.loads(got) == json.loads(want.model_dump_json())
        assert EventList.model_validate_json(got) == want
    # The stored text is what comes out: the detail a client reads is the one written.
    page = json.loads(render_events(raw, None))
    assert page["data"][1]["detail"]["response"] == 'say "no"\\ \t\n\x01'
    assert page["data"][2]["recipient"] == "jörg@bücher.example"
    assert page["data"][0]["ts"] == "2027-03-01T09:00:00Z"
    assert page["data"][2]["ts"] == "2027-03-01T09:00:01.120000Z"
    assert page["data"][3]["recipient"] is None and page["data"][0]["recipient_id"] is None
    assert page["data"][4]["detail"] == {}
    assert render_events([], None) == b'{"data":[],"next_cursor":null}'
