"""An in-memory :class:`~netagent.backends.netlink.Netlink` for tests without root.

It keeps namespaces, links (veth pairs, bridges, masters, aliases, groups), addresses,
default routes and sysctls the way the kernel would for the operations netagent uses:
deleting one end of a veth deletes its peer, deleting a namespace deletes its links (and
their peers elsewhere), a bridge's ports lose their master when it goes. ``dump()``
prints it like ``ip -br link``/``ip -br addr``, so a test compares text. Faults can be
injected: :meth:`FakeNetlink.fail` makes the next call of an operation raise, and
:meth:`FakeNetlink.hang` makes it never answer (to test time limits).
"""

from __future__ import annotations

import dataclasses
import errno
from collections.abc import Callable
from ipaddress import IPv4Network
from pathlib import Path
from typing import Any

from netagent.agent.values import IPAddress, IPInterface

from .faults import Faults
from .netlink import (
    NETAGENT_GROUP,
    PORT_IPV6,
    RTPROT_NETAGENT,
    Link,
    NsRef,
    PeerEntries,
    Route,
    Vxlan,
)


@dataclasses.dataclass
class _Ns:
    links: dict[int, Link] = dataclasses.field(default_factory=dict)
    addrs: dict[int, set[IPInterface]] = dataclasses.field(default_factory=dict)
    routes: dict[int, Route] = dataclasses.field(default_factory=dict)  # version -> route
    ident: tuple[int, int] = (0, 0)


