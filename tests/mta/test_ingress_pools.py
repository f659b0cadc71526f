"""X-Postwarden-Pool and X-Postwarden-Priority at the ingress: read and taken off in
the one scan of the header, and a trusted submitter (a configured SMTP user, no
tenant) naming any pool that exists."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiosmtplib
import pytest

from postwarden.lab import Lab
from postwarden.mta.auth import hash_password
from postwarden.mta.ingress import ControlFields, take_control_fields, take_meta
from postwarden.queue.admin import QueueAdmin
from postwarden.values import LANE_BULK, LANE_HIGH
from tests.conftest import ApplianceFactory


def test_fields_are_read_and_removed_and_absent_means_no_copy() -> None:
    plain = b"From: a@b.test\r\nSubject: X-Postwarden-Pool: no\r\n\r\nX-Postwarden-Pool: x\r\n"
    out, fields = take_control_fields(plain)
    assert out is plain and fields is None  # untouched, not copied
    for near in (b"X-Postwarden-Pools: x\r\n", b"X-Postwarden-Pool : x\r\n"):
        msg = near + b"\r\nbody\r\n"
        assert take_control_fields(msg) == (msg, None)
    msg = (
        b"From: a@b.test\r\nX-Postwarden-Pool: warm\r\n\tpool\r\nx-postwarden-priority:  BULK \r\n"
        b"X-Postwarden-Pool: second\r\nSubject: s\r\n\r\nX-Postwarden-Pool: body\r\n"
    )
    out, fields = take_control_fields(msg)
    assert out == b"From: a@b.test\r\nSubject: s\r\n\r\nX-Postwarden-Pool: body\r\n"
    # The first field of each name; folded lines unfolded.
    assert fields == ControlFields(meta=None, pool="warm pool", priority="bulk")
    # Header only, no body.
    out, fields = take_control_fields(b"X-Postwarden-Priority: high\r\nSubject: s\r\n")
    assert out == b"Subject: s\r\n" and fields == ControlFields(priority="high")
    # take_meta keeps its meaning (and takes the other fields off too).
    assert take_meta(b"X-Postwarden-Pool: a\r\n\r\nb\r\n") == (b"\r\nb\r\n", None)


def spooled(spool_path: str | Path, msg_id: str) -> dict[str, Any]:
    """The spool's row of a message still in it (its pool and lane among the columns)."""
    admin = QueueAdmin(spool_path)
    try:
        found = admin.show(msg_id)
    finally:
        admin.close()
    assert found is not None and found["message"] is not None, found
    row: dict[str, Any] = found["message"]
    return row


async def test_configured_user_may_name_any_existing_pool(
    lab: Lab, appliance: ApplianceFactory
) -> None:
    lab.add_domain("later.test", behaviour="tempfail")  # stays in the spool
    users = [{"username": "app1", "password_hash": hash_password("pw")}]
    app = await appliance(
        {
            "smtp": {"users": users},
            "sources": [{"name": "a", "address": "127.0.0.1"}],
            "pools": [{"name": "cfg", "members": [{"source": "a"}]}],
        }
    )
    host, port = app.smtp_addresses[0]

    async def send(fields: bytes) -> str:
        msg = b"From: a@sender.test\r\n" + fields + b"Subject: s\r\n\r\nx\r\n"
        async with aiosmtplib.SMTP(hostname=host, port=port, start_tls=False) as smtp:
            await smtp.login("app1", "pw")
            _, resp = await smtp.sendmail("a@sender.test", ["u@later.test"], msg)
        return resp.rsplit(" ", 1)[-1]

    # The name's shape is checked before any lookup.
    with pytest.raises(aiosmtplib.SMTPDataError) as exc:
        await send(b"X-Postwarden-Pool: ../etc\r\n")
    assert exc.value.code == 550 and exc.value.message.startswith("5.7.1 no pool named")
    with pytest.raises(aiosmtplib.SMTPDataError) as exc:
        await send("X-Postwarden-Pool: café\r\n".encode())
    assert exc.value.message == "5.7.1 no pool named 'caf\\xe9'"  # the reply stays ASCII

    assert app.ingress.pool_for == app.control.pool_cache.pool_for  # the appliance wires it
    mid = await send(b"X-Postwarden-Pool: cfg\r\nX-Postwarden-Priority: bulk\r\n")
    row = spooled(app.cfg.spool.path, mid)
    assert (row["pool"], row["lane"]) == ("cfg", LANE_BULK)
    mid = await send(b"")
    row = spooled(app.cfg.spool.path, mid)
    assert (row["pool"], row["lane"]) == (None, LANE_HIGH)
    with pytest.raises(aiosmtplib.SMTPDataError) as exc:
        await send(b"X-Postwarden-Pool: anything\r\n")
    assert (exc.value.code, exc.value.message) == (550, "5.7.1 no pool named 'anything'")
    with pytest.raises(aiosmtplib.SMTPDataError) as exc:
        await send(b"X-Postwarden-Priority: low\r\n")
    assert exc.value.code == 550 and exc.value.message.startswith("5.6.0")
    assert app.metrics.rejected.labels("pool")._value.get() == 3
    assert app.metrics.rejected.labels("bad_priority")._value.get() == 1
