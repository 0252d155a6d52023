"""The filter chains' rules (``backends/xtfilter.py``) from a spec: the accepts per
bridge, and per forward destination that no bridge holds. Pure; no root."""

from __future__ import annotations

import ipaddress

from netagent.agent import intents as I
from netagent.backends.firewall import FirewallSpec
from netagent.backends.xtfilter import forward_chain, outside_bridges

BR = I.Bridge(
    "v-net-0",
    (ipaddress.ip_interface("192.168.15.5/24"), ipaddress.ip_interface("fd00:15::5/64")),
)


def fwd(port: int, dest: str) -> I.Forward:
    return I.Forward("tcp", port, ipaddress.ip_address(dest), 80)


def test_destinations_outside_every_bridge_once_each_in_address_order() -> None:
    spec = FirewallSpec(
        forwards=(
            fwd(1, "10.9.0.2"),
            fwd(2, "192.168.15.2"),  # on the bridge
            fwd(3, "10.1.0.7"),
            fwd(4, "10.9.0.2"),  # the same destination again
            fwd(5, "192.168.16.1"),  # next to the bridge's subnet, not in it
            fwd(6, "fd00:15::9"),  # on the bridge (IPv6)
            fwd(7, "fd00:16::9"),
        ),
        bridges=(BR,),
    )
    assert [str(ip) for ip in outside_bridges(spec, 4)] == ["10.1.0.7", "10.9.0.2", "192.168.16.1"]
    assert [str(ip) for ip in outside_bridges(spec, 6)] == ["fd00:16::9"]
    rules = forward_chain(spec, 4)
    dnat = [r for r in rules if "--ctstate" in r and r[0] in ("-d", "-s")]
    assert [(r[0], r[1]) for r in dnat] == [
        (way, f"{ip}/32") for ip in ("10.1.0.7", "10.9.0.2", "192.168.16.1") for way in ("-d", "-s")
    ]


def test_without_bridges_every_destination_is_outside() -> None:
    spec = FirewallSpec(forwards=(fwd(1, "192.168.15.2"), fwd(2, "10.0.0.1")))
    assert [str(ip) for ip in outside_bridges(spec, 4)] == ["10.0.0.1", "192.168.15.2"]
