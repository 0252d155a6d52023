"""The link backend: namespaces, veth pairs, bridges, addresses and routes over netlink.

pyroute2's async API (0.9.7, asyncio only). Notes on the quirks worked around here:

* namespace sockets are made by a thread that enters the namespace
  (``rtnl.socket_in_netns``) and handed to ``AsyncIPRoute(fileno=...)``: pyroute2's own
  ``netns=`` forks (8-10 ms, and unsafe in a threaded process) and, without ``flags=0``,
  silently *creates* a missing namespace. The sockets are kept.
* every ``"get"`` request leaves its ACK in the socket's root queue; ``_drain`` empties it
  so a daemon that runs for months does not grow without bound.
* veth peers are created directly in their namespace (moving a link costs a grace period).
* ``IFLA_IFALIAS`` cannot be given at creation; it is set right after. It marks what
  netagent made (``netagent:<key>``); nothing without the mark is ever deleted.

Every ``ensure_*`` observes, then acts only on what differs, and returns what it did; with
``dry_run=True`` it returns what it *would* do, which is how ``show`` reports whether each
part is in place.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import socket
from collections.abc import Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import anyio
from pyroute2 import AsyncIPRoute
from pyroute2.netlink.exceptions import NetlinkError

from netagent.agent import intents as I
from netagent.agent.errors import BackendFailed

from . import rtnl

T = TypeVar("T")
ALIAS_PREFIX = "netagent:"
#: link group given at creation (the alias cannot be): if the daemon dies between
#: creating a link and marking it, the link is still known as netagent's
NETAGENT_GROUP = 0x4E41
#: route protocol number marking routes netagent installs (rtnetlink leaves values above
#: RTPROT_STATIC to userspace; 201 is not taken in iproute2's rt_protos table)
RTPROT_NETAGENT = 201
IFF_UP = 0x1
NETNS_DIR = Path(os.environ.get("NETAGENT_NETNS_DIR", "/run/netns"))


def alias_for(key: str) -> str:
    return f"{ALIAS_PREFIX}{key}"


def _drain(sock: Any) -> None:
    """Drop stray ACKs that pyroute2 leaves in the root queue after "get" requests."""
    queue = sock.msg_queue.root
    while not queue.empty():
        queue.get_nowait()
        queue.task_done()


@dataclass
class Link:
    index: int
    name: str
    kind: str | None
    up: bool
    master: int | None
    alias: str | None
    link_netnsid: int | None = None
    peer: int | None = None  # a veth's peer index, when in the same namespace
    group: int = 0

    @classmethod
    def from_msg(cls, msg: Any) -> Link:
        kind = None
        info = msg.get_attr("IFLA_LINKINFO")
        if info is not None:
            kind = info.get_attr("IFLA_INFO_KIND")
        return cls(
            index=msg["index"],
            name=msg.get_attr("IFLA_IFNAME"),
            kind=kind,
            up=bool(msg["flags"] & IFF_UP),
            master=msg.get_attr("IFLA_MASTER"),
            alias=msg.get_attr("IFLA_IFALIAS"),
            link_netnsid=msg.get_attr("IFLA_LINK_NETNSID"),
            group=msg.get_attr("IFLA_GROUP") or 0,
            peer=(
                msg.get_attr("IFLA_LINK") or None
                if kind == "veth" and msg.get_attr("IFLA_LINK_NETNSID") is None
                else None
            ),
        )

    def belongs_to(self, key: str) -> bool:
        """Made by netagent for ``key``: its mark, or (a crash between creating and
        marking it) netagent's creation-time group under the name of that intent."""
        return self.owner_key == key or (self.owner_key is None and self.group == NETAGENT_GROUP)

    @property
    def owner_key(self) -> str | None:
        if self.alias and self.alias.startswith(ALIAS_PREFIX):
            return self.alias[len(ALIAS_PREFIX) :]
        return None


@dataclass
class Actions:
    """What an ensure did (or, in a dry run, would do)."""

    dry_run: bool = False
    done: list[str] = field(default_factory=list)

    def add(self, what: str) -> bool:
        """Record an action; returns True when it should really be carried out."""
        self.done.append(what)
        return not self.dry_run


