"""Desired state: conflicts and idempotence, through the kinds' requests (pure, no root)."""

from typing import Any

import pytest

from netagent.agent import errors as E
from netagent.agent import intents as I
from netagent.agent.api import kind_change
from netagent.agent.kinds import default_kinds
from netagent.agent.ops import BY_OP
from netagent.agent.state import Change, DesiredState


def do(state: DesiredState, op: str, **args: Any) -> list[Change]:
    """What the API does for a kind's request: parse, propose, commit."""
    changes = state.propose(kind_change(state.kinds, BY_OP[op].parse(args)))
    state.commit(changes)
    return changes


def new_state(external: str | None = None) -> DesiredState:
    return DesiredState(default_kinds(), external_namespace=lambda n: n == external)


@pytest.fixture
def state() -> DesiredState:
    s = new_state()
    do(s, "ns.add", name="red")
    do(s, "ns.add", name="blue")
    do(s, "bridge.add", name="v-net-0", addresses=["192.168.15.5/24"])
    return s


def test_add_is_idempotent(state: DesiredState) -> None:
    assert do(state, "ns.add", name="red") == []
    assert do(state, "bridge.add", name="v-net-0", addresses=["192.168.15.5/24"]) == []
    [change] = do(state, "plug.add", ns="red", bridge="v-net-0", addresses=["192.168.15.1/24"])
    assert change.action == "added"
    assert do(state, "plug.add", ns="red", bridge="v-net-0", addresses=["192.168.15.1/24"]) == []


def test_seed_names(state: DesiredState) -> None:
    [c] = do(state, "plug.add", ns="red", bridge="v-net-0", addresses=["192.168.15.1/24"])
    plug = c.new
    assert isinstance(plug, I.Plug)
    assert (plug.ifname, plug.host_ifname) == ("veth-red", "veth-red-br")


def test_long_names_get_short_interface_names(state: DesiredState) -> None:
    do(state, "ns.add", name="a-long-name-123")
    [c] = do(
        state, "plug.add", ns="a-long-name-123", bridge="v-net-0", addresses=["192.168.15.9/24"]
    )
    assert isinstance(c.new, I.Plug)
    assert len(c.new.host_ifname) <= 15 and len(c.new.ifname) <= 15


def test_duplicate_address_on_bridge(state: DesiredState) -> None:
    do(state, "plug.add", ns="red", bridge="v-net-0", addresses=["192.168.15.1/24"])
    with pytest.raises(E.AddressInUse, match="already used on v-net-0 by red"):
        do(state, "plug.add", ns="blue", bridge="v-net-0", addresses=["192.168.15.1/24"])
    with pytest.raises(E.AddressInUse, match="own address"):
        do(state, "plug.add", ns="blue", bridge="v-net-0", addresses=["192.168.15.5/24"])
    assert "plug/blue/v-net-0" not in state.intents


def test_address_outside_subnet(state: DesiredState) -> None:
    with pytest.raises(E.InvalidAddress, match="outside"):
        do(state, "plug.add", ns="red", bridge="v-net-0", addresses=["10.0.0.1/24"])


def test_wire_seed_mistake() -> None:
    s = new_state()
    do(s, "ns.add", name="red")
    do(s, "ns.add", name="blue")
    with pytest.raises(E.AddressInUse, match="both red and blue"):
        do(
            s,
            "wire.add",
            ns_a="red",
            addresses_a=["192.168.15.1/24"],
            ns_b="blue",
            addresses_b=["192.168.15.1/24"],
        )
    [c] = do(
        s,
        "wire.add",
        ns_a="red",
        addresses_a=["192.168.15.1/24"],
        ns_b="blue",
        addresses_b=["192.168.15.2/24"],
    )
    assert c.key == "wire/blue/red"
    # the same wire said from the other side is the same wire
    assert (
        do(
            s,
            "wire.add",
            ns_a="blue",
            addresses_a=["192.168.15.2/24"],
            ns_b="red",
            addresses_b=["192.168.15.1/24"],
        )
        == []
    )


def test_missing_things(state: DesiredState) -> None:
    with pytest.raises(E.NotFound, match="namespace green does not exist"):
        do(state, "plug.add", ns="green", bridge="v-net-0", addresses=["192.168.15.1/24"])
    with pytest.raises(E.NotFound, match="bridge br9 does not exist"):
        do(state, "plug.add", ns="red", bridge="br9", addresses=["192.168.15.1/24"])
    with pytest.raises(E.NotFound):
        do(state, "bridge.del", name="br9")
    with pytest.raises(E.NotFound):
        do(state, "plug.del", ns="red", bridge="v-net-0")


def test_external_namespace_can_be_plugged() -> None:
    s = new_state(external="podman1")
    do(s, "bridge.add", name="br0", addresses=["10.1.0.1/24"])
    assert do(s, "plug.add", ns="podman1", bridge="br0", addresses=["10.1.0.2/24"])
    with pytest.raises(E.NotFound):
        do(s, "ns.del", name="podman1")  # not ours to delete


def test_removal_refused_while_used(state: DesiredState) -> None:
    do(state, "plug.add", ns="red", bridge="v-net-0", addresses=["192.168.15.1/24"])
    with pytest.raises(E.InUse, match="still used"):
        do(state, "ns.del", name="red")
    with pytest.raises(E.InUse, match="still used"):
        do(state, "bridge.del", name="v-net-0")
    do(state, "attach.add", pattern="tap*", bridge="v-net-0")
    do(state, "plug.del", ns="red", bridge="v-net-0")
    with pytest.raises(E.InUse):
        do(state, "bridge.del", name="v-net-0")
    do(state, "attach.del", pattern="tap*", bridge="v-net-0")
    assert do(state, "bridge.del", name="v-net-0")


