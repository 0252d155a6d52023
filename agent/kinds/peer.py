"""Kind ``peer``: another host of the cluster, reached over this host's VXLAN device.

Per peer, flannel's three entries on the device (learning is off, so they are all the
kernel knows):

* a route to the peer's subnet via its VTEP address (the subnet's first address),
  ``onlink`` (the VTEP address is on no local subnet);
* a permanent neighbour entry: the VTEP address is the peer's VTEP MAC;
* a permanent FDB entry: that MAC is behind the peer's underlay address.

The cluster room (``agent/cluster.py``) turns the peers' leases in etcd into these
intents; no request makes one. Each is checked with three point lookups and written
with "create or replace" requests, all pipelined (``backends/overlay.py``), so a peer
costs the same at 1,000 peers as at one.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from ..errors import InvalidArgument, NotFound
from ..schema import Request
from .base import Actions, Context, Kind, cached, want
from .vxlan import check_ipv4, check_mac, check_subnet, vxlan_key

if TYPE_CHECKING:
    from ..state import DesiredState


def peer_key(subnet: ipaddress.IPv4Network) -> str:
    return f"peer/{str(subnet).replace('/', '-')}"


@dataclass(frozen=True)
class Peer:
    kind: ClassVar[str] = "peer"
    subnet: ipaddress.IPv4Network
    #: the peer's underlay address (where its VXLAN packets go)
    underlay: str
    #: the peer's VTEP MAC
    mac: str
    #: the peer's host name, as it announced it (for people)
    host: str
    #: this host's VXLAN device that reaches it
    device: str

    def __post_init__(self) -> None:
        check_subnet(self.subnet, "peer subnet")
        check_ipv4(self.underlay, "peer underlay address")
        check_mac(self.mac, "peer VTEP MAC")
        if not isinstance(self.host, str) or len(self.host) > 253:
            raise InvalidArgument("peer host name must be a string of at most 253 characters")

    @cached
    def key(self) -> str:  # asked of 1,000 peers per status: a network's str is costly
        return peer_key(self.subnet)

    @property
    def vtep(self) -> str:
        return str(self.subnet.network_address)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "subnet": str(self.subnet),
            "underlay": self.underlay,
            "mac": self.mac,
            "host": self.host,
            "device": self.device,
        }

    def describe(self) -> str:
        who = f"{self.host} " if self.host else ""
        return f"peer {who}{self.subnet} at {self.underlay} (VTEP {self.mac} on {self.device})"


class PeerKind(Kind[Peer]):
    name = "peer"
    key_prefix = "peer"
    order = 7
    #: the VXLAN port accepts the peers' underlay addresses (the firewall's guard)
    firewall = True
    #: the guard's element follows the peer's entries, coming and going: its nft commit
    #: (1-2 ms) is not in the way of the route; a peer that goes is accepted ~1 ms longer
    #: than its route lives, against the seconds its lease takes to be seen gone
    firewall_follows = True
    plural = "peers"

    def from_dict(self, d: Mapping[str, Any]) -> Peer:
        return Peer(
            subnet=check_subnet(want(d, "subnet"), "peer subnet"),
            underlay=want(d, "underlay"),
            mac=want(d, "mac"),
            host=d.get("host", ""),
            device=want(d, "device"),
        )

    def label(self, intent: Peer) -> str:
        return intent.host or str(intent.subnet)

    def needs(self, intent: Peer) -> tuple[str, ...]:
        return (vxlan_key(intent.device),)

    def index(self, intent: Peer) -> Iterable[tuple[str, Hashable]]:
        return [("peer-underlay", intent.underlay)]

    def add(self, state: DesiredState, req: Request) -> Peer:
        raise InvalidArgument("peers come from the cluster's etcd, not from requests")

    def delete(self, state: DesiredState, req: Request) -> list[str]:
        raise InvalidArgument("peers come from the cluster's etcd, not from requests")

    # ---- the kernel -----------------------------------------------------------------
    async def _ensure(self, ctx: Context, peer: Peer, old: Peer | None, acts: Actions) -> list[str]:
        net = ctx.net
        index = net.host_index(peer.device)
        if index is None:
            raise NotFound(f"the VXLAN device {peer.device} does not exist")
        have = await net.peer_entries(index, peer.subnet, peer.vtep, peer.mac)
        what = (
            have.route_via != peer.vtep,
            have.neigh_mac != peer.mac,
            have.fdb_dst != peer.underlay,
        )
        words = (
            f"route {peer.subnet} via {peer.vtep} dev {peer.device} onlink",
            f"neighbour {peer.vtep} lladdr {peer.mac}",
            f"fdb {peer.mac} dst {peer.underlay}",
        )
        wanted = [w for w, differs in zip(words, what, strict=True) if differs]
        if wanted and acts.add("; ".join(wanted)):
            await net.set_peer_entries(index, peer.subnet, peer.vtep, peer.mac, peer.underlay, what)
        if old is not None and old.mac != peer.mac and acts.add(f"remove fdb {old.mac}"):
            await net.del_fdb(index, old.mac)
        return acts.done

    async def ensure(self, ctx: Context, intent: Peer, old: Peer | None) -> list[str]:
        return await self._ensure(ctx, intent, old, Actions())

    async def inspect(self, ctx: Context, intent: Peer) -> list[str]:
        return await self._ensure(ctx, intent, None, Actions(dry_run=True))

    async def remove(self, ctx: Context, intent: Peer) -> list[str]:
        index = ctx.net.host_index(intent.device)
        if index is None:
            return []  # the device went, and every entry on it with it
        await ctx.net.del_peer_entries(index, intent.subnet, intent.vtep, intent.mac)
        return [f"removed the route, neighbour and fdb entry of {intent.subnet}"]
