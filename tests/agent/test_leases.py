"""Leases: a plug without an address gets the lowest free one of its bridge's subnet,
durably (it is part of the intent), never twice, and released with the plug."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

import pytest

from netagent.agent import errors as E
from netagent.agent.api import kind_change
from netagent.agent.kinds import default_kinds
from netagent.agent.ops import BY_OP
from netagent.agent.state import DesiredState
from netagent.agent.store import StateStore


def do(state: DesiredState, op: str, **args: Any) -> None:
    state.commit(state.propose(kind_change(state.kinds, BY_OP[op].parse(args))))


def addresses(state: DesiredState, ns: str, bridge: str = "br0") -> list[str]:
    return list(state.get(f"plug/{ns}/{bridge}").to_dict()["addresses"])  # type: ignore[union-attr]


@pytest.fixture
def state() -> DesiredState:
    s = DesiredState(default_kinds(), external_namespace=lambda n: False)
    do(s, "bridge.add", name="br0", addresses=["10.9.0.1/29", "fd00:9::1/64"])
    for ns in ("a", "b", "c", "d", "e", "f", "g"):
        do(s, "ns.add", name=ns)
    return s


def test_the_lowest_free_addresses_of_each_family(state: DesiredState) -> None:
    do(state, "plug.add", ns="a", bridge="br0", addresses=["10.9.0.3/29"])
    do(state, "plug.add", ns="b", bridge="br0")
    do(state, "plug.add", ns="c", bridge="br0")
    assert addresses(state, "b") == ["10.9.0.2/29", "fd00:9::2/64"]
    assert addresses(state, "c") == ["10.9.0.4/29", "fd00:9::3/64"]
    # asking again changes nothing (the lease is the plug's)
    assert (
        state.propose(
            kind_change(state.kinds, BY_OP["plug.add"].parse({"ns": "c", "bridge": "br0"}))
        )
        == []
    )


def test_a_full_subnet_is_refused_and_a_released_address_comes_back(state: DesiredState) -> None:
    for ns in ("a", "b", "c", "d", "e"):  # .2 to .6 of a /29 whose .1 is the gateway
        do(state, "plug.add", ns=ns, bridge="br0")
    with pytest.raises(E.AddressInUse, match=r"no free address is left in 10\.9\.0\.0/29"):
        do(state, "plug.add", ns="f", bridge="br0")
    do(state, "plug.del", ns="b", bridge="br0")
    do(state, "plug.add", ns="f", bridge="br0")
    assert addresses(state, "f")[0] == "10.9.0.3/29"


def test_a_bridge_without_an_address_cannot_lease(state: DesiredState) -> None:
    do(state, "bridge.add", name="br1")
    with pytest.raises(E.InvalidAddress, match="no subnet to lease from"):
        do(state, "plug.add", ns="a", bridge="br1")


def test_leases_survive_a_restart(tmp_path: Path, state: DesiredState) -> None:
    kinds = default_kinds()
    store = StateStore(tmp_path, kinds)
    store.load()
    changes = state.propose(
        kind_change(state.kinds, BY_OP["plug.add"].parse({"ns": "a", "bridge": "br0"}))
    )
    store.append(changes)
    state.commit(changes)
    store.close()
    again = DesiredState(kinds, external_namespace=lambda n: False)
    again.load(StateStore(tmp_path, kinds).load())
    assert again.get("plug/a/br0") == state.get("plug/a/br0")


def test_the_addresses_in_use_follow_every_change_a_refused_one_included(
    state: DesiredState,
) -> None:
    """The lease's scan reads ``used_on`` (kept with the index): what a refused
    proposal tried, and what a deleted plug held (readdressing is a delete and an add), are not
    in it afterwards."""
    do(state, "plug.add", ns="a", bridge="br0")
    do(state, "plug.add", ns="b", bridge="br0", addresses=["10.9.0.5/29"])

    def as_ints(*ips: str) -> set[int]:
        return {int(ipaddress.ip_address(ip)) for ip in ("10.9.0.1", *ips)}  # .1: br0's

    used = as_ints("10.9.0.2", "10.9.0.5")
    assert state.used_on("br/br0", 4) == used
    with pytest.raises(E.AddressInUse):  # .5 is b's: the whole proposal is refused
        do(state, "plug.add", ns="c", bridge="br0", addresses=["10.9.0.5/29"])
    assert state.used_on("br/br0", 4) == used
    do(state, "plug.del", ns="a", bridge="br0")
    do(state, "plug.del", ns="b", bridge="br0")
    do(state, "plug.add", ns="b", bridge="br0", addresses=["10.9.0.6/29"])
    assert state.used_on("br/br0", 4) == as_ints("10.9.0.6")
    do(state, "plug.add", ns="c", bridge="br0")
    assert addresses(state, "c") == ["10.9.0.2/29", "fd00:9::2/64"]


def test_each_lease_is_the_lowest_free_address_over_adds_and_removals() -> None:
    """The scan starts where the last one found the first free address; whatever mix
    of leases, requested addresses, removals and refused requests comes before, the
    lease is the lowest address no plug holds (brute force beside it)."""
    import random

    seed = random.randrange(1 << 30)
    print(f"seed {seed}")
    rnd = random.Random(seed)
    s = DesiredState(default_kinds(), external_namespace=lambda n: False)
    do(s, "bridge.add", name="br0", addresses=["10.9.0.1/27"])  # .2 to .30 for plugs
    names = [f"n{i}" for i in range(40)]
    for ns in names:
        do(s, "ns.add", name=ns)
    held: dict[str, int] = {}
    for _ in range(400):
        ns = rnd.choice(names)
        if ns in held:
            do(s, "plug.del", ns=ns, bridge="br0")
            del held[ns]
            continue
        free = [h for h in range(2, 31) if h not in held.values()]
        if rnd.random() < 0.2:  # a requested address: taken when free, refused when not
            host = rnd.randrange(2, 31)
            if host in held.values():
                with pytest.raises(E.AddressInUse):
                    do(s, "plug.add", ns=ns, bridge="br0", addresses=[f"10.9.0.{host}/27"])
            else:
                do(s, "plug.add", ns=ns, bridge="br0", addresses=[f"10.9.0.{host}/27"])
                held[ns] = host
            continue
        if not free:
            with pytest.raises(E.AddressInUse):
                do(s, "plug.add", ns=ns, bridge="br0")
            continue
        do(s, "plug.add", ns=ns, bridge="br0")
        got = int(addresses(s, ns)[0].split("/")[0].rsplit(".", 1)[1])
        assert got == min(free), f"seed {seed}: leased .{got}, lowest free .{min(free)}"
        held[ns] = got
