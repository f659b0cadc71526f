"""AUTH over real SMTP: the lockout per client address across sessions (the 421 comes
before any password is checked; trusted networks are not locked out), and no
deprecated-interface warning from aiosmtpd on a login."""

from __future__ import annotations

import asyncio
import base64
import logging
import ssl

import aiosmtplib
import pytest

from postwarden.appliance import Appliance
from postwarden.mta.auth import hash_password
from tests.conftest import ApplianceFactory


def no_verify() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


async def login(app: Appliance, user: str, password: str, source: str = "127.0.0.1") -> int:
    """One session: STARTTLS, AUTH PLAIN; the AUTH reply code."""
    host, port = app.smtp_addresses[0]
    return await auth_plain(host, port, user, password, source)


async def auth_plain(host: str, port: int, user: str, password: str, source: str) -> int:
    smtp = aiosmtplib.SMTP(
        hostname=host, port=port, start_tls=False, tls_context=no_verify(),
        source_address=(source, 0), timeout=30,
    )  # fmt: skip
    await smtp.connect()
    try:
        await smtp.starttls()
        await smtp.ehlo()
        blob = base64.b64encode(f"\0{user}\0{password}".encode())
        return (await smtp.execute_command(b"AUTH", b"PLAIN", blob)).code
    finally:
        smtp.close()


def value(app: Appliance, name: str, **labels: str) -> float:
    got = app.metrics.registry.get_sample_value(name, labels)
    return got or 0.0


async def test_repeated_failures_lock_the_address_out_across_sessions(
    appliance: ApplianceFactory,
) -> None:
    users = [{"username": "app1", "password_hash": hash_password("right")}]
    app = await appliance(
        {
            "smtp": {
                "trusted_networks": ["127.0.0.2/32"],
                "users": users,
                "auth_lockout_failures": 4,
                "auth_lockout_window": "10m",
                "auth_lockout_time": "15m",
            }
        }
    )
    # Four sessions at once, one wrong password each: the fourth failure locks out.
    codes = await asyncio.gather(*(login(app, "app1", f"wrong{i}") for i in range(4)))
    assert sorted(codes) == [421, 535, 535, 535], codes
    assert value(app, "postwarden_auth_lockouts_total") == 1
    # Locked out: the right password gets 421 too, in a new session, unchecked.
    failed = value(app, "postwarden_smtp_rejected_total", reason="auth_failed")
    assert await login(app, "app1", "right") == 421
    assert await login(app, "app1", "wrong-again") == 421
    assert value(app, "postwarden_smtp_rejected_total", reason="auth_locked") == 3
    assert value(app, "postwarden_smtp_rejected_total", reason="auth_failed") == failed
    # A trusted network is not locked out (it may relay without AUTH anyway), and its
    # failures lock nobody out.
    for _ in range(5):
        assert await login(app, "app1", "nope", source="127.0.0.2") == 535
    assert await login(app, "app1", "right", source="127.0.0.2") == 235
    assert value(app, "postwarden_auth_lockouts_total") == 1


async def test_no_lockout_when_turned_off(appliance: ApplianceFactory) -> None:
    users = [{"username": "app1", "password_hash": hash_password("right")}]
    app = await appliance(
        {"smtp": {"trusted_networks": ["10.0.0.0/8"], "users": users, "auth_lockout_failures": 0}}
    )
    codes = await asyncio.gather(*(login(app, "app1", f"wrong{i}") for i in range(12)))
    assert set(codes) == {535}
    assert await login(app, "app1", "right") == 235


async def test_a_login_logs_no_deprecation_warning(
    appliance: ApplianceFactory, caplog: pytest.LogCaptureFixture
) -> None:
    users = [{"username": "app1", "password_hash": hash_password("right")}]
    app = await appliance({"smtp": {"trusted_networks": ["10.0.0.0/8"], "users": users}})
    with caplog.at_level(logging.DEBUG):
        assert await login(app, "app1", "right") == 235
        assert await login(app, "app1", "wrong") == 535
    logged = [r.getMessage() for r in caplog.records]
    assert any("event=auth_ok" in m for m in logged), logged  # the login was seen
    assert not [m for m in logged if "deprecated" in m], logged
