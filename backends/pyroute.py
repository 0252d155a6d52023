"""The real :class:`~netagent.backends.netlink.Netlink`: pyroute2's async API, plus raw
rtnetlink (``rtnl``) for the attach fast path.

Quirks worked around here (pyroute2 0.9.7, see ``docs/kernel-facts.md``):

* namespace sockets are made by a short-lived thread that enters the namespace
  (``rtnl.socket_in_netns``) and handed to ``AsyncIPRoute(fileno=...)``: pyroute2's own
  ``netns=`` forks (8-10 ms, unsafe in a threaded process) and, without ``flags=0``,
  silently *creates* a missing namespace. Sockets are kept per namespace identity (the
  nsfs inode): a namespace deleted and made again under the same name is another one.
* every ``"get"`` request leaves its ACK in the socket's root queue; ``_drain`` empties
  it so a daemon that runs for months does not grow without bound.
* ``IFLA_IFALIAS`` cannot be given at creation; it is set right after (the creation-time
  link group marks the link meanwhile).
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
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any, TypeVar

import anyio
from pyroute2 import AsyncIPRoute
from pyroute2.netlink.exceptions import NetlinkError

from netagent.agent.errors import BackendFailed, HostTimeout
from netagent.agent.values import IPAddress, IPInterface

from . import rtnl
from .netlink import NETAGENT_GROUP, RTPROT_NETAGENT, Link, NsRef, Route

T = TypeVar("T")
IFF_UP = 0x1
IFA_F_NODAD = 0x02
#: seconds any one netlink request (or dump) may take
TIMEOUT = 5.0
#: seconds ``ip netns add/del`` may take
TOOL_TIMEOUT = 15.0
NETNS_DIR = Path(os.environ.get("NETAGENT_NETNS_DIR", "/run/netns"))


def link_from_msg(msg: Any) -> Link:
    kind = None
    info = msg.get_attr("IFLA_LINKINFO")
    if info is not None:
        kind = info.get_attr("IFLA_INFO_KIND")
    netnsid = msg.get_attr("IFLA_LINK_NETNSID")
    return Link(
        index=msg["index"],
        name=msg.get_attr("IFLA_IFNAME"),
        kind=kind,
        up=bool(msg["flags"] & IFF_UP),
        master=msg.get_attr("IFLA_MASTER"),
        alias=msg.get_attr("IFLA_IFALIAS"),
        group=msg.get_attr("IFLA_GROUP") or 0,
        peer=(msg.get_attr("IFLA_LINK") or None) if kind == "veth" and netnsid is None else None,
        link_netnsid=netnsid,
        mac=msg.get_attr("IFLA_ADDRESS"),
    )


def _drain(sock: Any) -> None:
    """Drop stray ACKs that pyroute2 leaves in the root queue after "get" requests."""
    queue = sock.msg_queue.root
    while not queue.empty():
        queue.get_nowait()
        queue.task_done()


def _family(version: int) -> int:
    return socket.AF_INET if version == 4 else socket.AF_INET6


class PyrouteNetlink:
    """Links, addresses and routes in the daemon's namespace and in other namespaces."""

    def __init__(self, netns_dir: Path = NETNS_DIR) -> None:
        self.netns_dir = netns_dir
        self.ipr: Any = None
        self.raw: rtnl.Requests | None = None
        self._ns: dict[str, tuple[tuple[int, int], Any]] = {}
        self._ns_lock = anyio.Lock()

    # ---- lifecycle ------------------------------------------------------------------
    async def start(self) -> None:
        self.ipr = AsyncIPRoute()
        await self.ipr.setup_endpoint()
        self.raw = rtnl.Requests()

    async def close(self) -> None:
        for name in list(self._ns):
            await self.forget(name)
        if self.ipr is not None:
            self.ipr.close()
            self.ipr = None
        if self.raw is not None:
            self.raw.close()
            self.raw = None

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

    async def _dump(self, ns: NsRef, what: str, it: Awaitable[AsyncIterator[Any]]) -> list[Any]:
        async def collect() -> list[Any]:
            return [m async for m in await it]

        return await self._timed(ns, what, collect())

    # ---- namespaces -----------------------------------------------------------------
    def _path(self, ns: str) -> Path:
        return Path(ns) if ns.startswith("/") else self.netns_dir / ns

    def ns_exists(self, ns: str) -> bool:
        return self._path(ns).exists()

    def ns_identity(self, ns: str) -> tuple[int, int] | None:
        try:
            st = os.stat(self._path(ns))
        except (FileNotFoundError, NotADirectoryError, PermissionError):
            return None
        return st.st_dev, st.st_ino

    def ns_names(self) -> list[str]:
        try:
            return sorted(p.name for p in self.netns_dir.iterdir())
        except FileNotFoundError:
            return []

    async def _tool(self, argv: list[str]) -> None:
        env = {"LANG": "C", "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")}
        try:
            with anyio.fail_after(TOOL_TIMEOUT):
                result = await anyio.run_process(argv, check=False, env=env)
        except TimeoutError:
            raise BackendFailed(f"{' '.join(argv)} did not finish in {TOOL_TIMEOUT:g} s") from None
        if result.returncode != 0:
            msg = result.stderr.decode(errors="replace").strip() or f"exit {result.returncode}"
            if "File exists" in msg:
                raise FileExistsError(errno.EEXIST, msg)
            raise BackendFailed(f"{' '.join(argv)}: {msg}")

    async def ns_add(self, name: str) -> None:
        await self._tool(["ip", "netns", "add", name])

    async def ns_del(self, name: str) -> None:
        await self._tool(["ip", "netns", "del", name])

    async def _ns_socket(self, ns: str) -> Any:
        """A request socket inside ``ns``, kept with the namespace's identity."""
        ident = self.ns_identity(ns)
        cached = self._ns.get(ns)
        if cached is not None and cached[0] == ident:
            return cached[1]
        async with self._ns_lock:
            ident = self.ns_identity(ns)
            cached = self._ns.get(ns)
            if cached is not None and cached[0] == ident:
                return cached[1]
            await self.forget(ns)
            if ident is None:
                raise FileNotFoundError(f"namespace {ns} does not exist")
            raw = await self._timed(
                None,
                f"entering namespace {ns}",
                anyio.to_thread.run_sync(rtnl.socket_in_netns, str(self._path(ns))),
            )
            sock = AsyncIPRoute(fileno=raw.detach())
            await self._timed(None, "opening a socket", sock.setup_endpoint())
            self._ns[ns] = (ident, sock)
        return sock

    async def forget(self, ns: str) -> None:
        cached = self._ns.pop(ns, None)
        if cached is not None:
            with contextlib.suppress(Exception):
                cached[1].close()

    async def _sock(self, ns: NsRef) -> Any:
        return self.ipr if ns is None else await self._ns_socket(ns)

    # ---- links ----------------------------------------------------------------------
    async def link(self, ns: NsRef, name: str) -> Link | None:
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
            _drain(sock)
        return link_from_msg(msgs[0]) if msgs else None

    async def links(self, ns: NsRef) -> list[Link]:
        sock = await self._sock(ns)
        return [link_from_msg(m) for m in await self._dump(ns, "a link dump", sock.link("dump"))]

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

    async def add_bridge(self, name: str) -> None:
        await self._timed(
            None,
            f"creating bridge {name}",
            self.ipr.link("add", ifname=name, kind="bridge", state="up", group=NETAGENT_GROUP),
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
    ) -> None:
        peer_spec: dict[str, Any] = {"ifname": peer, "group": NETAGENT_GROUP}
        if peer_ns is not None:
            peer_spec["net_ns_fd"] = str(self._path(peer_ns))
        if peer_mac is not None:
            peer_spec["address"] = peer_mac
        spec: dict[str, Any] = {"ifname": name, "kind": "veth", "group": NETAGENT_GROUP}
        if ns is not None:
            spec["net_ns_fd"] = str(self._path(ns))
        if master is not None:
            spec["master"] = master
        if up:
            spec["state"] = "up"
        if mac is not None:
            spec["address"] = mac
        await self._timed(ns, f"creating veth {name}", self.ipr.link("add", **spec, peer=peer_spec))

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
        for m in await self._dump(ns, "an address dump", sock.addr("dump", index=index)):
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
                    family=_family(addr.version),
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
                    family=_family(addr.version),
                ),
            )

    async def default_routes(self, ns: NsRef, version: int) -> list[Route]:
        sock = await self._sock(ns)
        routes = []
        dump = sock.route("dump", family=_family(version))
        for m in await self._dump(ns, "a route dump", dump):
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
                    family=_family(gateway.version),
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
                family=_family(gateway.version),
                proto=RTPROT_NETAGENT,
            ),
        )

    # ---- sysctls --------------------------------------------------------------------
    async def link_counters(self) -> dict[str, tuple[int, int, int, int]]:
        try:
            with anyio.fail_after(TIMEOUT):
                return await anyio.to_thread.run_sync(rtnl.link_counters)
        except TimeoutError:
            raise HostTimeout("the kernel did not answer a dump of interfaces") from None

    def sysctl(self, path: str) -> str | None:
        try:
            return Path("/proc/sys", path).read_text().strip()
        except OSError:
            return None

    def set_sysctl(self, path: str, value: str) -> None:
        """/proc/sys/net belongs to the writer's network namespace: the daemon in a
        sandbox changes only the sandbox."""
        try:
            Path("/proc/sys", path).write_text(value)
        except OSError as exc:
            raise BackendFailed(f"cannot set {path.replace('/', '.')}={value}: {exc}") from None

    # ---- what the kernel has --------------------------------------------------------
    async def _names(self, ns: NsRef) -> dict[int, str]:
        return {lk.index: lk.name for lk in await self.links(ns)}

    async def show_links(self, ns: NsRef) -> list[dict[str, Any]]:
        sock = await self._sock(ns)
        links = await self.links(ns)
        names = {lk.index: lk.name for lk in links}
        addrs: dict[int, list[str]] = {}
        for m in await self._dump(ns, "an address dump", sock.addr("dump")):
            addr = m.get_attr("IFA_ADDRESS")
            if addr:
                addrs.setdefault(m["index"], []).append(f"{addr}/{m['prefixlen']}")
        return [
            {
                "index": lk.index,
                "name": lk.name,
                "kind": lk.kind,
                "state": "up" if lk.up else "down",
                "master": names.get(lk.master) if lk.master else None,
                "addresses": addrs.get(lk.index, []),
                "owner": lk.owner_key,
            }
            for lk in links
        ]

    async def show_neigh(self, ns: NsRef) -> list[dict[str, Any]]:
        sock = await self._sock(ns)
        names = await self._names(ns)
        result = []
        for m in await self._dump(ns, "a neighbour dump", sock.neigh("dump")):
            dst = m.get_attr("NDA_DST")
            if dst is None:
                continue
            result.append(
                {
                    "address": dst,
                    "lladdr": m.get_attr("NDA_LLADDR"),
                    "dev": names.get(m["ifindex"], str(m["ifindex"])),
                    "state": _NUD.get(m["state"], str(m["state"])),
                }
            )
        return result

    async def show_routes(self, ns: NsRef) -> list[dict[str, Any]]:
        sock = await self._sock(ns)
        names = await self._names(ns)
        result = []
        for family in (socket.AF_INET, socket.AF_INET6):
            for m in await self._dump(ns, "a route dump", sock.route("dump", family=family)):
                table = m.get_attr("RTA_TABLE") or m["table"]
                if table != 254:
                    continue
                dst = m.get_attr("RTA_DST")
                result.append(
                    {
                        "destination": f"{dst}/{m['dst_len']}" if dst else "default",
                        "gateway": m.get_attr("RTA_GATEWAY"),
                        "dev": names.get(m.get_attr("RTA_OIF")),
                        "source": m.get_attr("RTA_PREFSRC"),
                        "proto": m["proto"],
                    }
                )
        return result


_NUD = {
    0x01: "INCOMPLETE",
    0x02: "REACHABLE",
    0x04: "STALE",
    0x08: "DELAY",
    0x10: "PROBE",
    0x20: "FAILED",
    0x40: "NOARP",
    0x80: "PERMANENT",
}
