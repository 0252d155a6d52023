"""The real :class:`~netagent.backends.netlink.Netlink`: pyroute2's async API, plus raw
rtnetlink (``rtnl``) for the attach fast path and the host's links.

Quirks worked around here (pyroute2 0.9.7, see ``docs/kernel-facts.md``):

* link creations, changes and deletions leave from a thread (``nlsend.IPRoute``): the
  kernel does their work inside ``send()``, milliseconds under the rtnl lock.
* namespace sockets are made by a short-lived thread that enters the namespace
  (``rtnldump.socket_in_netns``) and handed to ``AsyncIPRoute(fileno=...)``: pyroute2's own
  ``netns=`` forks (8-10 ms, unsafe in a threaded process) and, without ``flags=0``,
  silently *creates* a missing namespace. Sockets are kept per namespace identity (the
  nsfs inode): a namespace deleted and made again under the same name is another one.
* every ``"get"`` request leaves its ACK in the socket's root queue; ``_drain`` empties
  it so a daemon that runs for months does not grow without bound.
* ``IFLA_IFALIAS`` cannot be given at creation; it is set right after (the creation-time
  link group marks the link meanwhile).
* a netlink socket runs one dump at a time: the kernel refuses a second one started
  while the first is still being read (``EBUSY``). The daemon's requests, passes and
  event source share a socket per namespace, so dumps on one socket take turns
  (``_dump``); gets and changes are answered at once and need no turn.
* every request has a time limit (:data:`TIMEOUT`): a socket whose namespace was deleted
  meanwhile can leave a request unanswered, which once wedged every later change. On
  timeout the socket is dropped and the request fails with ``HostTimeout``.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import socket
import weakref
from collections.abc import Awaitable
from pathlib import Path
from typing import Any, TypeVar

import anyio
import structlog
from pyroute2.netlink.exceptions import NetlinkError

from netagent.agent.errors import BackendFailed, HostTimeout
from netagent.agent.values import IPAddress, IPInterface

from . import procsys, rtnl, rtnldump
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
from .nlsend import IPRoute, SendThread
from .nssockets import Namespaces
from .overlay import Overlay
from .pyroute_msgs import (
    drain,
    family,
    link_from_msg,
    link_rows,
    neigh_rows,
    random_mac,
    route_rows,
    vxlan_from_msg,
)

T = TypeVar("T")
log = structlog.get_logger("netagent.netlink")
IFA_F_NODAD = 0x02
#: seconds any one netlink request (or dump) may take
TIMEOUT = 5.0
NETNS_DIR = Path(os.environ.get("NETAGENT_NETNS_DIR", "/run/netns"))


class PyrouteNetlink:
    """Links, addresses and routes in the daemon's namespace and in other namespaces."""

    def __init__(self, netns_dir: Path = NETNS_DIR) -> None:
        self.netns_dir = netns_dir
        self.ipr: Any = None
        self.raw: rtnl.Requests | None = None
        self.overlay: Overlay | None = None
        #: sends the link requests of every socket here (``nlsend``: not on the loop)
        self.sender: SendThread | None = None
        self.namespaces = Namespaces(netns_dir, TIMEOUT, self._new_socket)
        #: one dump at a time per socket (the kernel refuses a second with EBUSY)
        self._dumping: weakref.WeakKeyDictionary[Any, anyio.Lock] = weakref.WeakKeyDictionary()
        #: the host refused a port's disable_ipv6 (``port_ipv6_off``)
        self._port_ipv6_refused = False

    # ---- lifecycle ------------------------------------------------------------------
    async def start(self) -> None:
        self.sender = SendThread()
        self.ipr = IPRoute(self.sender)
        await self.ipr.setup_endpoint()
        self.raw = rtnl.Requests()
        self.overlay = Overlay(self.raw)

    async def close(self) -> None:
        self.namespaces.close()
        if self.ipr is not None:
            self.ipr.close()
            self.ipr = None
        if self.raw is not None:
            self.raw.close()
            self.raw = None
        if self.sender is not None:
            self.sender.close()
            self.sender = None

    # ---- time limits ----------------------------------------------------------------
    async def _timed(self, ns: NsRef, what: str, aw: Awaitable[T]) -> T:
        try:
            with anyio.fail_after(TIMEOUT):
                return await aw
        except TimeoutError:
            if ns is not None:
                await self.forget(ns)  # a socket that stopped answering is not reused
            where = f" in {ns}" if ns else ""
            raise HostTimeout(
                f"the kernel did not answer {what}{where} within {TIMEOUT:g} s"
            ) from None

    async def _dump(
        self,
        ns: NsRef,
        what: str,
        sock: Any,
        table: str,
        **filters: Any,
    ) -> list[Any]:
        """All the messages of ``sock.<table>("dump", **filters)`` (``addr``, ``route``,
        ``neigh``), after any other dump on that socket is done (the wait counts toward
        the time limit)."""
        lock = self._dumping.get(sock)
        if lock is None:
            lock = self._dumping[sock] = anyio.Lock()

        async def collect() -> list[Any]:
            async with lock:
                return [m async for m in await getattr(sock, table)("dump", **filters)]

        return await self._timed(ns, what, collect())

    # ---- namespaces (``nssockets.Namespaces``) -------------------------------------
    def _path(self, ns: str) -> Path:
        return self.namespaces.path(ns)

    def ns_exists(self, ns: str) -> bool:
        return self.namespaces.exists(ns)

    def ns_identity(self, ns: str) -> tuple[int, int] | None:
        return self.namespaces.identity(ns)

    def ns_names(self) -> list[str]:
        return self.namespaces.names()

    async def ns_add(self, name: str) -> None:
        await self.namespaces.add(name)

    def announcing(self, ns: str) -> bool:
        return self.namespaces.announcing(ns)

    async def ns_del(self, name: str) -> None:
        await self.namespaces.delete(name)

    def _new_socket(self, raw: socket.socket) -> IPRoute:
        assert self.sender is not None, "start() first"
        return IPRoute(self.sender, fileno=raw.detach())

    async def forget(self, ns: str) -> None:
        self.namespaces.forget(ns)

    async def _sock(self, ns: NsRef) -> Any:
        return self.ipr if ns is None else await self.namespaces.socket(ns)

    # ---- links ----------------------------------------------------------------------
    async def link(self, ns: NsRef, name: str) -> Link | None:
        if ns is None and self.raw is not None:
            # by index on the raw socket, netagent's parser (~0.1 ms; pyroute2 ~1); by
            # name below only when the index came to name another interface meanwhile
            index = self.host_index(name)
            found = None if index is None else (await self.host_links([index]))[0]
            if found is None or found.name == name:
                return found
        if ns is not None and not self.ns_exists(ns):
            return None
        sock = await self._sock(ns)
        try:
            msgs = await self._timed(ns, f"a lookup of {name}", sock.link("get", ifname=name))
        except NetlinkError as exc:
            if exc.code == errno.ENODEV:
                return None
            raise
        finally:
            drain(sock)
        return link_from_msg(msgs[0]) if msgs else None

    async def links(self, ns: NsRef) -> list[Link]:
        """A dump through netagent's own parser, in a worker thread (``rtnldump.dump_links``):
        the host's links, thousands with many containers, cost milliseconds, not the
        hundreds pyroute2's parser takes on the event loop."""
        if ns is not None and not self.ns_exists(ns):
            raise FileNotFoundError(f"namespace {ns} does not exist")
        path = None if ns is None else str(self._path(ns))
        where = "the host" if ns is None else f"namespace {ns}"
        try:
            with anyio.fail_after(TIMEOUT + 1):
                return await anyio.to_thread.run_sync(rtnldump.dump_links, path, TIMEOUT)
        except TimeoutError:
            raise HostTimeout(f"the kernel did not answer a link dump of {where}") from None

    def host_index(self, name: str) -> int | None:
        try:
            return socket.if_nametoindex(name)
        except OSError:
            return None

    async def host_links(self, indexes: list[int]) -> list[Link | None]:
        assert self.raw is not None
        try:
            return await self.raw.get_links(indexes)
        except TimeoutError:
            raise HostTimeout("the kernel did not answer a lookup of interfaces") from None

    async def add_bridge(self, name: str, mac: str | None = None) -> None:
        """The MAC is given at creation, which makes it the bridge's own
        (``addr_assign_type`` 3, "set"): a bridge without one takes its lowest port's
        instead and changes it as ports come and go, and the namespaces behind it keep
        the old gateway MAC in their ARP caches (docs/kernel-facts.md). netagent's own
        bridges get one derived from the intent (the same after a repair), others a
        random one."""
        await self._timed(
            None,
            f"creating bridge {name}",
            self.ipr.link(
                "add",
                ifname=name,
                kind="bridge",
                state="up",
                group=NETAGENT_GROUP,
                address=mac or random_mac(),
            ),
        )

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
        peer_spec: dict[str, Any] = {"ifname": peer, "group": NETAGENT_GROUP}
        spec: dict[str, Any] = {"ifname": name, "kind": "veth", "group": NETAGENT_GROUP}
        # the namespaces' files: opened here (checked against an identity when given),
        # closed once the request has gone. pyroute2 closes one it opened when an answer
        # of the request's sequence number comes on any of its sockets: of 600 plugs in
        # one apply, one's came before the send, and the number, reused, misled it
        fds: list[int] = []
        try:
            if peer_ns is not None:
                fds.append(
                    self.namespaces.open_checked(peer_ns, peer_ns_id)
                    if peer_ns_id is not None
                    else os.open(self._path(peer_ns), os.O_RDONLY | os.O_CLOEXEC)
                )
                peer_spec["net_ns_fd"] = fds[-1]
            if ns is not None:
                fds.append(os.open(self._path(ns), os.O_RDONLY | os.O_CLOEXEC))
                spec["net_ns_fd"] = fds[-1]
            if peer_mac is not None:
                peer_spec["address"] = peer_mac
            if master is not None:
                spec["master"] = master
            if up:
                spec["state"] = "up"
            if mac is not None:
                spec["address"] = mac
            if mtu is not None:
                spec["mtu"] = peer_spec["mtu"] = mtu
            await self._timed(ns, f"creating {name}", self.ipr.link("add", **spec, peer=peer_spec))
        finally:
            assert self.sender is not None
            for fd in fds:
                self.sender.then(os.close, fd)
        if master is not None and ns is None:
            # before the peer is up: the port's carrier, and IPv6 with it, never came up
            await self.port_ipv6_off(name)

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
        spec: dict[str, Any] = {}
        if alias is not None:
            spec["ifalias"] = alias
        if up is not None:
            spec["state"] = "up" if up else "down"
        if master is not None:
            spec["master"] = master
        if mac is not None:
            spec["address"] = mac
        sock = await self._sock(ns)
        await self._timed(ns, f"a change of #{index}", sock.link("set", index=index, **spec))

    async def del_link(self, ns: NsRef, index: int) -> None:
        sock = await self._sock(ns)
        try:
            await self._timed(ns, f"deleting #{index}", sock.link("del", index=index))
        except NetlinkError as exc:
            if exc.code != errno.ENODEV:
                raise

    async def enslave(self, pairs: list[tuple[int, int]]) -> list[OSError | None]:
        assert self.raw is not None
        return await self.raw.set_masters_up(pairs)

    # ---- addresses and routes -------------------------------------------------------
    async def addresses(self, ns: NsRef, index: int) -> set[IPInterface]:
        sock = await self._sock(ns)
        result: set[IPInterface] = set()
        for m in await self._dump(ns, "an address dump", sock, "addr", index=index):
            if m["index"] != index:
                continue
            addr = (
                m.get_attr("IFA_ADDRESS")
                if m["family"] == socket.AF_INET6
                else (m.get_attr("IFA_LOCAL") or m.get_attr("IFA_ADDRESS"))
            )
            if addr:
                result.add(ipaddress.ip_interface(f"{addr}/{m['prefixlen']}"))
        return result

    async def host_addressed(self) -> dict[int, set[bytes]]:
        out: dict[int, set[bytes]] = {}
        for m in await self._dump(None, "an address dump", self.ipr, "addr"):
            if m["scope"] >= rtnl.RT_SCOPE_LINK:
                continue
            addr = m.get_attr("IFA_LOCAL") or m.get_attr("IFA_ADDRESS")
            if addr:
                out.setdefault(m["index"], set()).add(ipaddress.ip_address(addr).packed)
        return out

    async def add_address(self, ns: NsRef, index: int, addr: IPInterface) -> None:
        """IPv6 addresses skip duplicate address detection (IFA_F_NODAD): netagent refuses
        duplicates on a segment itself, and DAD would leave a new address unusable
        ("tentative") for a second or two."""
        sock = await self._sock(ns)
        try:
            await self._timed(
                ns,
                f"adding {addr}",
                sock.addr(
                    "add",
                    index=index,
                    address=str(addr.ip),
                    prefixlen=addr.network.prefixlen,
                    family=family(addr.version),
                    flags=IFA_F_NODAD if addr.version == 6 else 0,
                ),
            )
        except NetlinkError as exc:
            if exc.code != errno.EEXIST:
                raise

    async def del_address(self, ns: NsRef, index: int, addr: IPInterface) -> None:
        sock = await self._sock(ns)
        with contextlib.suppress(NetlinkError):
            await self._timed(
                ns,
                f"removing {addr}",
                sock.addr(
                    "del",
                    index=index,
                    address=str(addr.ip),
                    prefixlen=addr.network.prefixlen,
                    family=family(addr.version),
                ),
            )

    async def default_routes(self, ns: NsRef, version: int) -> list[Route]:
        sock = await self._sock(ns)
        routes = []
        dump = await self._dump(ns, "a route dump", sock, "route", family=family(version))
        for m in dump:
            table = m.get_attr("RTA_TABLE") or m["table"]
            if m["dst_len"] != 0 or table != 254:
                continue
            routes.append(Route(m.get_attr("RTA_GATEWAY"), m.get_attr("RTA_OIF"), m["proto"]))
        return routes

    async def add_default_route(self, ns: NsRef, index: int, gateway: IPAddress) -> bool:
        sock = await self._sock(ns)
        try:
            await self._timed(
                ns,
                "adding a default route",
                sock.route(
                    "add",
                    dst="default" if gateway.version == 4 else "::/0",
                    gateway=str(gateway),
                    oif=index,
                    family=family(gateway.version),
                    proto=RTPROT_NETAGENT,
                ),
            )
        except NetlinkError as exc:
            if exc.code != errno.EEXIST:
                raise
            return False
        return True

    async def replace_default_route(self, ns: NsRef, index: int, gateway: IPAddress) -> None:
        sock = await self._sock(ns)
        await self._timed(
            ns,
            "replacing a default route",
            sock.route(
                "replace",
                dst="default" if gateway.version == 4 else "::/0",
                gateway=str(gateway),
                oif=index,
                family=family(gateway.version),
                proto=RTPROT_NETAGENT,
            ),
        )

    # ---- the VXLAN overlay ----------------------------------------------------------
    async def add_vxlan(
        self, name: str, *, vni: int, port: int, local: str, dev: int, mac: str
    ) -> None:
        await self._timed(
            None,
            f"creating VXLAN device {name}",
            self.ipr.link(
                "add",
                ifname=name,
                kind="vxlan",
                vxlan_id=vni,
                vxlan_port=port,
                vxlan_local=local,
                vxlan_link=dev,
                vxlan_learning=0,
                address=mac,
                group=NETAGENT_GROUP,
                state="up",
            ),
        )

    async def vxlan(self, name: str) -> Vxlan | None:
        try:
            msgs = await self._timed(None, f"a lookup of {name}", self.ipr.link("get", ifname=name))
        except NetlinkError as exc:
            if exc.code == errno.ENODEV:
                return None
            raise
        finally:
            drain(self.ipr)
        if not msgs:
            return None
        return vxlan_from_msg(msgs[0])

    async def address_owner(self, ip: str) -> int | None:
        for m in await self._dump(None, "an address dump", self.ipr, "addr"):
            if (m.get_attr("IFA_LOCAL") or m.get_attr("IFA_ADDRESS")) == ip:
                return int(m["index"])
        return None

    def _overlay(self) -> Overlay:
        assert self.overlay is not None, "start() first"
        return self.overlay

    async def _raw(self, what: str, aw: Awaitable[T]) -> T:
        try:
            return await aw
        except TimeoutError:
            raise HostTimeout(f"the kernel did not answer {what} within {TIMEOUT:g} s") from None

    async def peer_entries(
        self, index: int, subnet: ipaddress.IPv4Network, vtep: str, mac: str
    ) -> PeerEntries:
        return await self._raw(
            f"a lookup of {subnet}'s entries", self._overlay().get(index, subnet, vtep, mac)
        )

    async def set_peer_entries(
        self,
        index: int,
        subnet: ipaddress.IPv4Network,
        vtep: str,
        mac: str,
        underlay: str,
        what: tuple[bool, bool, bool] = (True, True, True),
    ) -> None:
        await self._raw(
            f"setting {subnet}'s entries",
            self._overlay().set(index, subnet, vtep, mac, underlay, what),
        )

    async def del_peer_entries(
        self, index: int, subnet: ipaddress.IPv4Network, vtep: str, mac: str
    ) -> None:
        await self._raw(
            f"removing {subnet}'s entries", self._overlay().delete(index, subnet, vtep, mac)
        )

    async def del_fdb(self, index: int, mac: str) -> None:
        await self._raw(f"removing the FDB entry of {mac}", self._overlay().delete_fdb(index, mac))

    # ---- sysctls --------------------------------------------------------------------
    async def link_counters(self) -> dict[str, tuple[int, int, int, int]]:
        try:
            with anyio.fail_after(TIMEOUT):
                return await anyio.to_thread.run_sync(rtnldump.link_counters)
        except TimeoutError:
            raise HostTimeout("the kernel did not answer a dump of interfaces") from None

    def sysctl(self, path: str) -> str | None:
        return procsys.read(path)

    def port_ipv6(self, name: str) -> bool | None:
        if self._port_ipv6_refused:
            return None  # the host does not let us (below): nothing to do about it
        value = self.sysctl(PORT_IPV6.format(name))
        return None if value is None else value == "0"

    async def port_ipv6_off(self, name: str) -> None:
        """Best effort: it makes ports cheaper for the kernel, no port needs it. Where
        the host refuses (a read-only /proc/sys, as in an unprivileged container) it
        is said once and not tried again. Written from the sender thread, after the
        link requests before it: the kernel takes the rtnl lock for it (and retries the
        write until it has it), so on the loop it waited for every veth being made."""
        if self._port_ipv6_refused:
            return
        assert self.sender is not None
        write = self.sender.call(procsys.write, PORT_IPV6.format(name), "1")
        try:
            await self._timed(None, f"turning IPv6 off on {name}", write)
        except FileNotFoundError:
            pass  # no IPv6 in this kernel (or the port is gone: the next step says so)
        except OSError as exc:
            self._port_ipv6_refused = True
            log.warning("cannot turn IPv6 off on bridge ports; they keep it", error=str(exc))

    def set_sysctl(self, path: str, value: str) -> None:
        """/proc/sys/net belongs to the writer's network namespace: the daemon in a
        sandbox changes only the sandbox."""
        try:
            procsys.write(path, value)
        except OSError as exc:
            raise BackendFailed(f"cannot set {path.replace('/', '.')}={value}: {exc}") from None

    async def set_ns_sysctls(self, ns: str, values: dict[str, str]) -> None:
        def write() -> None:
            for path, value in values.items():
                procsys.write(path, value)

        setting = anyio.to_thread.run_sync(rtnldump.in_netns, str(self._path(ns)), write)
        try:
            await self._timed(ns, "setting sysctls", setting)
        except OSError as exc:
            raise BackendFailed(f"cannot set sysctls in {ns}: {exc}") from None

    # ---- what the kernel has --------------------------------------------------------
    async def _names(self, ns: NsRef) -> dict[int, str]:
        return {lk.index: lk.name for lk in await self.links(ns)}

    async def show_links(self, ns: NsRef) -> list[dict[str, Any]]:
        sock = await self._sock(ns)
        links = await self.links(ns)
        return link_rows(links, await self._dump(ns, "an address dump", sock, "addr"))

    async def show_neigh(self, ns: NsRef) -> list[dict[str, Any]]:
        sock = await self._sock(ns)
        names = await self._names(ns)
        return neigh_rows(await self._dump(ns, "a neighbour dump", sock, "neigh"), names)

    async def show_routes(self, ns: NsRef) -> list[dict[str, Any]]:
        sock = await self._sock(ns)
        names = await self._names(ns)
        msgs = []
        for fam in (socket.AF_INET, socket.AF_INET6):
            msgs += await self._dump(ns, "a route dump", sock, "route", family=fam)
        return route_rows(msgs, names)
