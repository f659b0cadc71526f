"""VERP return paths: the token format and its checks, the key, which mail is rewritten,
and end to end — a tenant's message to two recipients leaves as two transactions, each
with its own signed envelope sender, seen by a lab MX."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
from cryptography.fernet import Fernet

from postwarden.bounces.verp import (
    MAX_LOCAL_PART,
    ReturnPaths,
    Token,
    Verdict,
    derive_key,
)
from postwarden.config import load_config
from postwarden.lab import Lab
from postwarden.mta.delivery import Job
from postwarden.queue.admin import QueueAdmin
from postwarden.values import Lease
from tests.conftest import SENDER_DOMAIN, ApplianceFactory
from tests.control.conftest import ControlApi, make_admin_key

MSG = "018f2a7c9e1b4d2a6f0c13"
KEY = derive_key(b"test material")


def paths(key: bytes = KEY, label: str = "pwb", enabled: bool = True) -> ReturnPaths:
    return ReturnPaths(key, label, enabled)


def lease(
    rcpt_id: int = 7,
    *,
    tenant: str | None = "3",
    mail_from: str = "shop@acme.test",
    msg_id: str = MSG,
    rcpt: str = "u@inbox.test",
) -> Lease:
    return Lease(
        rcpt_id, msg_id, rcpt, rcpt.rpartition("@")[2], 0, 0.0, mail_from, 0, 0, 0,
        False, False, tenant,
    )  # fmt: skip


# ---------------------------------------------------------------------- the token


def test_round_trip_and_format() -> None:
    rp = paths()
    addr = rp.encode(MSG, 7, "acme.test")
    local, _, domain = addr.partition("@")
    assert domain == "pwb.acme.test"
    assert local.startswith(f"b-{MSG}-7-") and len(local.rsplit("-", 1)[1]) == 10
    assert addr == addr.lower()
    assert rp.verify(addr) == (Verdict.VALID, Token(MSG, 7, "acme.test"))
    assert rp.decode(addr) == Token(MSG, 7, "acme.test")
    assert Token(MSG, 7, "acme.test").recipient_id == f"{MSG}.7"
    # Deterministic (greylisting remembers the sender); base 36 recipient ids.
    assert rp.encode(MSG, 7, "ACME.test.") == addr
    assert rp.decode(rp.encode(MSG, 36**13 - 1, "acme.test")) == Token(MSG, 36**13 - 1, "acme.test")
    assert rp.encode(MSG, 35, "acme.test").startswith(f"b-{MSG}-z-")
    assert rp.decode(rp.encode(MSG, 0, "acme.test")) == Token(MSG, 0, "acme.test")


def test_any_case_and_angle_brackets() -> None:
    rp = paths()
    addr = rp.encode(MSG, 12345, "acme.test")
    want = Token(MSG, 12345, "acme.test")
    assert rp.decode(addr.upper()) == want
    assert rp.decode(f"<{addr}>") == want
    assert rp.decode(f" <{addr.swapcase()}> ") == want
    assert rp.decode(addr + ".") == want  # a trailing dot on the domain


def test_local_part_stays_within_64() -> None:
    rp = paths()
    longest = rp.encode("f" * 32, 36**13 - 1, "acme.test")
    assert len(longest.partition("@")[0]) <= MAX_LOCAL_PART
    today = rp.encode(MSG, 2**40, "acme.test")
    assert len(today.partition("@")[0]) <= 50


@pytest.mark.parametrize("what", ["msg", "rcpt", "domain", "mac", "label-domain"])
def test_altered_tokens_are_forged(what: str) -> None:
    rp = paths()
    addr = rp.encode(MSG, 7, "acme.test")
    local, _, domain = addr.partition("@")
    _b, msg, rcpt, mac = local.split("-")
    if what == "msg":
        altered = f"b-{msg[:-1]}{'0' if msg[-1] != '0' else '1'}-{rcpt}-{mac}@{domain}"
    elif what == "rcpt":
        altered = f"b-{msg}-8-{mac}@{domain}"
    elif what == "domain":
        altered = f"{local}@pwb.evil.test"
    elif what == "label-domain":
        altered = f"{local}@pwb.sub.acme.test"
    else:
        flipped = "a" if mac[0] != "a" else "b"
        altered = f"b-{msg}-{rcpt}-{flipped}{mac[1:]}@{domain}"
    assert rp.verify(altered) == (Verdict.FORGED, None)
    assert rp.decode(altered) is None


def test_other_keys_and_labels() -> None:
    addr = paths().encode(MSG, 7, "acme.test")
    assert paths(derive_key(b"another")).verify(addr) == (Verdict.FORGED, None)
    # Not under our label: not ours at all.
    assert paths(label="bounce").verify(addr) == (Verdict.MALFORMED, None)


@pytest.mark.parametrize(
    "address",
    [
        "",
        "<>",
        "postmaster@pwb.acme.test",
        "shop@acme.test",
        f"b-{MSG}-7@pwb.acme.test",  # no mac
        f"b-{MSG}-7-abcdefghij",  # no domain
        f"b-{MSG}-7-abcdefghij@",
        f"b-{MSG}-7-abcdefghij@pwb.",
        f"b-{MSG}-7-abcdefghij@acme.test",  # not on the return-path subdomain
        f"b-{MSG}-7-abcdefghi@pwb.acme.test",  # mac too short
        f"b-{MSG}-7-abcdefghijk@pwb.acme.test",  # too long
        f"b-{MSG}-7-abcdefgh01@pwb.acme.test",  # not base 32
        f"b-{MSG}-07-abcdefghij@pwb.acme.test",  # not canonical
        f"b-{MSG}-+7-abcdefghij@pwb.acme.test",
        f"b-{MSG}-7_0-abcdefghij@pwb.acme.test",
        f"b-{MSG}g-7-abcdefghij@pwb.acme.test",  # not hex
        f"b-{'a' * 33}-7-abcdefghij@pwb.acme.test",
        f"c-{MSG}-7-abcdefghij@pwb.acme.test",  # another version
        f"b-{MSG}-7-abcdefghij@pwb.äcme.test",
        f"b-{MSG}-7-abcdefghij@pwb.{'a' * 250}.test",
        f"b-{MSG}-7-abcdefghij@x@pwb.acme.test",
    ],
)
def test_malformed(address: str) -> None:
    assert paths().verify(address) == (Verdict.MALFORMED, None)


def test_encode_refuses_what_it_cannot_sign() -> None:
    rp = paths()
    for bad in (("not hex", 1), ("a" * 33, 1), ("", 1), (MSG, -1), (MSG, 36**13)):
        with pytest.raises(ValueError):
            rp.encode(bad[0], bad[1], "acme.test")
    with pytest.raises(ValueError):
        rp.encode(MSG, 1, "a" * 250 + ".test")
    with pytest.raises(ValueError):
        ReturnPaths(b"")


# ---------------------------------------------------------------------- the key


def config(tmp_path: Path, **over: Any) -> Any:
    base: dict[str, Any] = {
        "control": {"encryption_key_file": str(tmp_path / "control.key")},
        "spool": {"path": str(tmp_path / "spool")},
    }
    for section, values in over.items():
        base.setdefault(section, {}).update(values)
    return load_config(None, environ={}, overrides=base)


def test_key_from_the_control_key(tmp_path: Path) -> None:
    k1, k2 = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    a = ReturnPaths.from_config(config(tmp_path, control={"encryption_key": k1}))
    a2 = ReturnPaths.from_config(config(tmp_path, control={"encryption_key": k1}))
    b = ReturnPaths.from_config(config(tmp_path, control={"encryption_key": k2}))
    addr = a.encode(MSG, 7, "acme.test")
    assert a2.encode(MSG, 7, "acme.test") == addr
    assert b.encode(MSG, 7, "acme.test") != addr
    assert b.verify(addr)[0] is Verdict.FORGED
    # The key file (created on first use, as the control plane does) serves the same.
    f1 = ReturnPaths.from_config(config(tmp_path))
    assert (tmp_path / "control.key").exists()
    f2 = ReturnPaths.from_config(config(tmp_path))
    assert f1.encode(MSG, 7, "acme.test") == f2.encode(MSG, 7, "acme.test")
    key_text = (tmp_path / "control.key").read_text().strip()
    inline = ReturnPaths.from_config(config(tmp_path, control={"encryption_key": key_text}))
    assert inline.encode(MSG, 7, "acme.test") == f1.encode(MSG, 7, "acme.test")


def test_explicit_token_key_wins(tmp_path: Path) -> None:
    k = Fernet.generate_key().decode()
    by_control = ReturnPaths.from_config(config(tmp_path, control={"encryption_key": k}))
    explicit = ReturnPaths.from_config(
        config(tmp_path, control={"encryption_key": k}, bounces={"token_key": "s3cret-token-key"})
    )
    other_control = ReturnPaths.from_config(
        config(
            tmp_path,
            control={"encryption_key": Fernet.generate_key().decode()},
            bounces={"token_key": "s3cret-token-key"},
        )
    )
    addr = explicit.encode(MSG, 7, "acme.test")
    assert addr != by_control.encode(MSG, 7, "acme.test")
    assert other_control.encode(MSG, 7, "acme.test") == addr  # the control key plays no part
    assert explicit.encode(MSG, 7, "acme.test") == paths(derive_key(b"s3cret-token-key")).encode(
        MSG, 7, "acme.test"
    )


def test_label_and_switch_from_config(tmp_path: Path) -> None:
    rp = ReturnPaths.from_config(
        config(tmp_path, control={"return_path_label": "bounce"}, bounces={"verp": False})
    )
    assert rp.encode(MSG, 1, "acme.test").endswith("@bounce.acme.test")
    assert not rp.enabled
    assert rp.for_lease(lease(), {3: {"acme.test"}}) is None


# ---------------------------------------------------------------------- which mail


def test_which_mail_gets_a_return_path() -> None:
    rp = paths()
    verified = {3: {"acme.test"}, 4: {"other.test"}}
    got = rp.for_lease(lease(), verified)
    assert got is not None and rp.decode(got) == Token(MSG, 7, "acme.test")
    assert rp.should_verp(lease(mail_from="Shop@ACME.test"), verified) == "acme.test"
    assert rp.should_verp(lease(tenant=None), verified) is None  # no tenant
    assert rp.should_verp(lease(tenant="x"), verified) is None
    assert rp.should_verp(lease(mail_from=""), verified) is None  # the null sender
    assert rp.should_verp(lease(mail_from="<>"), verified) is None
    assert rp.should_verp(lease(tenant="4"), verified) is None  # another tenant's domain
    assert rp.should_verp(lease(mail_from="a@sub.acme.test"), verified) is None
    assert rp.should_verp(lease(), {}) is None
    assert paths(enabled=False).for_lease(lease(), verified) is None
    # Ids the token cannot carry: the message keeps its sender.
    assert rp.for_lease(lease(msg_id="not-a-spool-id"), verified) is None


def test_job_keeps_the_sending_domain() -> None:
    rp = paths()
    job = Job(MSG, "inbox.test", rp.encode(MSG, 7, "acme.test"), [lease()], sender="s@Acme.test")
    assert job.sending_domain == "acme.test"
    assert Job(MSG, "inbox.test", "s@Acme.test", [lease()]).sending_domain == "acme.test"


# ---------------------------------------------------------------------- end to end


def spool_events(app: Any, msg_id: str) -> list[dict[str, Any]]:
    admin = QueueAdmin(app.cfg.spool.path)
    try:
        return admin.events(msg_id=msg_id, limit=1000)
    finally:
        admin.close()


async def wait_delivered(app: Any, msg_id: str, n: int) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 10
    while True:
        evs = spool_events(app, msg_id)
        if sum(e["type"] == "delivered" for e in evs) >= n:
            return evs
        assert time.monotonic() < deadline, [e["type"] for e in evs]
        await asyncio.sleep(0.05)


async def send(
    app: Any,
    sender: str,
    rcpts: list[str],
    login: tuple[str, str] | None = None,
    header_from: str = "",
) -> str:
    host, port = app.smtp_addresses[0]
    head = f"From: <{header_from or sender}>\r\nTo: {', '.join(rcpts)}\r\nSubject: order\r\n"
    msg = f"{head}\r\nthanks\r\n".encode()
    async with aiosmtplib.SMTP(hostname=host, port=port, start_tls=False) as smtp:
        if login:
            await smtp.login(*login)
        _, resp = await smtp.sendmail(sender, rcpts, msg)
    return resp.rsplit(" ", 1)[-1]


async def test_each_recipient_gets_its_own_signed_return_path(
    lab: Lab, appliance: ApplianceFactory
) -> None:
    lab.add_domain("inbox.test")
    app = await appliance()
    assert app.control_address is not None
    host, port = app.control_address
    api = ControlApi(app, f"http://{host}:{port}", await make_admin_key(app), lab)
    key = await api.tenant("acme")
    await api.verified_domain(key, "acme.test")
    for _ in range(100):  # the control plane learns of it from its change feed
        if any("acme.test" in d for d in app.control.signing.verified.values()):
            break
        await asyncio.sleep(0.05)

    rp = app.return_paths  # what the appliance signs with (its config's key)
    rcpts = ["u1@inbox.test", "u2@inbox.test"]
    msg_id = await send(app, "shop@acme.test", rcpts, ("acme", key))
    evs = await wait_delivered(app, msg_id, 2)
    got = await lab.wait_for_messages(2)
    assert len(got) == 2, [(m.mail_from, m.rcpt_tos) for m in got]
    rcpt_ids = {e["rcpt"]: e["rcpt_id"] for e in evs if e["type"] == "delivered"}
    seen: dict[str, Token] = {}
    for m in got:
        assert len(m.rcpt_tos) == 1  # one transaction per recipient
        assert m.mail_from.endswith("@pwb.acme.test")
        assert m.mail_from == rp.encode(msg_id, rcpt_ids[m.rcpt_tos[0]], "acme.test")
        token = rp.decode(m.mail_from)
        assert token is not None
        seen[m.rcpt_tos[0]] = token
        assert b"d=acme.test" in m.data  # signed by the sending domain as before
    assert seen == {r: Token(msg_id, rcpt_ids[r], "acme.test") for r in rcpts}
    assert len({m.mail_from for m in got}) == 2

    # Mail without a tenant (a trusted relay) keeps its sender and one transaction.
    plain = await send(app, f"news@{SENDER_DOMAIN}", ["v1@inbox.test", "v2@inbox.test"])
    await wait_delivered(app, plain, 2)
    got = await lab.wait_for_messages(3)
    assert len(got) == 3
    assert got[2].mail_from == f"news@{SENDER_DOMAIN}"
    assert sorted(got[2].rcpt_tos) == ["v1@inbox.test", "v2@inbox.test"]

    # The tenant's null-sender mail is never rewritten.
    null = await send(app, "", ["w1@inbox.test", "w2@inbox.test"], ("acme", key), "shop@acme.test")
    await wait_delivered(app, null, 2)
    got = await lab.wait_for_messages(4)
    assert len(got) == 4 and got[3].mail_from == ""
    assert sorted(got[3].rcpt_tos) == ["w1@inbox.test", "w2@inbox.test"]


async def test_without_the_hook_grouping_is_unchanged(
    lab: Lab, appliance: ApplianceFactory
) -> None:
    lab.add_domain("inbox.test")
    app = await appliance()
    app.scheduler.return_path = None  # the scheduler's default: no VERP
    msg_id = await send(app, f"news@{SENDER_DOMAIN}", ["a@inbox.test", "b@inbox.test"])
    await wait_delivered(app, msg_id, 2)
    got = await lab.wait_for_messages(1)
    assert len(got) == 1 and sorted(got[0].rcpt_tos) == ["a@inbox.test", "b@inbox.test"]
    assert got[0].mail_from == f"news@{SENDER_DOMAIN}"