def test_forward_conflicts(state: DesiredState) -> None:
    assert do(state, "forward.add", host_ports="80", destination="192.168.15.2:80")
    assert do(state, "forward.add", host_ports="80", destination="192.168.15.2:80") == []
    with pytest.raises(E.PortInUse, match="already forwarded") as exc:
        do(state, "forward.add", host_ports="80", destination="192.168.15.3:80")
    assert exc.value.details["conflicts_with"] == "fwd/tcp/80"
    with pytest.raises(E.PortInUse):
        do(state, "forward.add", host_ports="79-81", destination="192.168.15.3:79-81")
    with pytest.raises(E.PortInUse):
        do(state, "forward.add", host_ports="80", destination="192.168.15.3:80", host_ip="10.0.0.1")
    # another protocol, or IPv6, is another forward
    assert do(state, "forward.add", host_ports="80", destination="192.168.15.3:80", proto="udp")
    assert do(state, "forward.add", host_ports="80", destination="[fd00::3]:80")
    # unforward removes both IP versions of the port
    assert len(do(state, "forward.del", host_ports="80")) == 2
    with pytest.raises(E.NotFound):
        do(state, "forward.del", host_ports="80")


def test_host_ip_scoped_forwards_coexist(state: DesiredState) -> None:
    assert do(
        state, "forward.add", host_ports="80", destination="192.168.15.2:80", host_ip="10.0.0.1"
    )
    assert do(
        state, "forward.add", host_ports="80", destination="192.168.15.3:80", host_ip="10.0.0.2"
    )
    with pytest.raises(E.PortInUse):
        do(state, "forward.add", host_ports="80", destination="192.168.15.4:80")


def test_rule_conflicts(state: DesiredState) -> None:
    do(state, "bridge.add", name="br1", addresses=["10.9.0.1/24"])
    do(state, "attach.add", pattern="veth-*-br", bridge="v-net-0")
    with pytest.raises(E.Conflict, match="same interfaces"):
        do(state, "attach.add", pattern="veth-*", bridge="br1")
    assert do(state, "attach.add", pattern="tap*", bridge="br1")


def test_bridges_must_not_overlap(state: DesiredState) -> None:
    with pytest.raises(E.Conflict, match="overlaps"):
        do(state, "bridge.add", name="br1", addresses=["192.168.15.200/25"])


def test_a_refused_proposal_changes_nothing(state: DesiredState) -> None:
    before = state.to_wire()

    def three_changes(s: DesiredState) -> None:
        s.put(I.make_forward("80", "192.168.15.2:80"))
        s.put(I.Namespace("green"))
        do_in = kind_change(
            s.kinds,
            BY_OP["forward.add"].parse({"host_ports": "80", "destination": "192.168.15.3:80"}),
        )
        do_in(s)

    with pytest.raises(E.PortInUse):
        state.propose(three_changes)
    assert state.to_wire() == before
    assert state.lookup("port", ("tcp", 80)) == set()


def test_a_proposal_is_not_visible_until_committed(state: DesiredState) -> None:
    before = state.to_wire()
    changes = state.propose(lambda s: s.put(I.Namespace("green")))
    assert state.to_wire() == before and "ns/green" not in state
    state.commit(changes)
    assert "ns/green" in state


def test_load_replays() -> None:
    a = new_state()
    log: list[Change] = []
    log += do(a, "ns.add", name="red")
    log += do(a, "forward.add", host_ports="80", destination="10.0.0.2:80")
    log += do(a, "forward.del", host_ports="80")
    b = new_state()
    b.load([(c.key, c.new) for c in log])
    assert b.to_wire() == a.to_wire() == [{"kind": "ns", "name": "red"}]


def test_plug_prefix_must_match_the_bridge(state: DesiredState) -> None:
    with pytest.raises(E.InvalidAddress, match="another prefix length"):
        do(state, "plug.add", ns="red", bridge="v-net-0", addresses=["192.168.15.1/32"])


def test_lo_is_not_an_interface_name_to_give(state: DesiredState) -> None:
    with pytest.raises(E.NameTaken, match="loopback"):
        do(
            state,
            "plug.add",
            ns="red",
            bridge="v-net-0",
            addresses=["192.168.15.1/24"],
            ifname="lo",
        )


def test_overlapping_subnets_in_one_namespace(state: DesiredState) -> None:
    do(state, "plug.add", ns="red", bridge="v-net-0", addresses=["192.168.15.1/24"])
    with pytest.raises(E.Conflict, match="overlapping"):
        do(
            state,
            "wire.add",
            ns_a="red",
            addresses_a=["192.168.15.7/24"],
            ns_b="blue",
            addresses_b=["192.168.15.8/24"],
        )
    assert do(
        state,
        "wire.add",
        ns_a="red",
        addresses_a=["10.0.0.1/24"],
        ns_b="blue",
        addresses_b=["10.0.0.2/24"],
    )


def test_check_references_after_pruning(state: DesiredState) -> None:
    do(state, "plug.add", ns="red", bridge="v-net-0", addresses=["192.168.15.1/24"])
    state.check_references()
    state.forget("br/v-net-0")
    with pytest.raises(E.InUse, match="needs bridge v-net-0"):
        state.check_references()
