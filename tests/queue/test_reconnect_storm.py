"""An MX host that answers EHLO and hangs up is a failed attempt like any other: the
recipient backs off (one connection per counted attempt, not thousands a second) and
expires at ``queue.max_age``, counted from acceptance."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from postwarden.lab import Lab
from postwarden.queue.retry import RetryPolicy
from tests.conftest import ApplianceFactory
from tests.mta.test_delivery import has, submit, types, wait_events

HOST = "127.0.9.7"


class HangUpAfterEhlo:
    """Greets, answers EHLO, then closes: a real peer on loopback."""

    def __init__(self) -> None:
        self.connections = 0
        self.server: asyncio.Server | None = None

    async def start(self, port: int) -> None:
        self.server = await asyncio.start_server(self._serve, HOST, port)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            writer.write(b"220 hangup.test ESMTP\r\n")
            line = await reader.readline()
            if line[:4].upper() in (b"EHLO", b"HELO"):
                writer.write(b"250-hangup.test\r\n250 8BITMIME\r\n")
                await writer.drain()
        finally:
            writer.close()

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


@pytest.fixture
async def hangup(lab: Lab) -> AsyncIterator[HangUpAfterEhlo]:
    peer = HangUpAfterEhlo()
    await peer.start(lab.mx_port)
    lab.dns.add("mx.hangup.test", "A", HOST)
    lab.dns.add("hangup.test", "MX", "10 mx.hangup.test.")
    yield peer
    await peer.stop()


async def test_a_hang_up_after_ehlo_backs_off(
    lab: Lab, appliance: ApplianceFactory, hangup: HangUpAfterEhlo
) -> None:
    app = await appliance()
    msg_id = await submit(app, ["u@hangup.test"])
    evs = await wait_events(app, msg_id, has("deferred", 3))
    deferred = [e for e in evs if e["type"] == "deferred"]
    assert deferred[0]["detail"]["response"].startswith("451 4.4.2")
    # Every connection was a counted attempt (one more may be under way).
    assert hangup.connections <= len(deferred) + 1


async def test_it_expires_at_max_age(
    lab: Lab, appliance: ApplianceFactory, hangup: HangUpAfterEhlo
) -> None:
    app = await appliance({"queue": {"max_age": "2s"}})
    msg_id = await submit(app, ["u@hangup.test"])
    evs = await wait_events(app, msg_id, has("expired"))
    assert types(evs)[-1] == "expired"
    assert hangup.connections <= types(evs).count("deferred") + 1


def test_expiry_counts_from_acceptance_whatever_the_attempts() -> None:
    p = RetryPolicy(max_age=100.0)
    assert not p.expired(created_at=1000.0, now=1099.0)
    assert p.expired(created_at=1000.0, now=1100.0)
    assert p.after_temporary_failure(0, 1000.0, 1100.0) == ("expired", 0.0)
