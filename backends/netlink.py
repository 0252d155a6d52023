"""The link side of the kernel, as the kinds use it: a protocol of primitive operations.

Kinds (``agent/kinds``) ensure, inspect and remove their intents through :class:`Netlink`:
namespaces, links, addresses, default routes, sysctls. Two implementations: the real one
(``backends/pyroute.py``: pyroute2 plus raw rtnetlink for the hot paths) and an in-memory
fake (``backends/fakenet.py``) for unit tests of the kinds, the reconciler and the API.

A namespace is named by ``ns``: None for the daemon's own ("the host"), a name under the
netns directory (``red`` is ``/run/netns/red``), or an absolute path (a container's
``/proc/PID/ns/net``, a runtime's ``/var/run/netns/cni-...``).

Every operation has a time limit in the real implementation: a call that gets no answer
(a socket of a namespace deleted meanwhile) fails with ``HostTimeout``, and the
socket is dropped, instead of waiting forever.
"""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Network
from pathlib import Path
from typing import Any, Protocol

from netagent.agent.values import IPAddress, IPInterface

ALIAS_PREFIX = "netagent:"
#: link group given at creation (the alias cannot be): if the daemon dies between
#: creating a link and marking it, the link is still known as netagent's
NETAGENT_GROUP = 0x4E41
#: route protocol number marking routes netagent installs (rtnetlink leaves values above
#: RTPROT_STATIC to userspace; 201 is not taken in iproute2's rt_protos table)
RTPROT_NETAGENT = 201
#: netagent's bridge ports (the host ends of its veth pairs) carry frames, not addresses:
#: IPv6 is off on them. Each interface with IPv6 on puts three routes into the
#: namespace's IPv6 FIB (fe80::/64, its link-local address, ff00::/8), and the kernel
#: walks that whole FIB on every change of any interface (``rt6_sync_up``/``down``):
#: with 1,000 ports, setting an alias cost 2.2 ms instead of 0.7, a carrier change 1.9
#: (docs/kernel-facts.md). The namespaces' ends and the bridges keep IPv6.
PORT_IPV6 = "net/ipv6/conf/{}/disable_ipv6"

NsRef = str | None


def alias_for(key: str) -> str:
    return f"{ALIAS_PREFIX}{key}"


def mac_for(key: str, end: str) -> str:
    """A stable MAC address for one end of what ``key`` names (as Docker does): a veth
    made again after someone deleted it has the MAC its neighbours already know, so
    they reach it at once instead of after their neighbour entries time out (~40 s).
    Locally administered, unicast."""
    import hashlib

    digest = hashlib.sha256(f"{key}#{end}".encode()).digest()
    return ":".join(f"{b:02x}" for b in (0x02, *digest[:5]))


def owner_of(alias: str | None) -> str | None:
    """The netagent key an interface alias names, if it is netagent's mark."""
    if alias and alias.startswith(ALIAS_PREFIX):
        return alias[len(ALIAS_PREFIX) :]
    return None


@dataclass(frozen=True, slots=True)
class Link:
    """One interface, as every part of netagent sees it (dumps, events, the cache)."""

    index: int
    name: str
    kind: str | None = None
    up: bool = False
    master: int | None = None
    alias: str | None = None
    group: int = 0
    #: a veth's peer index, when the peer is in the same namespace
    peer: int | None = None
    #: set when the veth's peer lives in another namespace
    link_netnsid: int | None = None
    mac: str | None = None
    #: a veth's peer index in that other namespace (IFLA_LINK beside IFLA_LINK_NETNSID)
    far_peer: int | None = None

    @property
    def owner_key(self) -> str | None:
        return owner_of(self.alias)

    def belongs_to(self, key: str) -> bool:
        """Made by netagent for ``key``: its mark, or (a crash between creating and
        marking it) netagent's creation-time group without any mark."""
        return self.owner_key == key or (self.owner_key is None and self.group == NETAGENT_GROUP)

    @property
    def netagents(self) -> bool:
        """Carries a netagent mark of any kind."""
        return self.owner_key is not None or self.group == NETAGENT_GROUP


