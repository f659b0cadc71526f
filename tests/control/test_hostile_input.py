"""Hostile input to the API never gets a 5xx: deep nesting, dates that leave the
calendar once in UTC, control characters, Unicode line separators, NEL, NUL and lone
surrogates get a 4xx naming the field (issue 15, item 5). Regressions for each case
found, then Hypothesis over the request schemas with those character classes, over
the live API on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import datetime as dt
import gc
import json
import os
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from postwarden.control.routing import ApiError, parse_json
from tests.control.conftest import ControlApi, ControlFactory
from tests.control.test_messages import ready_tenant

EXAMPLES = int(os.environ.get("POSTWARDEN_HYPOTHESIS_EXAMPLES", "60"))
FAST = {"control": {"rate_limit": 100000, "rate_burst": 100000}}


def post_json(c: httpx.Client | httpx.AsyncClient, url: str, body: Any) -> Any:
    """JSON as a client may send it: lone surrogates as \\udXXX escapes."""
    return c.post(
        url, content=json.dumps(body).encode(), headers={"content-type": "application/json"}
    )


def paths(r: httpx.Response) -> list[str]:
    return [f["path"] for f in r.json()["error"].get("fields", [])]


async def sender(api: ControlApi) -> str:
    api.lab.add_domain("inbox.test")
    return await ready_tenant(api)


def message(**over: Any) -> dict[str, Any]:
    return {"from": "app@acme.test", "to": ["ann@inbox.test"], "text": "hi", **over}


async def test_each_reported_case_is_a_4xx_naming_the_field(control: ControlFactory) -> None:
    api = await control(FAST)
    key = await sender(api)
    async with api.client(key) as c:
        # 50 000 levels of arrays: a RecursionError in the parser, once.
        r = await c.post(
            "/v1/messages", content=b"[" * 50_000, headers={"content-type": "application/json"}
        )
        assert r.status_code in (400, 422), r.text
        r = await c.post(
            "/v1/messages",
            content=b"[" * 50_000 + b"]" * 50_000,
            headers={"content-type": "application/json"},
        )
        assert r.status_code == 422 and paths(r) == ["body"], r.text
        deep: Any = "x"
        for _ in range(100):
            deep = {"a": deep}
        r = await post_json(c, "/v1/messages", message(metadata=deep))
        assert r.status_code == 422 and paths(r) == ["body"], r.text

        r = await c.get("/v1/events", params={"since": "0001-01-01T00:00:00+14:00"})
        assert r.status_code == 422 and paths(r) == ["since"], r.text
        r = await c.get("/v1/events", params={"until": "9999-12-31T23:59:59-14:00"})
        assert r.status_code == 422 and paths(r) == ["until"], r.text
        r = await c.post(
            "/v1/suppressions",
            json={"address": "a@example.com", "expires_at": "9999-12-31T23:00:00-05:00"},
        )
        assert r.status_code == 422 and paths(r) == ["expires_at"], r.text

        # The CSV import reports the line and imports the others.
        body = (
            "address,expires_at\r\n"
            "far@example.com,9999-12-31T23:00:00-05:00\r\n"
            "early@example.com,0001-01-01T00:00:00+14:00\r\n"
            "fine@example.com,2030-01-01T00:00:00Z\r\n"
        )
        r = await c.post(
            "/v1/suppressions/import", content=body, headers={"content-type": "text/csv"}
        )
        assert r.status_code == 200, r.text
        assert r.json()["created"] == 1
        assert [e["line"] for e in r.json()["errors"]] == [2, 3]
        assert all("expires_at" in e["message"] for e in r.json()["errors"])

        for ch in ("\u2028", "\u2029", "\u0085", "\v", "\f", "\x1b", "\x7f"):
            r = await post_json(c, "/v1/messages", message(subject=f"a{ch}b"))
            assert r.status_code == 422 and paths(r) == ["subject"], (repr(ch), r.text)
            r = await post_json(c, "/v1/messages", message(headers={"X-Note": f"a{ch}b"}))
            assert r.status_code == 422 and paths(r) == ["headers.X-Note"], (repr(ch), r.text)
        r = await post_json(
            c, "/v1/messages", message(to=[{"email": "a@inbox.test", "name": "\ud800"}])
        )
        assert r.status_code == 422 and paths(r) == ["to[0].name"], r.text
        r = await post_json(c, "/v1/messages", message(text="a\x00b"))
        assert r.status_code == 422 and paths(r) == ["text"], r.text
        # A tab stays allowed in a header value; pairs of surrogates are characters.
        r = await post_json(c, "/v1/messages", message(subject="a\tb \U0001f600"))
        assert r.status_code == 202, r.text

        # Strings PostgreSQL cannot store, in a query and a path.
        r = await c.get("/v1/suppressions", params={"q": "a\x00b"})
        assert r.status_code == 422 and paths(r) == ["q"], r.text
        r = await c.get("/v1/suppressions/a%00b@example.com")
        assert r.status_code == 404, r.text
        r = await post_json(c, "/v1/keys", {"name": "k\x00", "scopes": ["read"]})
        assert r.status_code == 422 and paths(r) == ["name"], r.text
        # A cursor past 64 bits.
        r = await c.get("/v1/events", params={"cursor": "OTk5OTk5OTk5OTk5OTk5OTk5OTk5OTk5"})
        assert r.status_code == 422 and paths(r) == ["cursor"], r.text


# ---------------------------------------------------------------- Hypothesis

BAD_CHARS = st.sampled_from(
    ["\x00", "\t", "\n", "\r", "\v", "\f", "\x1b", "\x7f", "\x85", "\x9f",
     "\u2028", "\u2029", "\ud800", "\udfff", "\ufeff", "\ufffe", "\U0010ffff", "é"]
)  # fmt: skip
NASTY_TEXT = st.text(
    alphabet=st.one_of(BAD_CHARS, st.characters(codec=None), st.sampled_from("abc@.")),
    max_size=40,
)


def _stamp(d: dt.datetime, minutes: int | None) -> str:
    if minutes is None:
        return d.isoformat()
    return d.replace(tzinfo=dt.timezone(dt.timedelta(minutes=minutes))).isoformat()


EXTREME_TIME = st.builds(
    _stamp,
    st.one_of(
        st.datetimes(),
        st.sampled_from([dt.datetime.min, dt.datetime.max]),
    ),
    st.one_of(st.none(), st.integers(-1439, 1439), st.sampled_from([-1439, 1439, 840, -720])),
)


def _nest(depth: int, leaf: Any) -> Any:
    for i in range(depth):
        leaf = [leaf] if i % 2 else {"k": leaf}
    return leaf


DEEP = st.builds(_nest, st.integers(2, 300), st.just("x"))  # 50 000: the regression
VALUE = st.one_of(NASTY_TEXT, EXTREME_TIME, DEEP, st.integers(-(2**70), 2**70), st.none())

# Where a nasty value goes in a valid request (its field path as the API names it).
MESSAGE_FIELDS = {
    "subject": lambda m, v: m.__setitem__("subject", v),
    "from.name": lambda m, v: m.__setitem__("from", {"email": "app@acme.test", "name": v}),
    "to[0].name": lambda m, v: m.__setitem__("to", [{"email": "ann@inbox.test", "name": v}]),
    "to[0].email": lambda m, v: m.__setitem__("to", [{"email": v}]),
    "headers.X-Note": lambda m, v: m.__setitem__("headers", {"X-Note": v}),
    "attachments[0].filename": lambda m, v: m.__setitem__(
        "attachments", [{"filename": v, "content": "aGk="}]
    ),
    "text": lambda m, v: m.__setitem__("text", v),
    "html": lambda m, v: m.__setitem__("html", v),
    "tags[0]": lambda m, v: m.__setitem__("tags", [v]),
    "metadata.k": lambda m, v: m.__setitem__("metadata", {"k": v}),
    "pool": lambda m, v: m.__setitem__("pool", v),
}
SUPPRESSION_FIELDS = ("address", "note", "source", "expires_at", "reason")
QUERIES = {
    "/v1/events": ("since", "until", "recipient", "message_id", "tag", "type", "cursor"),
    "/v1/suppressions": ("q", "reason", "cursor", "limit"),
}


def check_answer(r: httpx.Response, path: str) -> None:
    assert r.status_code < 500, (path, r.status_code, r.text)
    if r.status_code >= 400:
        err = r.json()["error"]
        assert r.status_code == 422, (path, r.text)
        named = [f["path"] for f in err["fields"]]
        assert named and all(named), r.text
        # The field given, one inside it, or the body as a whole (nesting, the model's
        # own rule such as "give text, html or both").
        assert any(p == "body" or p.startswith(path) or path.startswith(p) for p in named), (
            path,
            r.text,
        )


async def run_property(api: ControlApi, key: str, test: Any) -> None:
    """Run a Hypothesis test in a thread (a blocking client) while this loop serves."""

    def run() -> None:
        with httpx.Client(
            base_url=api.base, headers={"Authorization": f"Bearer {key}"}, timeout=30
        ) as client:
            test(client)

    await asyncio.to_thread(run)


PROPERTY = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=list(HealthCheck),
)


async def test_request_schemas_never_answer_5xx(control: ControlFactory) -> None:
    api = await control(FAST)
    key = await sender(api)

    def test(client: httpx.Client) -> None:
        @PROPERTY
        @given(field=st.sampled_from(sorted(MESSAGE_FIELDS)), value=VALUE)
        def messages(field: str, value: Any) -> None:
            body = message()
            MESSAGE_FIELDS[field](body, value)
            check_answer(post_json(client, "/v1/messages", body), field)

        @PROPERTY
        @given(field=st.sampled_from(SUPPRESSION_FIELDS), value=VALUE)
        def suppressions(field: str, value: Any) -> None:
            body = {"address": "someone@example.com", field: value}
            check_answer(post_json(client, "/v1/suppressions", body), field)

        @PROPERTY
        @given(
            where=st.sampled_from([(p, q) for p, qs in QUERIES.items() for q in qs]),
            value=st.one_of(NASTY_TEXT, EXTREME_TIME),
        )
        def queries(where: tuple[str, str], value: str) -> None:
            route, name = where
            raw = quote(value.encode("utf-8", "surrogatepass"), safe="")
            r = client.get(f"{route}?{name}={raw}")
            check_answer(r, name)

        @PROPERTY
        @given(note=NASTY_TEXT, expires=st.one_of(EXTREME_TIME, NASTY_TEXT))
        def csv_import(note: str, expires: str) -> None:
            import csv
            import io

            out = io.StringIO()
            w = csv.writer(out)
            w.writerows([("address", "note", "expires_at"), ("x@example.com", note, expires)])
            raw = out.getvalue().encode("utf-8", "surrogatepass")
            r = client.post(
                "/v1/suppressions/import", content=raw, headers={"content-type": "text/csv"}
            )
            check_answer(r, "body")

        messages()
        suppressions()
        queries()
        csv_import()

    await run_property(api, key, test)


# ---------------------------------------------------------------- growth

# Hostile bodies at scale k for the API's JSON reader (parse_json: json.loads, the
# bracket depth scan, the walk for strings PostgreSQL cannot store).
GROWTH_SHAPES: dict[str, Callable[[int], bytes]] = {
    "brackets in a string": lambda k: b'{"subject": "' + b"[" * k + b'"}',
    "nesting at the limit, side by side": lambda k: (
        b"[" + b",".join([b"[" * 31 + b"]" * 31] * k) + b"]"
    ),
    "escaped NULs": lambda k: b'{"text": "' + b"a\\u0000" * k + b'"}',
    "lone surrogates in many keys": lambda k: (
        b"{" + b",".join(b'"k%d": "\\ud800"' % i for i in range(k)) + b"}"
    ),
}
GROWTH_BYTES = 100_000  # the larger body: small enough to stay in the CPU caches
MAX_GROWTH = 30.0  # for ten times the body; linear is about 10, quadratic 100


def _read(raw: bytes) -> None:
    try:
        parse_json(raw)
    except ApiError:
        pass


def _cpu(raw: bytes, reps: int) -> float:
    """This process's CPU time for one read of ``raw``: the least of ``reps`` rounds,
    each of enough reads to take 20 ms (a fast read is not lost in the clock's
    resolution), with the garbage collector off (when it runs depends on what else
    the test process holds, not on the reader)."""
    n, best = 1, float("inf")
    gc.disable()
    try:
        while reps > 0:
            t = time.process_time()
            for _ in range(n):
                _read(raw)
            took = time.process_time() - t
            if took < 0.02:
                n *= 2
                continue
            best = min(best, took / n)
            reps -= 1
    finally:
        gc.enable()
    return best


@pytest.mark.parametrize("name", sorted(GROWTH_SHAPES))
def test_hostile_bodies_cost_grows_linearly(name: str) -> None:
    """Ten times the hostile body costs about ten times the CPU, not a hundred.

    No absolute time is asserted: the two sizes are read in the same process and
    compared by CPU time (``time.process_time``: what other processes on a busy
    machine do is not counted; the best of several rounds drops a stray pause). A
    linear reader gives a ratio near 10, a quadratic one near 100; the bound of 30 is
    three times what linear needs, so no slow or loaded machine reaches it, while a
    quadratic regression (a tenfold slowdown at this size) fails it."""
    make = GROWTH_SHAPES[name]
    unit = len(make(1000)) / 1000
    k_big = max(10, int(GROWTH_BYTES / unit) // 10 * 10)
    small, big = make(k_big // 10), make(k_big)
    _cpu(small, 1)  # warm up
    t_small, t_big = _cpu(small, 5), _cpu(big, 3)
    ratio = t_big / t_small
    assert ratio < MAX_GROWTH, (
        f"{name}: {len(big)} bytes cost {ratio:.1f}x the CPU of a tenth of them "
        f"({t_big:.4f} s vs {t_small:.4f} s): the read grows faster than linearly"
    )
