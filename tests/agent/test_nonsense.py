"""Values that could be recorded and then fail forever are refused as invalid input
(exit 2), each with a message that says why: nothing of the kind is ever journaled."""

from __future__ import annotations

from typing import Any

import pytest

from netagent.agent import errors as E
from netagent.agent.api import kind_change
from netagent.agent.kinds import default_kinds
from netagent.agent.ops import BY_OP
from netagent.agent.state import DesiredState


def do(state: DesiredState, op: str, **args: Any) -> None:
    state.commit(state.propose(kind_change(state.kinds, BY_OP[op].parse(args))))


@pytest.fixture
def state() -> DesiredState:
    s = DesiredState(default_kinds(), external_namespace=lambda n: False)
    do(s, "ns.add", name="red")
    do(s, "bridge.add", name="v-net-0", addresses=["192.168.15.5/24"])
    return s


@pytest.mark.parametrize(
    ("destination", "fragment"),
    [
        ("[fe80::1%eth0]:80", "scope"),
        ("[fe80::1%eth0\nflush ruleset]:80", "scope"),
        ("255.255.255.255:80", "not a usable address"),
        ("0.0.0.7:80", "not a usable address"),
        ("240.1.2.3:80", "not a usable address"),
        ("224.0.0.9:80", "multicast"),
        ("[::ffff:192.168.15.2]:80", "IPv4-mapped"),
        ("[fe80::2]:80", "link-local"),
        ("127.0.0.1:80", "the host itself"),
        ("[::1]:80", "the host itself"),
        ("192.168.15.255:80", "v-net-0's broadcast address"),
        ("192.168.15.0:80", "v-net-0's network address"),
        ("192.168.15.5:80", "v-net-0's own address"),
    ],
)
def test_forward_destinations(state: DesiredState, destination: str, fragment: str) -> None:
    before = state.to_wire()
    with pytest.raises(E.InvalidAddress, match=fragment) as exc:
        do(state, "forward.add", host_ports="8082", destination=destination)
    assert exc.value.exit_status == 2
    assert state.to_wire() == before


@pytest.mark.parametrize(
    ("host_ip", "fragment"),
    [
        ("255.255.255.255", "not a usable address"),
        ("192.168.15.255", "broadcast address"),
        ("224.0.0.1", "multicast"),
    ],
)
def test_host_ips(state: DesiredState, host_ip: str, fragment: str) -> None:
    with pytest.raises(E.InvalidAddress, match=fragment):
        do(state, "forward.add", host_ports="8082", destination="192.168.15.2:80", host_ip=host_ip)


def test_host_ip_may_be_loopback_or_the_bridges_own(state: DesiredState) -> None:
    do(state, "forward.add", host_ports="8082", destination="192.168.15.2:80", host_ip="127.0.0.1")
    do(
        state,
        "forward.add",
        host_ports="8083",
        destination="192.168.15.2:80",
        host_ip="192.168.15.5",
    )


@pytest.mark.parametrize(
    ("address", "fragment"),
    [
        ("10.9.0.1/0", "every address"),
        ("10.9.0.1/32", "no address for a plug"),
        ("fd00:9::1/128", "no address for a plug"),
        ("fe80::1/64", "link-local"),
        ("10.9.0.1/255.255.255.0", "as a number"),
        ("10.9.0.1/0x18", "as a number"),
    ],
)
def test_bridge_addresses(state: DesiredState, address: str, fragment: str) -> None:
    with pytest.raises(E.InvalidAddress, match=fragment):
        do(state, "bridge.add", name="br1", addresses=[address])
    assert "br/br1" not in state


@pytest.mark.parametrize("name", ["all", "default"])
def test_reserved_names(state: DesiredState, name: str) -> None:
    with pytest.raises(E.InvalidName, match="reserved"):
        do(state, "bridge.add", name=name)
    with pytest.raises(E.InvalidName, match="reserved"):
        do(state, "ns.add", name=name)
    with pytest.raises(E.InvalidName, match="reserved"):
        do(
            state,
            "plug.add",
            ns="red",
            bridge="v-net-0",
            addresses=["192.168.15.9/24"],
            ifname=name,
        )