@dataclass(frozen=True, slots=True)
class Route:
    gateway: str | None
    oif: int | None
    proto: int = 0


@dataclass(frozen=True, slots=True)
class Vxlan:
    """A VXLAN device's settings, as far as netagent sets them."""

    link: Link
    vni: int
    port: int
    local: str | None
    #: the underlay interface's index (``dev``)
    dev: int | None
    learning: bool


@dataclass(frozen=True)
class PeerEntries:
    """What the kernel has for one peer on the VXLAN device (None: missing, or not as
    netagent makes it)."""

    #: the gateway of the route to exactly the peer's subnet over the device (onlink,
    #: netagent's protocol)
    route_via: str | None
    #: the MAC of the permanent neighbour entry for the peer's VTEP address
    neigh_mac: str | None
    #: the remote (underlay address) of the FDB entry for the peer's MAC
    fdb_dst: str | None


class Netlink(Protocol):
    """Primitive operations on namespaces, links, addresses and routes."""

    netns_dir: Path

    # ---- namespaces -----------------------------------------------------------------
    def ns_exists(self, ns: str) -> bool: ...

    def ns_identity(self, ns: str) -> tuple[int, int] | None:
        """(device, inode) of the namespace file: which namespace a name points at."""
        ...

    def ns_names(self) -> list[str]: ...

    async def ns_add(self, name: str) -> None:
        """Create a named namespace; FileExistsError when the name is taken."""
        ...

    async def ns_del(self, name: str) -> None: ...

    def announcing(self, ns: str) -> bool:
        """Whether interfaces made in ``ns`` announce their addresses by default
        (``netns.ANNOUNCE_DEFAULTS``: a namespace this daemon made, the same one still):
        then they need no ``arp_notify``/``ndisc_notify`` of their own."""
        ...

    async def forget(self, ns: str) -> None:
        """Close what is kept open in a namespace (an open socket keeps a deleted
        namespace alive in the kernel)."""
        ...

    # ---- links ----------------------------------------------------------------------
    async def link(self, ns: NsRef, name: str) -> Link | None: ...

    async def links(self, ns: NsRef) -> list[Link]: ...

    def host_index(self, name: str) -> int | None:
        """The index of an interface in the daemon's own namespace, cheaply."""
        ...

    async def host_links(self, indexes: list[int]) -> list[Link | None]:
        """Interfaces of the daemon's own namespace as the kernel has them right now,
        cheaply (raw requests, pipelined): to check a cached view before acting on it.
        None for one that is gone."""
        ...

    async def add_bridge(self, name: str, mac: str | None = None) -> None:
        """A bridge, up, with netagent's group and a MAC address of its own, ``mac`` or a
        random one (a bridge without one takes its lowest port's, which changes as ports
        come and go)."""
        ...

    async def add_veth(
        self,
        name: str,
        ns: NsRef,
        peer: str,
        peer_ns: NsRef,
        *,
        master: int | None = None,
        up: bool = False,
        mac: str | None = None,
        peer_mac: str | None = None,
        mtu: int | None = None,
        peer_ns_id: tuple[int, int] | None = None,
    ) -> None:
        """A veth pair with each end created directly in its namespace (moving a link
        costs a grace period), both with netagent's group and ``mtu``. With
        ``peer_ns_id`` the peer is created only if ``peer_ns`` still names the namespace
        of that identity (``ns_identity``); else FileNotFoundError: a namespace deleted
        and made again under the same path is never plugged by mistake. With ``master``
        (a bridge port in the daemon's namespace) IPv6 is turned off on ``name`` before
        its carrier comes up (:data:`PORT_IPV6`)."""
        ...

    def port_ipv6(self, name: str) -> bool | None:
        """Whether IPv6 is on on a bridge port of the daemon's namespace (None: no such
        interface, or no IPv6 in this kernel)."""
        ...

    async def port_ipv6_off(self, name: str) -> None:
        """Turn IPv6 off on a bridge port of the daemon's namespace (:data:`PORT_IPV6`), as
        far as the host lets it: best effort, no port needs it."""
        ...

    async def set_link(
        self,
        ns: NsRef,
        index: int,
        *,
        alias: str | None = None,
        up: bool | None = None,
        master: int | None = None,
        mac: str | None = None,
    ) -> None: ...

    async def del_link(self, ns: NsRef, index: int) -> None:
        """Delete; an interface already gone is fine."""
        ...

    async def enslave(self, pairs: list[tuple[int, int]]) -> list[OSError | None]:
        """The attach path in the daemon's own namespace: each (index, master) gets its
        master and is set up in one request, all pipelined. One result per pair: None, or
        the OSError (ENODEV: gone, EBUSY/ENOSPC: the bridge refuses)."""
        ...

    # ---- addresses and routes -------------------------------------------------------
    async def addresses(self, ns: NsRef, index: int) -> set[IPInterface]: ...

    async def host_addressed(self) -> dict[int, set[bytes]]:
        """Interfaces of the daemon's own namespace that carry addresses the host uses
        (not link-local): index -> the packed addresses. One dump."""
        ...

    async def add_address(self, ns: NsRef, index: int, addr: IPInterface) -> None:
        """Add; one already there is fine."""
        ...

    async def del_address(self, ns: NsRef, index: int, addr: IPInterface) -> None: ...

    async def default_routes(self, ns: NsRef, version: int) -> list[Route]: ...

    async def add_default_route(self, ns: NsRef, index: int, gateway: IPAddress) -> bool:
        """Add (marked RTPROT_NETAGENT); False when a default route of that IP version
        is there already (it is left as it is)."""
        ...

    async def replace_default_route(self, ns: NsRef, index: int, gateway: IPAddress) -> None:
        """Point netagent's default route of that IP version at another gateway."""
        ...

    # ---- the VXLAN overlay (the daemon's own namespace) ------------------------------
    async def add_vxlan(
        self, name: str, *, vni: int, port: int, local: str, dev: int, mac: str
    ) -> None:
        """A VXLAN device with learning off, netagent's group and a fixed MAC, on the
        underlay interface ``dev`` (its MTU follows from it), up."""
        ...

    async def vxlan(self, name: str) -> Vxlan | None:
        """A host interface's VXLAN settings (None: no such interface, or not VXLAN)."""
        ...

    async def address_owner(self, ip: str) -> int | None:
        """The index of the host interface that holds the address ``ip``."""
        ...

    async def peer_entries(
        self, index: int, subnet: IPv4Network, vtep: str, mac: str
    ) -> PeerEntries: ...

    async def set_peer_entries(
        self,
        index: int,
        subnet: IPv4Network,
        vtep: str,
        mac: str,
        underlay: str,
        what: tuple[bool, bool, bool] = (True, True, True),
    ) -> None:
        """Create or replace the route to ``subnet`` via ``vtep`` (onlink), the permanent
        neighbour entry ``vtep -> mac`` and the FDB entry ``mac -> underlay``, on the
        VXLAN device ``index``; ``what`` picks which of the three."""
        ...

    async def del_peer_entries(self, index: int, subnet: IPv4Network, vtep: str, mac: str) -> None:
        """Remove the three (absent ones are fine)."""
        ...

    async def del_fdb(self, index: int, mac: str) -> None: ...

    async def link_counters(self) -> dict[str, tuple[int, int, int, int]]:
        """Interfaces of the daemon's own namespace by name: (rx packets, rx bytes,
        tx packets, tx bytes). One dump, off the event loop."""
        ...

    # ---- sysctls (the daemon's own namespace) ---------------------------------------
    def sysctl(self, path: str) -> str | None: ...

    def set_sysctl(self, path: str, value: str) -> None: ...

    async def set_ns_sysctls(self, ns: str, values: dict[str, str]) -> None:
        """Set sysctls of another namespace (``net/ipv4/conf/eth0/arp_notify`` ...)."""
        ...

    # ---- what the kernel has, for ``ctl links / neigh / routes`` --------------------
    async def show_links(self, ns: NsRef) -> list[dict[str, Any]]: ...

    async def show_neigh(self, ns: NsRef) -> list[dict[str, Any]]: ...

    async def show_routes(self, ns: NsRef) -> list[dict[str, Any]]: ...