def _addr_family(addr: I.IPInterface) -> int:
    return socket.AF_INET if addr.version == 4 else socket.AF_INET6


class NetlinkBackend:
    """Links, addresses and routes in the daemon's namespace and in named namespaces."""

    def __init__(self, netns_dir: Path = NETNS_DIR, claims_dir: Path | None = None) -> None:
        self.netns_dir = netns_dir
        #: a file per namespace being created, written before ``ip netns add`` and
        #: removed once the namespace is marked: a crash in between leaves it known
        self.claims_dir = claims_dir
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
            await self.forget_namespace(name)
        if self.ipr is not None:
            self.ipr.close()
            self.ipr = None
        if self.raw is not None:
            self.raw.close()
            self.raw = None

    # ---- namespaces -----------------------------------------------------------------
    def namespace_exists(self, name: str) -> bool:
        return (self.netns_dir / name).exists()

    def list_namespaces(self) -> list[str]:
        try:
            return sorted(p.name for p in self.netns_dir.iterdir())
        except FileNotFoundError:
            return []

    def _ns_identity(self, name: str) -> tuple[int, int] | None:
        try:
            st = os.stat(self.netns_dir / name)
        except FileNotFoundError:
            return None
        return st.st_dev, st.st_ino

    async def ns_socket(self, name: str) -> Any:
        """A request socket inside namespace ``name``; kept open (opening forks).

        Kept with the namespace's identity (the nsfs inode): a namespace deleted and made
        again under the same name is another namespace, and the old socket would talk
        to the dead one."""
        ident = self._ns_identity(name)
        cached = self._ns.get(name)
        if cached is not None and cached[0] == ident:
            return cached[1]
        async with self._ns_lock:
            ident = self._ns_identity(name)
            cached = self._ns.get(name)
            if cached is not None and cached[0] == ident:
                return cached[1]
            await self.forget_namespace(name)
            if ident is None:
                raise FileNotFoundError(f"namespace {name} does not exist")
            # not AsyncIPRoute(netns=...): that forks, and a fork while another thread of
            # the daemon holds a lock can leave the child (and the daemon waiting on it)
            # stuck; a short-lived thread that enters the namespace makes the socket
            raw = await anyio.to_thread.run_sync(rtnl.socket_in_netns, str(self.netns_dir / name))
            sock = AsyncIPRoute(fileno=raw.detach())
            await sock.setup_endpoint()
            self._ns[name] = (ident, sock)
        return sock

    async def forget_namespace(self, name: str) -> None:
        cached = self._ns.pop(name, None)
        if cached is not None:
            sock = cached[1]
            with contextlib.suppress(Exception):
                sock.close()

    async def _sock(self, ns: str | None) -> Any:
        return self.ipr if ns is None else await self.ns_socket(ns)

    async def ensure_namespace(self, ns: I.Namespace, dry_run: bool = False) -> list[str]:
        acts = Actions(dry_run)
        created = False
        if not self.namespace_exists(ns.name) and acts.add(f"create namespace {ns.name}"):
            await self.forget_namespace(ns.name)
            self._claim(ns.name)
            await _run(["ip", "netns", "add", ns.name])
            created = True
        if dry_run and not self.namespace_exists(ns.name):
            acts.add(f"set lo up in {ns.name}")
            return acts.done
        sock = await self.ns_socket(ns.name)
        lo = await self._link(sock, "lo")
        if lo is None:
            return acts.done
        if lo.alias != alias_for(ns.key):
            if not created and not self._claimed(ns.name):
                # someone else's namespace under this name: never take it over
                raise BackendFailed(
                    f"namespace {ns.name} exists and was not made by netagent; it is left "
                    "alone (plug it as it is, or pick another name)"
                )
            if acts.add(f"mark {ns.name} as netagent's"):
                await sock.link("set", index=lo.index, ifalias=alias_for(ns.key))
                self._unclaim(ns.name)
        if not lo.up and acts.add(f"set lo up in {ns.name}"):
            await sock.link("set", index=lo.index, state="up")
        return acts.done

    def _claim_path(self, name: str) -> Path | None:
        return None if self.claims_dir is None else self.claims_dir / f"ns-{name}"

    def _claim(self, name: str) -> None:
        path = self._claim_path(name)
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def _claimed(self, name: str) -> bool:
        path = self._claim_path(name)
        return path is not None and path.exists()

    def _unclaim(self, name: str) -> None:
        path = self._claim_path(name)
        if path is not None:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    async def namespace_owned(self, name: str) -> bool:
        if not self.namespace_exists(name):
            return False
        if self._claimed(name):
            return True
        sock = await self.ns_socket(name)
        lo = await self._link(sock, "lo")
        return lo is not None and lo.alias == alias_for(f"ns/{name}")

    async def remove_namespace(self, ns: I.Namespace) -> list[str]:
        if not self.namespace_exists(ns.name):
            await self.forget_namespace(ns.name)
            return []
        if not await self.namespace_owned(ns.name):
            await self.forget_namespace(ns.name)
            return [f"left namespace {ns.name} in place: netagent did not make it"]
        await self.forget_namespace(ns.name)
        await _run(["ip", "netns", "del", ns.name])
        return [f"deleted namespace {ns.name}"]

    # ---- lookups --------------------------------------------------------------------
    async def _link(self, sock: Any, name: str) -> Link | None:
        try:
            msgs = await sock.link("get", ifname=name)
        except NetlinkError as exc:
            if exc.code == errno.ENODEV:
                return None
            raise
        finally:
            _drain(sock)
        return Link.from_msg(msgs[0]) if msgs else None

    async def existing(self, ns: str | None, ifname: str) -> Link | None:
        """The interface ``ifname`` in the host (None) or in namespace ``ns``, if any."""
        if ns is not None and not self.namespace_exists(ns):
            return None
        if ns is None and ifindex(ifname) is None:
            return None  # the common case, without a netlink round trip
        return await self._link(await self._sock(ns), ifname)

    async def links(self, ns: str | None = None) -> list[Link]:
        sock = await self._sock(ns)
        return [Link.from_msg(m) async for m in await sock.link("dump")]

    async def _addresses(self, sock: Any, index: int) -> set[I.IPInterface]:
        result: set[I.IPInterface] = set()
        async for m in await sock.addr("dump", index=index):
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

    async def _default_routes(self, sock: Any, family: int) -> list[tuple[str | None, int | None]]:
        routes = []
        async for m in await sock.route("dump", family=family):
            table = m.get_attr("RTA_TABLE") or m["table"]
            if m["dst_len"] != 0 or table != 254:
                continue
            routes.append((m.get_attr("RTA_GATEWAY"), m.get_attr("RTA_OIF")))
        return routes

    async def _ensure_addresses(
        self,
        sock: Any,
        link: Link,
        want: tuple[I.IPInterface, ...],
        where: str,
        acts: Actions,
    ) -> None:
        have = await self._addresses(sock, link.index)
        for addr in want:
            if addr in have:
                continue
            if acts.add(f"add {addr} to {where}"):
                await _add_address(sock, link.index, addr)

    async def _remove_addresses(
        self, sock: Any, link: Link, gone: tuple[I.IPInterface, ...], where: str, acts: Actions
    ) -> None:
        have = await self._addresses(sock, link.index)
        for addr in gone:
            if addr in have and acts.add(f"remove {addr} from {where}"):
                with contextlib.suppress(NetlinkError):
                    await sock.addr(
                        "del",
                        index=link.index,
                        address=str(addr.ip),
                        prefixlen=addr.network.prefixlen,
                        family=_addr_family(addr),
                    )

    # ---- bridges --------------------------------------------------------------------
    async def ensure_bridge(
        self, br: I.Bridge, old: I.Bridge | None = None, dry_run: bool = False
    ) -> list[str]:
        acts = Actions(dry_run)
        created = False
        link = await self._link(self.ipr, br.name)
        if link is not None and link.kind != "bridge":
            raise BackendFailed(
                f"{br.name} exists and is a {link.kind or 'plain'} interface, not a bridge; "
                "netagent leaves it alone: remove it or pick another name"
            )
        if link is None:
            if not acts.add(f"create bridge {br.name}"):
                acts.add(f"set {br.name} up")
                acts.done.extend(f"add {a} to {br.name}" for a in br.addresses)
                return acts.done
            await self.ipr.link(
                "add", ifname=br.name, kind="bridge", state="up", group=NETAGENT_GROUP
            )
            created = True
            link = await self._link(self.ipr, br.name)
            assert link is not None
        if link.alias != alias_for(br.key):
            if not created and not link.belongs_to(br.key):
                raise BackendFailed(
                    f"{br.name} exists and was not made by netagent; it is left alone: "
                    "pick another name"
                )
            if acts.add(f"mark {br.name} as netagent's"):
                await self.ipr.link("set", index=link.index, ifalias=alias_for(br.key))
        if not link.up and acts.add(f"set {br.name} up"):
            await self.ipr.link("set", index=link.index, state="up")
        await self._ensure_addresses(self.ipr, link, br.addresses, br.name, acts)
        if old is not None:
            stale = tuple(a for a in old.addresses if a not in br.addresses)
            await self._remove_addresses(self.ipr, link, stale, br.name, acts)
        if any(a.version == 4 for a in br.addresses) and not dry_run:
            # traffic from the host to 127.0.0.1:PORT is DNATed to the bridge's subnet;
            # the kernel routes it only with route_localnet on the way out
            _write_sysctl(f"net/ipv4/conf/{br.name}/route_localnet", "1")
        return acts.done

    async def remove_bridge(self, br: I.Bridge) -> list[str]:
        link = await self._link(self.ipr, br.name)
        if link is None:
            return []
        if not link.belongs_to(br.key):
            return [f"left {br.name} in place: netagent did not make it"]
        await self._del_link(self.ipr, link.index)
        return [f"deleted bridge {br.name}"]

    async def _del_link(self, sock: Any, index: int) -> None:
        try:
            await sock.link("del", index=index)
        except NetlinkError as exc:
            if exc.code != errno.ENODEV:
                raise

    # ---- plugs ----------------------------------------------------------------------
    async def ensure_plug(self, plug: I.Plug, br: I.Bridge, dry_run: bool = False) -> list[str]:
        acts = Actions(dry_run)
        if not self.namespace_exists(plug.ns):
            raise BackendFailed(f"namespace {plug.ns} does not exist")
        ns_sock = await self.ns_socket(plug.ns)
        # the daemon lives in the host namespace: if_nametoindex is one cheap ioctl, where a
        # netlink "get" costs ~0.7 ms of pyroute2 parsing; full link info is read only
        # when the pair exists and has to be checked
        bridge_index = ifindex(plug.bridge)
        host_index = ifindex(plug.host_ifname)
        host = None if host_index is None else await self._link(self.ipr, plug.host_ifname)
        inner = await self._link(ns_sock, plug.ifname)
        if bridge_index is None:
            if dry_run:
                acts.add(f"create veth {plug.host_ifname} <-> {plug.ns}:{plug.ifname}")
                return acts.done
            raise BackendFailed(f"bridge {plug.bridge} does not exist")
        for link, where in ((host, plug.host_ifname), (inner, f"{plug.ns}:{plug.ifname}")):
            if link is not None and not link.belongs_to(plug.key):
                # never take over, change or delete an interface netagent did not make
                owner = link.owner_key or "not made by netagent"
                raise BackendFailed(
                    f"{where} exists and is not this plug's ({owner}); netagent leaves it "
                    "alone: remove it, or plug with another --ifname"
                )
        broken = (host is None) != (inner is None) or (
            host is not None and inner is not None and host.link_netnsid is None
        )
        if broken:
            # half a pair (or a pair not joining the two): rebuild it whole
            if host is not None and acts.add(f"delete stray {plug.host_ifname}"):
                await self._del_link(self.ipr, host.index)
            if inner is not None and acts.add(f"delete stray {plug.ns}:{plug.ifname}"):
                await self._del_link(ns_sock, inner.index)
            host = inner = None
        if host is None:
            if not acts.add(f"create veth {plug.host_ifname} <-> {plug.ns}:{plug.ifname}"):
                acts.add(f"address {plug.ns}:{plug.ifname}")
                return acts.done
            await self._create_plug(plug, br, bridge_index, ns_sock, acts)
            return acts.done
        assert inner is not None
        for link, sock in ((host, self.ipr), (inner, ns_sock)):
            if link.alias != alias_for(plug.key) and acts.add(f"mark {link.name}"):
                await sock.link("set", index=link.index, ifalias=alias_for(plug.key))
        if host.master != bridge_index and acts.add(f"enslave {plug.host_ifname} to {plug.bridge}"):
            await self.ipr.link("set", index=host.index, master=bridge_index)
        if not host.up and acts.add(f"set {plug.host_ifname} up"):
            await self.ipr.link("set", index=host.index, state="up")
        await self._ensure_addresses(
            ns_sock, inner, plug.addresses, f"{plug.ns}:{plug.ifname}", acts
        )
        if not inner.up and acts.add(f"set {plug.ns}:{plug.ifname} up"):
            await ns_sock.link("set", index=inner.index, state="up")
        lo = await self._link(ns_sock, "lo")
        if lo is not None and not lo.up and acts.add(f"set lo up in {plug.ns}"):
            await ns_sock.link("set", index=lo.index, state="up")
        for addr in plug.addresses:
            gw = br.gateway(addr.version)
            if gw is not None:
                await self._ensure_default_route(ns_sock, inner, gw, plug.ns, acts)
        return acts.done

    async def _create_plug(
        self, plug: I.Plug, br: I.Bridge, bridge_index: int, ns_sock: Any, acts: Actions
    ) -> None:
        """The fresh path: everything about the new pair is known, so nothing is observed
        but the two indexes, and independent requests go out together (``plug`` is on
        the hot path of every container start)."""
        await self.ipr.link(
            "add",
            ifname=plug.host_ifname,
            kind="veth",
            master=bridge_index,
            state="up",
            group=NETAGENT_GROUP,
            peer={
                "ifname": plug.ifname,
                "net_ns_fd": str(self.netns_dir / plug.ns),
                "group": NETAGENT_GROUP,
            },
        )
        host_index = ifindex(plug.host_ifname)
        inner = await self._link(ns_sock, plug.ifname)
        if host_index is None or inner is None:
            raise BackendFailed(f"veth {plug.host_ifname} vanished right after creation")
        where = f"{plug.ns}:{plug.ifname}"
        await _gather(
            self.ipr.link("set", index=host_index, ifalias=alias_for(plug.key)),
            ns_sock.link("set", index=inner.index, ifalias=alias_for(plug.key), state="up"),
            # lo is index 1 in every namespace; setting it up again is a no-op
            ns_sock.link("set", index=1, state="up"),
        )
        acts.add(f"mark {plug.host_ifname} and {where}, set {where} up")
        for addr in plug.addresses:
            acts.add(f"add {addr} to {where}")
            await _add_address(ns_sock, inner.index, addr)
        for addr in plug.addresses:
            gw = br.gateway(addr.version)
            if gw is None:
                continue
            try:
                await ns_sock.route(
                    "add",
                    dst="default" if gw.version == 4 else "::/0",
                    gateway=str(gw.ip),
                    oif=inner.index,
                    family=_addr_family(gw),
                    proto=RTPROT_NETAGENT,
                )
                acts.add(f"route default via {gw.ip} in {plug.ns}")
            except NetlinkError as exc:
                if exc.code != errno.EEXIST:
                    raise
                acts.done.append(f"kept the default route already in {plug.ns}")

    async def _ensure_default_route(
        self, sock: Any, link: Link, gw: I.IPInterface, ns: str, acts: Actions
    ) -> None:
        family = _addr_family(gw)
        if await self._default_routes(sock, family):
            # one default route per IP version: a namespace plugged into two bridges
            # routes through the first; a route someone else set stays theirs
            return
        if acts.add(f"route default via {gw.ip} in {ns}"):
            try:
                await sock.route(
                    "add",
                    dst="default" if gw.version == 4 else "::/0",
                    gateway=str(gw.ip),
                    oif=link.index,
                    family=family,
                    proto=RTPROT_NETAGENT,
                )
            except NetlinkError as exc:
                if exc.code != errno.EEXIST:
                    raise

    async def remove_plug(self, plug: I.Plug) -> list[str]:
        host = await self._link(self.ipr, plug.host_ifname)
        done = []
        if host is not None and host.belongs_to(plug.key):
            await self._del_link(self.ipr, host.index)
            done.append(f"deleted veth {plug.host_ifname}")
        if self.namespace_exists(plug.ns):
            sock = await self.ns_socket(plug.ns)
            inner = await self._link(sock, plug.ifname)
            if inner is not None and inner.belongs_to(plug.key):
                await self._del_link(sock, inner.index)
                done.append(f"deleted {plug.ns}:{plug.ifname}")
        return done

    # ---- wires ----------------------------------------------------------------------
    async def ensure_wire(self, wire: I.Wire, dry_run: bool = False) -> list[str]:
        acts = Actions(dry_run)
        for ns in (wire.ns_a, wire.ns_b):
            if not self.namespace_exists(ns):
                raise BackendFailed(f"namespace {ns} does not exist")
        sock_a = await self.ns_socket(wire.ns_a)
        sock_b = await self.ns_socket(wire.ns_b)
        a = await self._link(sock_a, wire.ifname_a)
        b = await self._link(sock_b, wire.ifname_b)
        for link, ns in ((a, wire.ns_a), (b, wire.ns_b)):
            if link is not None and not link.belongs_to(wire.key):
                owner = link.owner_key or "not made by netagent"
                raise BackendFailed(
                    f"{ns}:{link.name} exists and is not this wire's ({owner}); netagent "
                    "leaves it alone: remove it first"
                )
        if (a is None) != (b is None):
            if a is not None and acts.add(f"delete stray {wire.ns_a}:{wire.ifname_a}"):
                await self._del_link(sock_a, a.index)
            if b is not None and acts.add(f"delete stray {wire.ns_b}:{wire.ifname_b}"):
                await self._del_link(sock_b, b.index)
            a = b = None
        if a is None:
            what = f"create veth {wire.ns_a}:{wire.ifname_a} <-> {wire.ns_b}:{wire.ifname_b}"
            if not acts.add(what):
                return acts.done
            await self.ipr.link(
                "add",
                ifname=wire.ifname_a,
                kind="veth",
                net_ns_fd=str(self.netns_dir / wire.ns_a),
                group=NETAGENT_GROUP,
                peer={
                    "ifname": wire.ifname_b,
                    "net_ns_fd": str(self.netns_dir / wire.ns_b),
                    "group": NETAGENT_GROUP,
                },
            )
            a = await self._link(sock_a, wire.ifname_a)
            b = await self._link(sock_b, wire.ifname_b)
            if a is None or b is None:
                raise BackendFailed("wire vanished right after creation")
        assert b is not None
        for sock, link, ns, addrs in (
            (sock_a, a, wire.ns_a, wire.addresses_a),
            (sock_b, b, wire.ns_b, wire.addresses_b),
        ):
            where = f"{ns}:{link.name}"
            if link.alias != alias_for(wire.key) and acts.add(f"mark {where}"):
                await sock.link("set", index=link.index, ifalias=alias_for(wire.key))
            await self._ensure_addresses(sock, link, addrs, where, acts)
            if not link.up and acts.add(f"set {where} up"):
                await sock.link("set", index=link.index, state="up")
            lo = await self._link(sock, "lo")
            if lo is not None and not lo.up and acts.add(f"set lo up in {ns}"):
                await sock.link("set", index=lo.index, state="up")
        return acts.done

    async def remove_wire(self, wire: I.Wire) -> list[str]:
        done = []
        for ns, name in ((wire.ns_a, wire.ifname_a), (wire.ns_b, wire.ifname_b)):
            if not self.namespace_exists(ns):
                continue
            sock = await self.ns_socket(ns)
            link = await self._link(sock, name)
            if link is not None and link.belongs_to(wire.key):
                await self._del_link(sock, link.index)
                done.append(f"deleted {ns}:{name}")
        return done

    # ---- attach ---------------------------------------------------------------------
    async def enslave(self, index: int, bridge_index: int) -> None:
        """Attach-rule fast path: one raw RTM_NEWLINK (see ``rtnl``)."""
        assert self.raw is not None
        await self.raw.set_master_up(index, bridge_index)

    # ---- what the kernel has (ctl links / neigh / routes) ---------------------------
    async def show_links(self, ns: str | None) -> list[dict[str, Any]]:
        sock = await self._sock(ns)
        links = [Link.from_msg(m) async for m in await sock.link("dump")]
        names = {lk.index: lk.name for lk in links}
        addrs: dict[int, list[str]] = {}
        async for m in await sock.addr("dump"):
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

    async def show_neigh(self, ns: str | None) -> list[dict[str, Any]]:
        sock = await self._sock(ns)
        names = {
            lk.index: lk.name for lk in [Link.from_msg(m) async for m in await sock.link("dump")]
        }
        result = []
        async for m in await sock.neigh("dump"):
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

    async def show_routes(self, ns: str | None) -> list[dict[str, Any]]:
        sock = await self._sock(ns)
        names = {
            lk.index: lk.name for lk in [Link.from_msg(m) async for m in await sock.link("dump")]
        }
        result = []
        for family in (socket.AF_INET, socket.AF_INET6):
            async for m in await sock.route("dump", family=family):
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


