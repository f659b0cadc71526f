"""A bounce written by a real MTA: Debian's Postfix accepts a message from Postwarden,
is refused by the next hop (550 5.1.1), and returns its own DSN to the message's VERP
return path, which it routes to Postwarden's inbound MX.

    Postwarden ──▶ Postfix (relay for relay.test) ──▶ lab sink: 550 5.1.1
        ▲                │
        └── inbound MX ◀─┘ DSN to b-…@pwb.acme.test
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from bench.peers import PrivatePostfix

from tests.bounces.test_lab_bounces import suppression
from tests.conftest import free_port
from tests.control.conftest import ControlFactory
from tests.control.test_messages import ready_tenant
from tests.peers import require_binary


@pytest.mark.parametrize("control", ["sqlite"], indirect=True)  # the database plays no part
async def test_a_postfix_dsn_comes_back_and_suppresses(
    control: ControlFactory, request: pytest.FixtureRequest
) -> None:
    require_binary("postfix")
    if os.geteuid() != 0:
        pytest.skip("a private Postfix instance needs root (its queue belongs to postfix)")
    inbound = free_port()
    api = await control({"inbound": {"listen": [f"127.0.0.1:{inbound}"]}})
    lab = api.lab
    # relay.test's MX is the Postfix instance; Postfix relays it to a lab sink that
    # refuses the recipient, and sends what comes back for pwb.acme.test to our MX.
    lab.add_domain("relay.test", behaviour="reject")
    lab.dns.remove("relay.test", "MX")
    lab.dns.add("relay.test", "MX", "10 postfix.relay.test.")
    lab.dns.add("postfix.relay.test", "A", "127.0.0.1")
    sink = f"{lab.sinks[0].host}:{lab.mx_port}"
    # Postfix's own user must reach its queue: not under pytest's root-only tmp_path.
    root = Path(tempfile.mkdtemp(prefix="pw-postfix-"))
    root.chmod(0o755)
    request.addfinalizer(lambda: shutil.rmtree(root, ignore_errors=True))
    postfix = PrivatePostfix(
        root=root,
        port=lab.mx_port,
        routes={"relay.test": sink, "pwb.acme.test": f"127.0.0.1:{inbound}"},
    )
    postfix.setup()
    postfix.start()
    try:
        key = await ready_tenant(api)
        async with api.client(key) as c:
            r = await c.post(
                "/v1/messages",
                json={"from": "news@acme.test", "to": ["gone@relay.test"], "subject": "Hi",
                      "text": "x"},
            )  # fmt: skip
            assert r.status_code in (200, 201, 202), r.text
            msg_id = r.json()["id"]
            got = await suppression(api, key, "gone@relay.test", wait=30)
            assert got is not None, postfix.maillog_text()[-3000:]
            assert got["reason"] == "hard_bounce" and got["source"] == "bounces"
            for _ in range(100):  # the copy of the delivery to Postfix may come after
                m = (await c.get(f"/v1/messages/{msg_id}")).json()
                if "delivered" in [e["type"] for e in m["events"]]:
                    break
                await asyncio.sleep(0.1)
    finally:
        postfix.stop()
    [rcpt] = m["recipients"]
    assert rcpt["state"] == "bounced"  # delivered to Postfix first, then bounced by its DSN
    late = [e["detail"] for e in m["events"] if e["type"] == "bounced"]
    assert len(late) == 1 and late[0]["async"] is True
    assert (late[0]["category"], late[0]["hard"], late[0]["status"]) == (
        "user_unknown",
        True,
        "5.1.1",
    )
    # Postfix's own report: the remote MTA and the sink's answer.
    assert "5.1.1" in late[0]["diagnostic"] and "gone@relay.test" in late[0]["diagnostic"]
    assert late[0]["remote_mta"]
    assert "delivered" in [e["type"] for e in m["events"]]
    assert "status=bounced" in postfix.maillog_text()
    assert api.app.inbox is not None and api.app.inbox.read(late[0]["report"]) is None  # done