class FakeNetlink(Faults):
    def __init__(self, netns_dir: Path = Path("/run/netns")) -> None:
        Faults.__init__(self)
        self.netns_dir = netns_dir
        self._next_index = 100
        self._next_inode = 1
        self.host = _Ns()
        self.named: dict[str, _Ns] = {}
        self.sysctls: dict[str, str] = {}
        #: host interface name -> (rx packets, rx bytes, tx packets, tx bytes), as a test sets it
        self.traffic: dict[str, tuple[int, int, int, int]] = {}
        #: veth index -> its peer's index
        self._peers: dict[int, int] = {}
        #: interface name -> the MTU it was created with (when one was given)
        self.mtus: dict[str, int] = {}
        #: every mutating call, in order: ("op", args...)
        self.calls: list[tuple[Any, ...]] = []
        #: identities of the namespaces made by ``ns_add`` (their interfaces announce)
        self.announcing_ns: set[tuple[int, int]] = set()
        #: host VXLAN devices: index -> (vni, port, local, dev, learning)
        self.vxlans: dict[int, tuple[int, int, str, int, bool]] = {}
        #: per VXLAN device index: routes (subnet -> via), neighbours (ip -> mac) and FDB
        #: entries (mac -> dst), as netagent's raw requests leave them
        self.routes: dict[int, dict[str, str]] = {}
        self.neighbours: dict[int, dict[str, str]] = {}
        self.fdb: dict[int, dict[str, str]] = {}
        #: called with (deleted, Link) in the host namespace, like the kernel's events
        self.on_link: Callable[[bool, Link], None] | None = None
        self._add_lo(self.host)

    # ---- test controls --------------------------------------------------------------
    def make_foreign_ns(self, name: str) -> None:
        """A namespace someone else made (no netagent mark); ``name`` may be a path (a
        container's ``/proc/PID/ns/net``). Made again, it is another namespace."""
        self.named[self._name(name)] = self._new_ns()

    def drop_ns(self, name: str) -> None:
        """Someone else's namespace ends (its container exited): its links go, and so do
        their veth peers in the host."""
        space = self.named.pop(self._name(name))
        for index in list(space.links):
            self._delete(name, space, index)

    def make_foreign_link(self, name: str, kind: str = "veth", ns: NsRef = None) -> Link:
        space = self._space(ns)
        link = Link(self._index(), name, kind=kind, up=True)
        self._set(space, link, ns)
        return link

    def dump(self, ns: NsRef = None) -> str:
        """``NAME KIND STATE MASTER ALIAS ADDRESSES`` per link, sorted by name, then
        ``default via GATEWAY dev NAME proto N`` per default route (IPv4 first)."""
        space = self._space(ns)
        lines = []
        for link in sorted(space.links.values(), key=lambda lk: lk.name):
            master = space.links.get(link.master) if link.master else None
            addrs = " ".join(sorted(str(a) for a in space.addrs.get(link.index, ())))
            lines.append(
                " ".join(
                    [
                        link.name,
                        link.kind or "-",
                        "UP" if link.up else "DOWN",
                        f"master={master.name}" if master else "-",
                        link.alias or "-",
                        addrs or "-",
                    ]
                )
            )
        for _version, route in sorted(space.routes.items()):
            dev = space.links.get(route.oif) if route.oif is not None else None
            lines.append(
                f"default via {route.gateway} dev {dev.name if dev else '-'} proto {route.proto}"
            )
        return "\n".join(lines)

    # ---- internals ------------------------------------------------------------------
    def _index(self) -> int:
        self._next_index += 1
        return self._next_index

    def _new_ns(self) -> _Ns:
        self._next_inode += 1
        space = _Ns(ident=(1, self._next_inode))
        self._add_lo(space)
        return space

    def _add_lo(self, space: _Ns) -> None:
        space.links[1] = Link(1, "lo", kind=None, up=False)

    def _space(self, ns: NsRef) -> _Ns:
        if ns is None:
            return self.host
        space = self.named.get(self._name(ns))
        if space is None:
            raise FileNotFoundError(f"namespace {ns} does not exist")
        return space

    def _name(self, ns: str) -> str:
        """A path under the netns directory is that name; another path (a container's
        ``/proc/PID/ns/net``) is a namespace of its own, known by the whole path."""
        if ns.startswith("/"):
            path = Path(ns)
            return path.name if path.parent == self.netns_dir else ns
        return ns

    def _set(self, space: _Ns, link: Link, ns: NsRef, deleted: bool = False) -> None:
        if deleted:
            self.vxlans.pop(link.index, None)
            self.routes.pop(link.index, None)
            self.neighbours.pop(link.index, None)
            self.fdb.pop(link.index, None)
            space.links.pop(link.index, None)
            space.addrs.pop(link.index, None)
            for version, route in list(space.routes.items()):
                if route.oif == link.index:
                    del space.routes[version]
        else:
            space.links[link.index] = link
        if ns is None and self.on_link is not None:
            self.on_link(deleted, link)

    def _by_name(self, space: _Ns, name: str) -> Link | None:
        return next((lk for lk in space.links.values() if lk.name == name), None)

    def _where(self, index: int) -> tuple[NsRef, _Ns] | None:
        if index in self.host.links:
            return None, self.host
        for name, space in self.named.items():
            if index in space.links:
                return name, space
        return None

    def _delete(self, ns: NsRef, space: _Ns, index: int) -> None:
        """Delete a link; its bridge ports lose their master, its veth peer goes too."""
        link = space.links.get(index)
        if link is None:
            return
        self._set(space, link, ns, deleted=True)
        for other in list(space.links.values()):
            if other.master == index:
                self._set(space, dataclasses.replace(other, master=None), ns)
        peer = self._peers.pop(index, None)
        if peer is not None:
            self._peers.pop(peer, None)
            where = self._where(peer)
            if where is not None:
                self._delete(where[0], where[1], peer)

    # ---- namespaces -----------------------------------------------------------------
    def ns_exists(self, ns: str) -> bool:
        return self._name(ns) in self.named

    def ns_identity(self, ns: str) -> tuple[int, int] | None:
        space = self.named.get(self._name(ns))
        return None if space is None else space.ident

    def ns_names(self) -> list[str]:
        return sorted(n for n in self.named if not n.startswith("/"))

    async def ns_add(self, name: str) -> None:
        await self._fault("ns_add")
        if name in self.named:
            raise FileExistsError(errno.EEXIST, f'Cannot create namespace file "{name}"')
        self.named[name] = self._new_ns()
        self.announcing_ns.add(self.named[name].ident)
        self.calls.append(("ns_add", name))

    def announcing(self, ns: str) -> bool:
        space = self.named.get(self._name(ns))
        return space is not None and space.ident in self.announcing_ns

    async def ns_del(self, name: str) -> None:
        await self._fault("ns_del")
        space = self.named.get(name)
        if space is None:
            raise FileNotFoundError(name)
        for index in list(space.links):
            self._delete(name, space, index)
        del self.named[name]
        self.calls.append(("ns_del", name))

    async def forget(self, ns: str) -> None:
        return None

    # ---- links ----------------------------------------------------------------------
    async def link(self, ns: NsRef, name: str) -> Link | None:
        await self._fault("link")
        if ns is not None and not self.ns_exists(ns):
            return None
        return self._by_name(self._space(ns), name)

    async def links(self, ns: NsRef) -> list[Link]:
        await self._fault("links")
        return list(self._space(ns).links.values())

    def host_index(self, name: str) -> int | None:
        link = self._by_name(self.host, name)
        return None if link is None else link.index

    async def host_links(self, indexes: list[int]) -> list[Link | None]:
        await self._fault("host_links")
        return [self.host.links.get(i) for i in indexes]

    async def add_bridge(self, name: str, mac: str | None = None) -> None:
        await self._fault("add_bridge")
        if self._by_name(self.host, name) is not None:
            raise FileExistsError(errno.EEXIST, name)
        link = Link(self._index(), name, "bridge", up=True, group=NETAGENT_GROUP, mac=mac)
        self._set(self.host, link, None)
        self.calls.append(("add_bridge", name))

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
        await self._fault("add_veth")
        space, pspace = self._space(ns), self._space(peer_ns)
        if peer_ns_id is not None and pspace.ident != peer_ns_id:
            raise FileNotFoundError(f"{peer_ns} names another namespace now")
        if mtu is not None:
            self.mtus[name] = self.mtus[peer] = mtu
        if self._by_name(space, name) or self._by_name(pspace, peer):
            raise FileExistsError(errno.EEXIST, name)
        a, b = self._index(), self._index()
        same = space is pspace
        self._peers[a], self._peers[b] = b, a
        self._set(
            space,
            Link(
                a,
                name,
                "veth",
                up=up,
                master=master,
                group=NETAGENT_GROUP,
                peer=b if same else None,
                link_netnsid=None if same else 0,
                mac=mac,
                far_peer=None if same else b,
            ),
            ns,
        )
        self._set(
            pspace,
            Link(
                b,
                peer,
                "veth",
                group=NETAGENT_GROUP,
                peer=a if same else None,
                link_netnsid=None if same else 0,
                mac=peer_mac,
                far_peer=None if same else a,
            ),
            peer_ns,
        )
        self.calls.append(("add_veth", name, ns, peer, peer_ns))
        if master is not None and ns is None:
            self.sysctls[PORT_IPV6.format(name)] = "1"

    async def set_link(
        self,
        ns: NsRef,
        index: int,
        *,
        alias: str | None = None,
        up: bool | None = None,
        master: int | None = None,
        mac: str | None = None,
    ) -> None:
        await self._fault("set_link")
        space = self._space(ns)
        link = space.links.get(index)
        if link is None:
            raise OSError(errno.ENODEV, "No such device")
        changes: dict[str, Any] = {}
        if alias is not None:
            changes["alias"] = alias
        if up is not None:
            changes["up"] = up
        if master is not None:
            changes["master"] = master
        if mac is not None:
            changes["mac"] = mac
        self._set(space, dataclasses.replace(link, **changes), ns)
        self.calls.append(("set_link", ns, link.name, changes))

    async def del_link(self, ns: NsRef, index: int) -> None:
        await self._fault("del_link")
        space = self._space(ns)
        name = space.links[index].name if index in space.links else None
        self._delete(ns, space, index)
        self.calls.append(("del_link", ns, name))

    async def enslave(self, pairs: list[tuple[int, int]]) -> list[OSError | None]:
        await self._fault("enslave")
        out: list[OSError | None] = []
        for index, master in pairs:
            link = self.host.links.get(index)
            if link is None:
                out.append(OSError(errno.ENODEV, "No such device"))
                continue
            self._set(self.host, dataclasses.replace(link, master=master, up=True), None)
            self.calls.append(("enslave", link.name, master))
            out.append(None)
        return out

    # ---- addresses and routes -------------------------------------------------------
    async def addresses(self, ns: NsRef, index: int) -> set[IPInterface]:
        await self._fault("addresses")
        return set(self._space(ns).addrs.get(index, ()))

    async def host_addressed(self) -> dict[int, set[bytes]]:
        return {
            index: {a.ip.packed for a in addrs if not a.ip.is_link_local}
            for index, addrs in self.host.addrs.items()
            if any(not a.ip.is_link_local for a in addrs)
        }

    async def add_address(self, ns: NsRef, index: int, addr: IPInterface) -> None:
        await self._fault("add_address")
        self._space(ns).addrs.setdefault(index, set()).add(addr)
        self.calls.append(("add_address", ns, index, str(addr)))

    async def del_address(self, ns: NsRef, index: int, addr: IPInterface) -> None:
        await self._fault("del_address")
        self._space(ns).addrs.get(index, set()).discard(addr)
        self.calls.append(("del_address", ns, index, str(addr)))

    async def default_routes(self, ns: NsRef, version: int) -> list[Route]:
        await self._fault("default_routes")
        route = self._space(ns).routes.get(version)
        return [] if route is None else [route]

    async def add_default_route(self, ns: NsRef, index: int, gateway: IPAddress) -> bool:
        await self._fault("add_default_route")
        space = self._space(ns)
        if gateway.version in space.routes:
            return False
        space.routes[gateway.version] = Route(str(gateway), index, RTPROT_NETAGENT)
        self.calls.append(("add_default_route", ns, str(gateway)))
        return True

    async def replace_default_route(self, ns: NsRef, index: int, gateway: IPAddress) -> None:
        await self._fault("replace_default_route")
        space = self._space(ns)
        space.routes[gateway.version] = Route(str(gateway), index, RTPROT_NETAGENT)
        self.calls.append(("replace_default_route", ns, str(gateway)))

    # ---- the VXLAN overlay ----------------------------------------------------------
    def add_address_to_host(self, name: str, addr: IPInterface) -> Link:
        """A host interface someone else made, holding ``addr`` (an underlay's eth0)."""
        link = self.make_foreign_link(name)
        self.host.addrs.setdefault(link.index, set()).add(addr)
        return link

    async def add_vxlan(
        self, name: str, *, vni: int, port: int, local: str, dev: int, mac: str
    ) -> None:
        await self._fault("add_vxlan")
        if self._by_name(self.host, name) is not None:
            raise FileExistsError(errno.EEXIST, name)
        link = Link(self._index(), name, "vxlan", up=True, group=NETAGENT_GROUP, mac=mac)
        self.vxlans[link.index] = (vni, port, local, dev, False)
        self._set(self.host, link, None)
        self.calls.append(("add_vxlan", name, vni, port, local, dev, mac))

    async def vxlan(self, name: str) -> Vxlan | None:
        await self._fault("vxlan")
        link = self._by_name(self.host, name)
        if link is None or link.index not in self.vxlans:
            return None
        vni, port, local, dev, learning = self.vxlans[link.index]
        return Vxlan(link, vni, port, local, dev, learning)

    async def address_owner(self, ip: str) -> int | None:
        for index, addrs in self.host.addrs.items():
            if any(str(a.ip) == ip for a in addrs):
                return index
        return None

    def _device(self, index: int) -> None:
        if index not in self.vxlans:
            raise OSError(errno.ENODEV, "No such device")

    async def peer_entries(
        self, index: int, subnet: IPv4Network, vtep: str, mac: str
    ) -> PeerEntries:
        await self._fault("peer_entries")
        self._device(index)
        return PeerEntries(
            self.routes.get(index, {}).get(str(subnet)),
            self.neighbours.get(index, {}).get(vtep),
            self.fdb.get(index, {}).get(mac),
        )

    async def set_peer_entries(
        self,
        index: int,
        subnet: IPv4Network,
        vtep: str,
        mac: str,
        underlay: str,
        what: tuple[bool, bool, bool] = (True, True, True),
    ) -> None:
        await self._fault("set_peer_entries")
        self._device(index)
        if what[0]:
            self.routes.setdefault(index, {})[str(subnet)] = vtep
        if what[1]:
            self.neighbours.setdefault(index, {})[vtep] = mac
        if what[2]:
            self.fdb.setdefault(index, {})[mac] = underlay
        self.calls.append(("set_peer_entries", str(subnet), what))

    async def del_peer_entries(self, index: int, subnet: IPv4Network, vtep: str, mac: str) -> None:
        await self._fault("del_peer_entries")
        self.routes.get(index, {}).pop(str(subnet), None)
        self.neighbours.get(index, {}).pop(vtep, None)
        self.fdb.get(index, {}).pop(mac, None)
        self.calls.append(("del_peer_entries", str(subnet)))

    async def del_fdb(self, index: int, mac: str) -> None:
        self.fdb.get(index, {}).pop(mac, None)
        self.calls.append(("del_fdb", mac))

    async def link_counters(self) -> dict[str, tuple[int, int, int, int]]:
        """Host links by name with what a test set in ``traffic`` (else zeros)."""
        return {lk.name: self.traffic.get(lk.name, (0, 0, 0, 0)) for lk in self.host.links.values()}

    # ---- sysctls --------------------------------------------------------------------
    def sysctl(self, path: str) -> str | None:
        return self.sysctls.get(path)

    def port_ipv6(self, name: str) -> bool | None:
        if self._by_name(self.host, name) is None:
            return None
        return self.sysctls.get(PORT_IPV6.format(name), "0") == "0"

    async def port_ipv6_off(self, name: str) -> None:
        self.sysctls[PORT_IPV6.format(name)] = "1"
        self.calls.append(("port_ipv6_off", name))

    def set_sysctl(self, path: str, value: str) -> None:
        self.sysctls[path] = value

    async def set_ns_sysctls(self, ns: str, values: dict[str, str]) -> None:
        await self._fault("set_ns_sysctls")
        self._space(ns)
        for path, value in values.items():
            self.sysctls[f"{ns}:{path}"] = value

    # ---- views ----------------------------------------------------------------------
    async def show_links(self, ns: NsRef) -> list[dict[str, Any]]:
        space = self._space(ns)
        return [
            {
                "index": lk.index,
                "name": lk.name,
                "kind": lk.kind,
                "state": "up" if lk.up else "down",
                "master": None,
                "addresses": sorted(str(a) for a in space.addrs.get(lk.index, ())),
                "owner": lk.owner_key,
            }
            for lk in space.links.values()
        ]

    async def show_neigh(self, ns: NsRef) -> list[dict[str, Any]]:
        self._space(ns)
        return []

    async def show_routes(self, ns: NsRef) -> list[dict[str, Any]]:
        return [
            {
                "destination": "default",
                "gateway": r.gateway,
                "dev": None,
                "source": None,
                "proto": r.proto,
            }
            for r in self._space(ns).routes.values()
        ]