IFA_F_NODAD = 0x02


async def _add_address(sock: Any, index: int, addr: I.IPInterface) -> None:
    """Add an address; one already there is fine. IPv6 addresses skip duplicate address
    detection (IFA_F_NODAD): netagent refuses duplicates on a segment itself, and DAD
    would leave a new address unusable ("tentative") for a second or two."""
    try:
        await sock.addr(
            "add",
            index=index,
            address=str(addr.ip),
            prefixlen=addr.network.prefixlen,
            family=_addr_family(addr),
            flags=IFA_F_NODAD if addr.version == 6 else 0,
        )
    except NetlinkError as exc:
        if exc.code != errno.EEXIST:
            raise


def ifindex(name: str) -> int | None:
    """The index of an interface in the daemon's own namespace, or None."""
    try:
        return socket.if_nametoindex(name)
    except OSError:
        return None


async def _gather(*aws: Awaitable[T]) -> list[T]:
    """Run independent netlink requests at once (each has its own sequence number)."""
    results: list[Any] = [None] * len(aws)

    async def one(i: int, aw: Awaitable[T]) -> None:
        results[i] = await aw

    async with anyio.create_task_group() as tg:
        for i, aw in enumerate(aws):
            tg.start_soon(one, i, aw)
    return results


def _write_sysctl(path: str, value: str) -> None:
    """Write /proc/sys/PATH. /proc/sys/net belongs to the writer's network namespace, so
    the daemon in a sandbox changes only the sandbox."""
    try:
        Path("/proc/sys", path).write_text(value)
    except OSError as exc:
        raise BackendFailed(f"cannot set {path.replace('/', '.')}={value}: {exc}") from None


def read_sysctl(path: str) -> str | None:
    try:
        return Path("/proc/sys", path).read_text().strip()
    except OSError:
        return None


def ensure_forwarding(v4: bool, v6: bool) -> list[str]:
    done = []
    if v4 and read_sysctl("net/ipv4/ip_forward") != "1":
        _write_sysctl("net/ipv4/ip_forward", "1")
        done.append("enabled net.ipv4.ip_forward")
    if v6 and read_sysctl("net/ipv6/conf/all/forwarding") != "1":
        _write_sysctl("net/ipv6/conf/all/forwarding", "1")
        done.append("enabled net.ipv6.conf.all.forwarding")
    return done


async def _run(argv: list[str]) -> None:
    """Run a tool (never through a shell); raise BackendFailed with its stderr."""
    result = await anyio.run_process(
        argv,
        check=False,
        env={"LANG": "C", "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")},
    )
    if result.returncode != 0:
        msg = result.stderr.decode(errors="replace").strip() or f"exit status {result.returncode}"
        raise BackendFailed(f"{' '.join(argv)}: {msg}")
