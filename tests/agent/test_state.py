"""Desired state: conflicts and idempotence (pure, no root)."""

import ipaddress

import pytest

from netagent.agent import errors as E
from netagent.agent import intents as I
from netagent.agent.state import DesiredState


def cidr(text: str) -> I.IPInterface:
    return ipaddress.ip_interface(text)


@pytest.fixture
def state() -> DesiredState:
    s = DesiredState()
    s.add_namespace("red")
    s.add_namespace("blue")
    s.add_bridge("v-net-0", (cidr("192.168.15.5/24"),))
    return s


def test_add_is_idempotent(state: DesiredState) -> None:
    assert state.add_namespace("red") == []
    assert state.add_bridge("v-net-0", (cidr("192.168.15.5/24"),)) == []
    [change] = state.add_plug("red", "v-net-0", (cidr("192.168.15.1/24"),))
    assert change.action == "added"
    assert state.add_plug("red", "v-net-0", (cidr("192.168.15.1/24"),)) == []


def test_seed_names(state: DesiredState) -> None:
    [c] = state.add_plug("red", "v-net-0", (cidr("192.168.15.1/24"),))
    plug = c.new
    assert isinstance(plug, I.Plug)
    assert (plug.ifname, plug.host_ifname) == ("veth-red", "veth-red-br")


def test_long_names_get_short_interface_names(state: DesiredState) -> None:
    state.add_namespace("a-long-name-123")
    [c] = state.add_plug("a-long-name-123", "v-net-0", (cidr("192.168.15.9/24"),))
    assert isinstance(c.new, I.Plug)
    assert len(c.new.host_ifname) <= 15 and len(c.new.ifname) <= 15


def test_duplicate_address_on_bridge(state: DesiredState) -> None:
    state.add_plug("red", "v-net-0", (cidr("192.168.15.1/24"),))
    with pytest.raises(E.AddressInUse, match="already used on v-net-0 by red"):
        state.add_plug("blue", "v-net-0", (cidr("192.168.15.1/24"),))
    with pytest.raises(E.AddressInUse, match="own address"):
        state.add_plug("blue", "v-net-0", (cidr("192.168.15.5/24"),))
    assert "plug/blue/v-net-0" not in state.intents


def test_address_outside_subnet(state: DesiredState) -> None:
    with pytest.raises(E.InvalidAddress, match="outside"):
        state.add_plug("red", "v-net-0", (cidr("10.0.0.1/24"),))


def test_wire_seed_mistake() -> None:
    s = DesiredState()
    s.add_namespace("red")
    s.add_namespace("blue")
    with pytest.raises(E.AddressInUse, match="both red and blue"):
        s.add_wire("red", (cidr("192.168.15.1/24"),), "blue", (cidr("192.168.15.1/24"),))
    [c] = s.add_wire("red", (cidr("192.168.15.1/24"),), "blue", (cidr("192.168.15.2/24"),))
    assert c.key == "wire/blue/red"
    # the same wire said from the other side is the same wire
    assert s.add_wire("blue", (cidr("192.168.15.2/24"),), "red", (cidr("192.168.15.1/24"),)) == []


def test_missing_things(state: DesiredState) -> None:
    with pytest.raises(E.NotFound, match="namespace green does not exist"):
        state.add_plug("green", "v-net-0", (cidr("192.168.15.1/24"),))
    with pytest.raises(E.NotFound, match="bridge br9 does not exist"):
        state.add_plug("red", "br9", (cidr("192.168.15.1/24"),))
    with pytest.raises(E.NotFound):
        state.del_bridge("br9")
    with pytest.raises(E.NotFound):
        state.del_plug("red", "v-net-0")


def test_external_namespace_can_be_plugged() -> None:
    s = DesiredState(external_namespace=lambda n: n == "podman1")
    s.add_bridge("br0", (cidr("10.1.0.1/24"),))
    assert s.add_plug("podman1", "br0", (cidr("10.1.0.2/24"),))
    with pytest.raises(E.NotFound):
        s.del_namespace("podman1")  # not ours to delete


def test_removal_refused_while_used(state: DesiredState) -> None:
    state.add_plug("red", "v-net-0", (cidr("192.168.15.1/24"),))
    with pytest.raises(E.InUse, match="still used"):
        state.del_namespace("red")
    with pytest.raises(E.InUse, match="still used"):
        state.del_bridge("v-net-0")
    state.add_rule("tap*", "v-net-0")
    state.del_plug("red", "v-net-0")
    with pytest.raises(E.InUse):
        state.del_bridge("v-net-0")
    state.del_rule("tap*", "v-net-0")
    assert state.del_bridge("v-net-0")


