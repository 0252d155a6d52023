"""Address leases: a free address of a bridge's subnet, for a plug (or a container) that
did not name one.

A lease is not a record of its own: the address picked is part of the intent that holds
it, proposed, journaled and committed with it, so it survives restarts and crashes and
is never handed out twice (a proposal sees every committed address, and proposals are
serialized). The lowest free host address is picked: the same request against the same
state gets the same address. Removing the intent releases it.
"""

from __future__ import annotations

import ipaddress
from typing import TYPE_CHECKING

from ..errors import AddressInUse, InvalidAddress
from ..values import IPInterface

if TYPE_CHECKING:
    from ..state import DesiredState
    from .bridge import Bridge

#: addresses looked at before a subnet is called full (a /64 is never scanned whole)
SCAN_LIMIT = 1 << 20


def free_address(
    state: DesiredState, segment: str, gateway: IPInterface, skip: frozenset[object] = frozenset()
) -> IPInterface:
    """The lowest address of ``gateway``'s subnet not used on ``segment`` (nor the
    gateway, the network or the broadcast address), with the subnet's prefix.

    The scan compares integers with the state's set of the segment's addresses
    (``DesiredState.used_on``, kept with the index): asking the index per candidate (an
    ``ipaddress`` object and its hash each) made an ADD with 1,000 containers on a
    bridge cost ~5 ms more than with 10, gathering the addresses per ADD ~1.5 ms. The
    scan starts where the last one found the first unused address."""
    net = gateway.network
    first = int(net.network_address) + 1
    last = int(net.broadcast_address) - (1 if gateway.version == 4 else 0)
    if net.prefixlen >= net.max_prefixlen - 1:
        first, last = int(net.network_address), int(net.broadcast_address)
    version = gateway.version
    used = state.used_on(segment, version)
    taken = {int(gateway.ip)}
    taken.update(
        int(ip) for ip in skip if isinstance(ip, (ipaddress.IPv4Address, ipaddress.IPv6Address))
    )
    # from where the last scan found the first address not in use (the 1,000 used below
    # it cost ~0.25 ms a lease to walk again); a freed address moves that point back
    low: int | None = None
    for n, value in enumerate(range(state.lease_start(segment, version, first), last + 1)):
        if n >= SCAN_LIMIT:
            break
        if value in used:
            continue
        if low is None:
            low = value
            state.leased_from(segment, version, first, low)
        if value not in taken:
            return ipaddress.ip_interface(f"{ipaddress.ip_address(value)}/{net.prefixlen}")
    raise AddressInUse(
        f"no free address is left in {net} on {state.label(segment)}; remove a plug or "
        "give the bridge a larger subnet"
    )


def lease(state: DesiredState, bridge: Bridge) -> tuple[IPInterface, ...]:
    """One free address per IP version the bridge has a gateway for."""
    if not bridge.addresses:
        raise InvalidAddress(
            f"bridge {bridge.name} has no address, so there is no subnet to lease from; "
            "give --address"
        )
    return tuple(free_address(state, bridge.key, gw) for gw in bridge.addresses)
