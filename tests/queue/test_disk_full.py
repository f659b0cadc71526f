"""A full disk under a running appliance (a real tmpfs spool), over SMTP and HTTP:
new mail is refused with a temporary error (``452 4.3.1``; HTTP 503 + Retry-After),
nothing already accepted is lost or corrupted, and mail flows again by itself once
space returns."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiosmtplib
import httpx
import pytest

from postwarden.appliance import Appliance
from postwarden.lab import Lab
from tests.conftest import SENDER_DOMAIN, ApplianceFactory
from tests.control.conftest import ControlApi, make_admin_key
from tests.mta.test_delivery import message
from tests.queue.fs import fill, small_fs


def text(i: int, size: int = 60_000) -> str:
    line = f"message {i:04d} " + "z" * 60 + "\r\n"
    return line * (size // len(line))


async def send(host: str, port: int, i: int) -> tuple[int, str]:
    """One message over its own connection; (code, text) of the answer to DATA."""
    rcpt = [f"u{i}@inbox.test"]
    try:
        async with aiosmtplib.SMTP(hostname=host, port=port, start_tls=False) as smtp:
            _, resp = await smtp.sendmail(
                f"news@{SENDER_DOMAIN}", rcpt, message(rcpt, subject=f"m{i}", body=text(i))
            )
    except aiosmtplib.SMTPResponseException as exc:
        return exc.code, exc.message
    return 250, resp


async def test_full_disk_answers_452_keeps_accepted_mail_and_recovers(
    tmp_path: Path, lab: Lab, appliance: ApplianceFactory
) -> None:
    lab.add_domain("inbox.test")
    with small_fs(tmp_path / "spoolfs", "16m") as fs:
        app = await appliance({"spool": {"path": str(fs / "spool")}})
        try:
            await full_disk_scenario(app, lab, fs)
        finally:
            await app.stop()  # before the filesystem goes


async def full_disk_scenario(app: Appliance, lab: Lab, fs: Path) -> None:
    host, port = app.smtp_addresses[0]
    assert app.control_address is not None
    api = ControlApi(app, "http://{}:{}".format(*app.control_address),
                     await make_admin_key(app), lab)  # fmt: skip
    key = await api.tenant("acme")
    await api.verified_domain(key, "acme.test")
    accepted: list[int] = []
    for i in range(3):
        assert (await send(host, port, i))[0] == 250
        accepted.append(i)
    assert (await inject(api, key, 1000)).status_code == 202

    ballast = fill(fs, leave=150_000)  # less than three messages' room
    refused: list[tuple[int, str]] = []
    i = 3
    while len(refused) < 3:
        code, answer = await send(host, port, i)
        if code == 250:
            accepted.append(i)
        else:
            refused.append((code, answer))
        i += 1
        assert i < 60, "the spool never filled"
    assert all(code == 452 and answer.startswith("4.3.1") for code, answer in refused), refused

    # The HTTP path refuses too, with a hint of when to try again.
    r = await inject(api, key, 1001)
    assert r.status_code == 503, r.text
    assert r.json()["error"]["type"] == "insufficient_storage"
    assert int(r.headers["retry-after"]) > 0

    # Space returns: the next message is taken, no restart.
    ballast.unlink()
    code, answer = await send(host, port, i)
    assert code == 250, answer
    accepted.append(i)

    # Everything acknowledged arrives, whole.
    got = await wait_delivered(lab, accepted)
    for n in accepted:
        assert text(n).encode() in got[n], f"message {n} arrived damaged"


async def inject(api: ControlApi, key: str, n: int) -> httpx.Response:
    """POST /v1/messages, once the new domain has reached the API's cache."""
    deadline = time.monotonic() + 10
    async with api.client(key) as c:
        while True:
            r = await c.post("/v1/messages", json={
                "from": "news@acme.test", "to": [f"api{n}@inbox.test"], "subject": f"m{n}",
                "text": "hello",
            })  # fmt: skip
            if r.status_code != 422 or time.monotonic() > deadline:
                return r
            await asyncio.sleep(0.05)


async def wait_delivered(lab: Lab, numbers: list[int]) -> dict[int, bytes]:
    deadline = time.monotonic() + 30
    while True:
        got = {}
        for m in lab.messages:
            for n in numbers:
                if f"Subject: m{n}\r\n".encode() in m.data:
                    got[n] = m.data
        if set(got) == set(numbers):
            return got
        if time.monotonic() > deadline:
            pytest.fail(f"not delivered: {sorted(set(numbers) - set(got))}")
        await asyncio.sleep(0.05)