def test_forward_conflicts(state: DesiredState) -> None:
    f = I.make_forward("80", "192.168.15.2:80")
    assert state.add_forward(f)
    assert state.add_forward(f) == []
    with pytest.raises(E.PortInUse, match="already forwarded") as exc:
        state.add_forward(I.make_forward("80", "192.168.15.3:80"))
    assert exc.value.details["conflicts_with"] == "fwd/tcp/80"
    with pytest.raises(E.PortInUse):
        state.add_forward(I.make_forward("79-81", "192.168.15.3:79-81"))
    with pytest.raises(E.PortInUse):
        state.add_forward(I.make_forward("80", "192.168.15.3:80", host_ip="10.0.0.1"))
    # another protocol, or IPv6, is another forward
    assert state.add_forward(I.make_forward("80", "192.168.15.3:80", "udp"))
    assert state.add_forward(I.make_forward("80", "[fd00::3]:80"))
    # unforward removes both IP versions of the port
    assert len(state.del_forward("tcp", 80, 1, None)) == 2
    with pytest.raises(E.NotFound):
        state.del_forward("tcp", 80, 1, None)


def test_host_ip_scoped_forwards_coexist(state: DesiredState) -> None:
    assert state.add_forward(I.make_forward("80", "192.168.15.2:80", host_ip="10.0.0.1"))
    assert state.add_forward(I.make_forward("80", "192.168.15.3:80", host_ip="10.0.0.2"))
    with pytest.raises(E.PortInUse):
        state.add_forward(I.make_forward("80", "192.168.15.4:80"))


def test_rule_conflicts(state: DesiredState) -> None:
    state.add_bridge("br1", (cidr("10.9.0.1/24"),))
    state.add_rule("veth-*-br", "v-net-0")
    with pytest.raises(E.Conflict, match="same interfaces"):
        state.add_rule("veth-*", "br1")
    assert state.add_rule("tap*", "br1")


def test_bridges_must_not_overlap(state: DesiredState) -> None:
    with pytest.raises(E.Conflict, match="overlaps"):
        state.add_bridge("br1", (cidr("192.168.15.200/25"),))


def test_transaction_rolls_back(state: DesiredState) -> None:
    before = state.to_wire()

    def three_changes() -> None:
        with state.transaction():
            state.add_forward(I.make_forward("80", "192.168.15.2:80"))
            state.add_namespace("green")
            state.add_forward(I.make_forward("80", "192.168.15.3:80"))

    with pytest.raises(E.PortInUse):
        three_changes()
    assert state.to_wire() == before
    assert state.forwards_covering("tcp", 80) == []


def test_load_changes_replays() -> None:
    a = DesiredState()
    with a.transaction() as log:
        a.add_namespace("red")
        a.add_forward(I.make_forward("80", "10.0.0.2:80"))
        a.del_forward("tcp", 80, 1, None)
    b = DesiredState()
    b.load_changes([(c.key, c.new) for c in log])
    assert b.to_wire() == a.to_wire() == [{"kind": "ns", "name": "red"}]


def test_plug_prefix_must_match_the_bridge(state: DesiredState) -> None:
    with pytest.raises(E.InvalidAddress, match="another prefix length"):
        state.add_plug("red", "v-net-0", (cidr("192.168.15.1/32"),))


def test_lo_is_not_an_interface_name_to_give(state: DesiredState) -> None:
    with pytest.raises(E.NameTaken, match="loopback"):
        state.add_plug("red", "v-net-0", (cidr("192.168.15.1/24"),), ifname="lo")


def test_overlapping_subnets_in_one_namespace(state: DesiredState) -> None:
    state.add_plug("red", "v-net-0", (cidr("192.168.15.1/24"),))
    with pytest.raises(E.Conflict, match="overlapping"):
        state.add_wire("red", (cidr("192.168.15.7/24"),), "blue", (cidr("192.168.15.8/24"),))
    assert state.add_wire("red", (cidr("10.0.0.1/24"),), "blue", (cidr("10.0.0.2/24"),))


def test_check_references_after_pruning(state: DesiredState) -> None:
    state.add_plug("red", "v-net-0", (cidr("192.168.15.1/24"),))
    state.check_references()
    state.remove("br/v-net-0")
    with pytest.raises(E.InUse, match="needs bridge v-net-0"):
        state.check_references()
