"""Delivery never connects inward unless ``delivery.allowed_private_networks`` says so:
the policy on its own, then over the lab DNS with real sinks counting connections."""

from __future__ import annotations

import pytest

from postwarden.dns.resolver import MxHost
from postwarden.lab import Lab, Sink
from postwarden.mta.destinations import allowed_hosts, connectable, parse_networks
from postwarden.queue.spool import new_message_id
from postwarden.values import Envelope
from tests.conftest import SENDER_DOMAIN, ApplianceFactory
from tests.mta.test_delivery import has, submit, wait_events

INTERNAL = [
    "127.0.0.1",
    "127.0.9.9",
    "0.0.0.0",
    "10.0.0.1",
    "172.16.5.4",
    "192.168.1.1",
    "100.64.0.1",  # CGNAT
    "169.254.169.254",  # link-local (cloud metadata)
    "224.0.0.1",
    "239.255.255.250",
    "240.0.0.1",
    "255.255.255.255",
    "192.0.2.10",  # documentation
    "::",
    "::1",
    "fc00::1",
    "fd12:3456::1",
    "fe80::1",
    "ff02::1",
    "::ffff:127.0.0.1",  # IPv4-mapped
    "::ffff:10.0.0.1",
    "64:ff9b::a00:1",  # NAT64 of 10.0.0.1
    "2002:7f00:1::1",  # 6to4 of 127.0.0.1
    "2001:db8::1",
    "not-an-address",
]
GLOBAL = ["8.8.8.8", "93.184.216.34", "2606:4700:4700::1111", "64:ff9b::808:808"]


@pytest.mark.parametrize("address", INTERNAL)
def test_internal_addresses_are_refused_by_default(address: str) -> None:
    assert not connectable(address, ())


@pytest.mark.parametrize("address", GLOBAL)
def test_global_unicast_addresses_are_connectable(address: str) -> None:
    assert connectable(address, ())


def test_allowed_networks_open_exactly_what_they_name() -> None:
    allowed = parse_networks(["127.0.0.0/8", "fd00::/8", "10.1.2.3"])
    assert connectable("127.0.9.9", allowed)
    assert connectable("::ffff:127.0.0.1", allowed)  # mapped: what it reaches counts
    assert connectable("fd12::1", allowed)
    assert connectable("10.1.2.3", allowed)
    assert not connectable("10.1.2.4", allowed)
    assert not connectable("169.254.169.254", allowed)
    assert not connectable("::1", allowed)  # 127/8 says nothing about IPv6 loopback


def test_only_the_allowed_addresses_of_a_host_are_kept() -> None:
    hosts = (
        MxHost("mx1.x.test", 10, ("10.0.0.1", "8.8.8.8")),
        MxHost("mx2.x.test", 20, ("192.168.0.1",)),
        MxHost("mx3.x.test", 30, ("2606:4700:4700::1111",)),
    )
    keep, refused = allowed_hosts(hosts, ())
    assert keep == (
        MxHost("mx1.x.test", 10, ("8.8.8.8",)),
        MxHost("mx3.x.test", 30, ("2606:4700:4700::1111",)),
    )
    assert refused == ["10.0.0.1", "192.168.0.1"]
    keep, refused = allowed_hosts(hosts[1:2], parse_networks(["192.168.0.0/16"]))
    assert keep == hosts[1:2] and refused == []


def test_the_setting_is_validated_with_its_path() -> None:
    from postwarden.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"delivery\.allowed_private_networks\[1\]"):
        load_config(
            None,
            environ={},
            overrides={"delivery": {"allowed_private_networks": ["10.0.0.0/8", "nope"]}},
        )
    assert load_config(None, environ={}).delivery.allowed_private_networks == []


# ---------------------------------------------------------------------- over the lab


async def inward_sink(lab: Lab, host: str, name: str) -> Sink:
    sink = Sink(host=host, name=name, state=lab.state, tls_context=None, tls=False)
    await sink.listen(lab.mx_port)
    lab.dns.add(name, "A", host)
    return sink


async def test_an_mx_on_loopback_bounces_without_a_connection(
    lab: Lab, appliance: ApplianceFactory
) -> None:
    sink = await inward_sink(lab, "127.0.9.9", "mx.inward.test")
    lab.dns.add("inward.test", "MX", "10 mx.inward.test.")
    lab.state.set_behaviour("inward.test", "accept")
    try:
        app = await appliance({"delivery": {"allowed_private_networks": []}})
        msg_id = await submit(app, ["u@inward.test"])
        evs = await wait_events(app, msg_id, has("bounced"))
        bounced = [e for e in evs if e["type"] == "bounced"]
        assert bounced[0]["detail"]["response"] == (
            "550 5.7.1 refusing to connect to a private address 127.0.9.9 "
            "(delivery.allowed_private_networks)"
        )
        assert sink.connections == 0 and not lab.messages
    finally:
        await sink.close()


async def test_with_the_network_allowed_it_is_delivered_to_the_allowed_address_only(
    lab: Lab, appliance: ApplianceFactory
) -> None:
    allowed = await inward_sink(lab, "127.0.9.9", "mx.inward.test")
    refused = await inward_sink(lab, "127.0.9.8", "mx.inward.test")  # a second A record
    lab.dns.add("inward.test", "MX", "10 mx.inward.test.")
    lab.state.set_behaviour("inward.test", "accept")
    try:
        app = await appliance({"delivery": {"allowed_private_networks": ["127.0.9.9/32"]}})
        for _ in range(3):  # the A records come in either order
            msg_id = await submit(app, ["u@inward.test"])
            await wait_events(app, msg_id, has("delivered"))
        assert allowed.connections >= 1 and refused.connections == 0
        assert len(lab.messages) == 3
    finally:
        await allowed.close()
        await refused.close()


async def test_a_spooled_address_literal_is_not_connected_to(
    lab: Lab, appliance: ApplianceFactory
) -> None:
    sink = await inward_sink(lab, "127.0.9.9", "mx.inward.test")
    lab.state.set_behaviour("[127.0.9.9]", "accept")
    try:
        app = await appliance({"delivery": {"allowed_private_networks": []}})
        msg_id = new_message_id()
        body = f"From: a@{SENDER_DOMAIN}\r\nSubject: x\r\n\r\nhi\r\n".encode()
        # Straight into the spool, past any check at ingress.
        await app.acceptance.accept(Envelope(f"a@{SENDER_DOMAIN}", ["x@[127.0.9.9]"]), body, msg_id)
        evs = await wait_events(app, msg_id, has("bounced"))
        assert "private address 127.0.9.9" in evs[-1]["detail"]["response"]
        assert sink.connections == 0
    finally:
        await sink.close()
