"""The daemon: load state, reconcile, then serve requests on the Unix socket.

Start-up order: load and replay the persisted state, open the backends, remove the rules
of a different firewall backend that wrote them last, run a full reconcile pass, start
listening to kernel events, and only then accept requests (and tell systemd READY=1).
SIGTERM stops serving and exits; the data plane (links, rules) stays as it is.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import grp
import os
import pwd
import signal
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import structlog
from anyio.abc import SocketAttribute, SocketStream
from anyio.streams.buffered import BufferedByteReceiveStream

from netagent.backends import firewall as fwreg
from netagent.backends.netlink import NetlinkBackend

from . import intents as I
from . import protocol, sdnotify
from .bus import EventBus
from .config import Config
from .errors import (
    BackendFailed,
    BadRequest,
    Internal,
    InvalidArgument,
    NameTaken,
    NetagentError,
    NotFound,
    PermissionDenied,
    ReadOnly,
    RequestTimeout,
    RequestTooLarge,
    UnknownOp,
)
from .events import EventSource
from .fwwatch import watch_firewall
from .reconcile import FIREWALL_KEY, Reconciler
from .state import Change, DesiredState
from .store import StateStore

log = structlog.get_logger("netagent")

Handler = Callable[[dict[str, Any]], Awaitable[Any]]
MAX_LISTED = 200


@dataclass(frozen=True)
class Peer:
    pid: int
    uid: int
    gid: int
    access: str  # "rw" | "ro"


# ---- argument helpers --------------------------------------------------------------
def _arg(args: dict[str, Any], name: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
    if name not in args or args[name] is None:
        if default is ...:
            raise BadRequest(f"missing argument {name!r}")
        return default
    value = args[name]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        want = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise InvalidArgument(f"argument {name!r} must be {want}, got {type(value).__name__}")
    return value


def _addresses(args: dict[str, Any], name: str, required: bool) -> tuple[I.IPInterface, ...]:
    value = args.get(name)
    if value is None or value == []:
        if required:
            raise InvalidArgument(f"give an address in CIDR form ({name}), e.g. 192.168.15.1/24")
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InvalidArgument(f"argument {name!r} must be a CIDR or a list of CIDRs")
    result = tuple(I.parse_interface(v) for v in value)
    versions = [a.version for a in result]
    if len(set(versions)) != len(versions):
        raise InvalidArgument("give at most one IPv4 and one IPv6 address")
    return result


def _ports(args: dict[str, Any]) -> tuple[int, int]:
    value = args.get("host_ports", args.get("host_port"))
    if value is None:
        raise BadRequest("missing argument 'host_ports'")
    if not isinstance(value, (str, int)) or isinstance(value, bool):
        raise InvalidArgument("host_ports must be a port or a range like 8000-8009")
    lo, hi = I.parse_port_range(value, "host port")
    return lo, hi - lo + 1


def _proto(args: dict[str, Any]) -> I.Proto:
    return I.parse_proto(args.get("proto", "tcp"))


def _host_ip(args: dict[str, Any]) -> I.IPAddress | None:
    value = args.get("host_ip")
    return None if value is None else I.parse_ip(value, "--host-ip")


class Agent:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.started = time.time()
        self.bus = EventBus()
        self.links = NetlinkBackend(claims_dir=Path(config.state_dir) / "claims")
        self.desired = DesiredState(external_namespace=self.links.namespace_exists)
        self.store = StateStore(Path(config.state_dir))
        self.firewall: fwreg.AnyBackend | None = None
        self.firewall_why = ""
        self.rec: Reconciler | None = None
        self.events: EventSource | None = None
        self.server: Server | None = None
        self.requests = 0
        self.ops: dict[str, tuple[Handler, bool]] = {
            "status": (self.op_status, False),
            "ns.add": (self.op_ns_add, True),
            "ns.del": (self.op_ns_del, True),
            "ns.list": (self.op_ns_list, False),
            "bridge.add": (self.op_bridge_add, True),
            "bridge.del": (self.op_bridge_del, True),
            "bridge.list": (self.op_bridge_list, False),
            "plug.add": (self.op_plug_add, True),
            "plug.del": (self.op_plug_del, True),
            "wire.add": (self.op_wire_add, True),
            "wire.del": (self.op_wire_del, True),
            "fwd.add": (self.op_fwd_add, True),
            "fwd.del": (self.op_fwd_del, True),
            "fwd.list": (self.op_fwd_list, False),
            "rule.add": (self.op_rule_add, True),
            "rule.del": (self.op_rule_del, True),
            "rule.list": (self.op_rule_list, False),
            "apply": (self.op_apply, True),
            "purge": (self.op_purge, True),
            "show": (self.op_show, False),
            "links": (self.op_links, False),
            "neigh": (self.op_neigh, False),
            "routes": (self.op_routes, False),
        }

    # ---- start-up -------------------------------------------------------------------
    async def start(self) -> None:
        t0 = time.perf_counter()
        self.desired.load_changes(self.store.load())
        await self.links.start()
        cls, why = fwreg.choose_backend(self.config.firewall)
        self.firewall = cls()
        self.firewall_why = why
        log.info("firewall backend chosen", backend=cls.name, why=why)
        await self._retire_other_firewall(cls.name)
        self.rec = Reconciler(
            self.desired, self.links, self.firewall, self.bus, self.config.resync_interval
        )
        await self.rec.full_pass("start")
        self.rec.full_requested = False
        log.info(
            "state loaded and reconciled",
            intents=len(self.desired.intents),
            duration_ms=round((time.perf_counter() - t0) * 1000, 1),
        )

    async def _retire_other_firewall(self, current: str) -> None:
        """Starting with another backend than the one that wrote the rules: remove the
        old backend's rules first, so no forward is installed twice."""
        marker = Path(self.config.state_dir) / "firewall-backend"
        previous = marker.read_text().strip() if marker.exists() else None
        if previous and previous != current:
            try:
                old = fwreg.get_backend(previous)()
                removed = await old.purge()
                log.info(
                    "removed the previous firewall backend's rules",
                    backend=previous,
                    removed=removed,
                )
                self.bus.publish("firewall-switched", f"removed {previous} rules; now {current}")
            except NetagentError as exc:
                log.warning(
                    "could not remove the previous backend's rules",
                    backend=previous,
                    error=exc.message,
                )
        if previous != current:
            tmp = marker.with_name(marker.name + ".tmp")
            tmp.write_text(current + "\n")
            os.replace(tmp, marker)

    def summary(self) -> str:
        counts: dict[str, int] = {}
        for i in self.desired.intents.values():
            counts[i.kind] = counts.get(i.kind, 0) + 1
        errors = sum(1 for s in (self.rec.status.values() if self.rec else []) if s.error)
        parts = [
            f"{counts.get(k, 0)} {n}"
            for k, n in (
                ("ns", "namespaces"),
                ("br", "bridges"),
                ("plug", "plugs"),
                ("fwd", "forwards"),
            )
        ]
        return ", ".join(parts) + (f", {errors} failing" if errors else "")

    # ---- request dispatch -----------------------------------------------------------
    async def handle(self, op: str, args: dict[str, Any], peer: Peer) -> Any:
        entry = self.ops.get(op)
        if entry is None:
            raise UnknownOp(f"unknown op {op!r}; known: {', '.join(sorted(self.ops))}")
        handler, mutating = entry
        if mutating and peer.access != "rw":
            raise ReadOnly(f"uid {peer.uid} may only look; {op} changes state")
        return await handler(args)

    async def _refuse_foreign(self, changes: list[Change]) -> None:
        """A new intent must not name what exists and is not netagent's: a namespace,
        bridge or interface someone else made is never taken over."""
        for c in changes:
            if c.old is not None or c.new is None:
                continue
            intent = c.new
            if isinstance(intent, I.Namespace):
                if self.links.namespace_exists(
                    intent.name
                ) and not await self.links.namespace_owned(intent.name):
                    raise NameTaken(
                        f"namespace {intent.name} exists and was not made by netagent; "
                        "netagent will not take it over: plug it as it is (no `ns add` "
                        "needed), or pick another name"
                    )
                continue
            names: list[tuple[str | None, str]] = []
            if isinstance(intent, I.Bridge):
                names = [(None, intent.name)]
            elif isinstance(intent, I.Plug):
                names = [(None, intent.host_ifname), (intent.ns, intent.ifname)]
            elif isinstance(intent, I.Wire):
                names = [(intent.ns_a, intent.ifname_a), (intent.ns_b, intent.ifname_b)]
            for ns, ifname in names:
                link = await self.links.existing(ns, ifname)
                if link is not None and not link.belongs_to(intent.key):
                    where = f"{ns}:{ifname}" if ns else ifname
                    raise NameTaken(
                        f"{where} exists and was not made by netagent for this; it is left "
                        "alone: remove it, or choose another name"
                        + (" (--ifname)" if isinstance(intent, I.Plug) else "")
                    )

    async def mutate(self, fn: Callable[[], list[Change]]) -> dict[str, Any]:
        """Validate and record a change, persist it, realize it; then answer."""
        assert self.rec is not None
        async with self.rec.lock:
            with self.desired.transaction() as changes:
                fn()
                await self._refuse_foreign(changes)
                # inside the transaction: if the journal cannot take it (disk full), the
                # change is undone in memory too, and the request fails unacknowledged
                self.store.append(changes)
            if changes and self.store.needs_compaction():
                try:
                    self.store.compact(self.desired.to_wire())
                except OSError as exc:  # the journal holds it all: compaction can wait
                    log.warning("state compaction failed; will retry", error=str(exc))
            result = await self.rec.realize(changes) if changes else None
        reply: dict[str, Any] = {
            "changed": bool(changes),
            # a 10,000-intent apply answers with the first ones and the count
            "changes": [c.to_wire() for c in changes[:MAX_LISTED]],
            "changes_total": len(changes),
        }
        if result is not None:
            reply["actions"] = result.actions
            if result.errors:
                first_key, first = next(iter(result.errors.items()))
                raise BackendFailed(
                    f"recorded, but not in place yet: {first_key}: {first}; netagent keeps "
                    "retrying (see `netagent ctl show`), or undo the request",
                    errors=result.errors,
                )
        return reply

    # ---- ops ------------------------------------------------------------------------
    async def op_status(self, args: dict[str, Any]) -> Any:
        from netagent import __version__

        assert self.rec is not None and self.firewall is not None
        failing = {k: s.error for k, s in self.rec.status.items() if s.error}
        return {
            "version": __version__,
            "pid": os.getpid(),
            "uptime_s": round(time.time() - self.started, 1),
            "socket": self.config.socket,
            "state_dir": self.config.state_dir,
            "firewall": self.firewall.name,
            "summary": self.summary(),
            "intents": len(self.desired.intents),
            "requests": self.requests,
            "passes": self.rec.passes,
            "last_pass": self.rec.last_pass,
            "failing": failing,
            "event_resyncs": self.events.resyncs if self.events else 0,
            # the server counts these; status is where an operator sees them
            "clients": self.server.clients if self.server else 0,
            "refused": self.server.refused if self.server else 0,
            "timeouts": self.server.timeouts if self.server else 0,
        }

    async def op_ns_add(self, args: dict[str, Any]) -> Any:
        name = _arg(args, "name", str)
        return await self.mutate(lambda: self.desired.add_namespace(name))

    async def op_ns_del(self, args: dict[str, Any]) -> Any:
        name = _arg(args, "name", str)
        return await self.mutate(lambda: self.desired.del_namespace(name))

    async def op_ns_list(self, args: dict[str, Any]) -> Any:
        managed = {n.name for n in self.desired.of_kind(I.Namespace)}
        present = set(self.links.list_namespaces())
        return [
            {"name": n, "managed": n in managed, "present": n in present}
            for n in sorted(managed | present)
        ]

    async def op_bridge_add(self, args: dict[str, Any]) -> Any:
        name = _arg(args, "name", str)
        addrs = _addresses(args, "addresses", required=False)
        masq = _arg(args, "masquerade", bool, False)
        return await self.mutate(lambda: self.desired.add_bridge(name, addrs, masq))

    async def op_bridge_del(self, args: dict[str, Any]) -> Any:
        name = _arg(args, "name", str)
        return await self.mutate(lambda: self.desired.del_bridge(name))

    async def op_bridge_list(self, args: dict[str, Any]) -> Any:
        return [
            {**b.to_dict(), "plugs": [p.ns for p in self.desired.plugs_on(b.name)]}
            for b in sorted(self.desired.of_kind(I.Bridge), key=lambda b: b.name)
        ]

    async def op_plug_add(self, args: dict[str, Any]) -> Any:
        ns = _arg(args, "ns", str)
        bridge = _arg(args, "bridge", str)
        addrs = _addresses(args, "addresses", required=True)
        ifname = _arg(args, "ifname", str, None)
        return await self.mutate(lambda: self.desired.add_plug(ns, bridge, addrs, ifname))

    async def op_plug_del(self, args: dict[str, Any]) -> Any:
        ns = _arg(args, "ns", str)
        bridge = _arg(args, "bridge", str)
        return await self.mutate(lambda: self.desired.del_plug(ns, bridge))

    async def op_wire_add(self, args: dict[str, Any]) -> Any:
        ns_a = _arg(args, "ns_a", str)
        ns_b = _arg(args, "ns_b", str)
        a = _addresses(args, "addresses_a", required=True)
        b = _addresses(args, "addresses_b", required=True)
        return await self.mutate(lambda: self.desired.add_wire(ns_a, a, ns_b, b))

    async def op_wire_del(self, args: dict[str, Any]) -> Any:
        ns_a = _arg(args, "ns_a", str)
        ns_b = _arg(args, "ns_b", str)
        return await self.mutate(lambda: self.desired.del_wire(ns_a, ns_b))

    async def op_fwd_add(self, args: dict[str, Any]) -> Any:
        lo, count = _ports(args)
        dest = _arg(args, "destination", str)
        fwd = I.make_forward(I.port_spec(lo, count), dest, _proto(args), args.get("host_ip"))
        return await self.mutate(lambda: self.desired.add_forward(fwd))

    async def op_fwd_del(self, args: dict[str, Any]) -> Any:
        lo, count = _ports(args)
        proto, host_ip = _proto(args), _host_ip(args)
        return await self.mutate(lambda: self.desired.del_forward(proto, lo, count, host_ip))

    async def op_fwd_list(self, args: dict[str, Any]) -> Any:
        fwds = sorted(self.desired.of_kind(I.Forward), key=lambda f: (f.proto, f.host_port))
        return [
            {**f.to_dict(), "key": f.key, "host_ports": f.port_spec, "destination": f.destination()}
            for f in fwds
        ]

    async def op_rule_add(self, args: dict[str, Any]) -> Any:
        pattern = _arg(args, "pattern", str)
        bridge = _arg(args, "bridge", str)
        return await self.mutate(lambda: self.desired.add_rule(pattern, bridge))

    async def op_rule_del(self, args: dict[str, Any]) -> Any:
        pattern = _arg(args, "pattern", str)
        bridge = _arg(args, "bridge", str)
        return await self.mutate(lambda: self.desired.del_rule(pattern, bridge))

    async def op_rule_list(self, args: dict[str, Any]) -> Any:
        return [r.to_dict() for r in self.desired.of_kind(I.AttachRule)]

    async def op_apply(self, args: dict[str, Any]) -> Any:
        """A declarative document of intents: add or update each, in one pass; with
        ``prune`` also remove what the document does not name."""
        items = _arg(args, "intents", list)
        prune = _arg(args, "prune", bool, False)
        parsed = [_parse_apply_item(n, d) for n, d in enumerate(items, 1)]

        def run() -> list[Change]:
            named: set[str] = set()
            order = {k: n for n, k in enumerate(I.KIND_ORDER)}
            for _kind, fn, key in sorted(parsed, key=lambda p: order[p[0]]):
                named.add(key)
                fn(self.desired)
            if prune:
                gone = [i for i in self.desired.intents.values() if i.key not in named]
                for intent in sorted(gone, key=lambda i: -order[i.kind]):
                    self.desired.remove(intent.key)
                self.desired.check_references()
            return []

        return await self.mutate(run)

    async def op_purge(self, args: dict[str, Any]) -> Any:
        """Remove everything netagent made, and forget the desired state."""
        assert self.rec is not None and self.firewall is not None
        async with self.rec.lock:
            with self.desired.transaction() as changes:
                order = {k: n for n, k in enumerate(I.KIND_ORDER)}
                for intent in sorted(self.desired.intents.values(), key=lambda i: -order[i.kind]):
                    self.desired.remove(intent.key)
            self.store.append(changes)
            result = await self.rec.realize(changes)
            removed = await self.firewall.purge()
            self.rec.status.clear()
        return {
            "changed": bool(changes) or bool(removed),
            "changes": [c.to_wire() for c in changes],
            "actions": {**result.actions, **({FIREWALL_KEY: removed} if removed else {})},
            "errors": result.errors,
        }

    async def op_show(self, args: dict[str, Any]) -> Any:
        assert self.rec is not None
        items = []
        for d in self.desired.to_wire():
            intent = I.intent_from_dict(d)
            missing = await self.rec.inspect(intent)
            st = self.rec.status.get(intent.key)
            items.append(
                {
                    "key": intent.key,
                    "kind": intent.kind,
                    "describe": intent.describe(),
                    "in_place": not missing and not (st and st.error),
                    "missing": missing,
                    "error": st.error if st else None,
                    "intent": d,
                }
            )
        fw_status = self.rec.status.get(FIREWALL_KEY)
        assert self.firewall is not None
        observed = await self.firewall.observe()
        pending = self.firewall.plan(self.rec.firewall_spec(), observed)
        for item in items:
            if item["kind"] == "fwd" and pending.touches(str(item["key"])):
                item["in_place"] = False
                item["missing"] = pending.steps
        return {
            "intents": items,
            "firewall": {
                "backend": self.firewall.name,
                "in_place": pending.empty,
                "pending": pending.steps,
                "error": fw_status.error if fw_status else None,
            },
        }

    async def _kernel_view(
        self, args: dict[str, Any], fn: Callable[[str | None], Awaitable[Any]]
    ) -> Any:
        ns = _arg(args, "ns", str, None)
        if ns is not None:
            I.check_name(ns, "namespace name")
            if not self.links.namespace_exists(ns):
                raise NotFound(f"namespace {ns} does not exist; `ns list` shows the namespaces")
        try:
            return await fn(ns)
        finally:
            if ns is not None and self.rec is not None:
                await self.rec.forget_unused(ns)  # looking keeps nothing open

    async def op_links(self, args: dict[str, Any]) -> Any:
        return await self._kernel_view(args, self.links.show_links)

    async def op_neigh(self, args: dict[str, Any]) -> Any:
        return await self._kernel_view(args, self.links.show_neigh)

    async def op_routes(self, args: dict[str, Any]) -> Any:
        return await self._kernel_view(args, self.links.show_routes)


def _parse_apply_item(n: int, d: Any) -> tuple[str, Callable[[DesiredState], Any], str]:
    """One entry of an apply document -> (kind, how to add it, its key)."""
    if not isinstance(d, dict):
        raise InvalidArgument(f"intent #{n}: must be an object")
    kind = d.get("kind")
    try:
        if kind == "ns":
            name = _arg(d, "name", str)
            return kind, lambda s: s.add_namespace(name), f"ns/{name}"
        if kind == "br":
            name = _arg(d, "name", str)
            addrs = _addresses(d, "addresses", required=False) or _addresses(d, "address", False)
            masq = _arg(d, "masquerade", bool, False)
            return kind, lambda s: s.add_bridge(name, addrs, masq), f"br/{name}"
        if kind == "plug":
            ns, br = _arg(d, "ns", str), _arg(d, "bridge", str)
            addrs = _addresses(d, "addresses", required=False) or _addresses(d, "address", True)
            ifname = _arg(d, "ifname", str, None)
            return kind, lambda s: s.add_plug(ns, br, addrs, ifname), f"plug/{ns}/{br}"
        if kind == "wire":
            a, b = _arg(d, "ns_a", str), _arg(d, "ns_b", str)
            aa = _addresses(d, "addresses_a", required=True)
            bb = _addresses(d, "addresses_b", required=True)
            return kind, lambda s: s.add_wire(a, aa, b, bb), I.wire_key(a, b)
        if kind == "rule":
            rule = I.AttachRule(_arg(d, "pattern", str), _arg(d, "bridge", str))
            return kind, lambda s: s.add_rule(rule.pattern, rule.bridge), rule.key
        if kind == "fwd":
            ports = d.get("host_ports", d.get("host_port"))
            fwd = I.make_forward(
                ports if isinstance(ports, (int, str)) else None,
                _arg(d, "destination", str),
                d.get("proto", "tcp"),
                d.get("host_ip"),
            )
            return kind, lambda s: s.add_forward(fwd), fwd.key
    except NetagentError as exc:
        exc.message = f"intent #{n} ({kind}): {exc.message}"
        exc.args = (exc.message,)
        raise
    raise InvalidArgument(
        f"intent #{n}: unknown kind {kind!r}; use ns, br, plug, wire, rule or fwd"
    )


# ---- the socket server ------------------------------------------------------------
SO_PEERCRED_LEN = struct.calcsize("3i")


def _peer_credentials(stream: SocketStream) -> tuple[int, int, int, frozenset[int] | None]:
    """(pid, uid, gid, supplementary groups) of the connected process, from the kernel.

    SO_PEERCRED gives pid, uid and primary gid as of connect(); SO_PEERGROUPS (Linux 4.13)
    the supplementary groups the process really had then, the same credentials the
    socket file's permissions were checked against. Groups are None without it."""
    import errno

    sock = stream.extra(SocketAttribute.raw_socket)  # noqa: S610 - anyio, not Django
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, SO_PEERCRED_LEN)
    pid, uid, gid = struct.unpack("3i", raw)
    so_peergroups = getattr(socket, "SO_PEERGROUPS", 59)  # 59 on every Linux arch
    groups: frozenset[int] | None = None
    for size in (4 * 256, 4 * 65536):  # NGROUPS_MAX is 65536
        try:
            buf = sock.getsockopt(socket.SOL_SOCKET, so_peergroups, size)
        except OSError as exc:
            if exc.errno == errno.ERANGE:
                continue
            break
        groups = frozenset(struct.unpack(f"{len(buf) // 4}I", buf[: len(buf) // 4 * 4]))
        break
    return pid, uid, gid, groups


def _group_gid(name: str | None) -> int | None:
    """The gid of a group given by name (or as a number); None when there is none."""
    if not name:
        return None
    if name.isascii() and name.isdigit():
        return int(name)
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        return None


def _user_gids(uid: int, gid: int, groups: frozenset[int] | None = None) -> set[int]:
    """Every group the peer is in: what SO_PEERGROUPS reported, else the group database."""
    if groups is not None:
        return {gid, *groups}
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        return {gid}
    return set(os.getgrouplist(user, gid))


class Server:
    """The command server: a task per connection, each checked (SO_PEERCRED) and bounded
    in time, so a silent, slow or hostile client holds up nobody but itself."""

    def __init__(self, agent: Agent, config: Config) -> None:
        self.agent = agent
        self.config = config
        self.admin_gid = _group_gid(config.socket_group)
        self.readonly_gid = _group_gid(config.readonly_group)
        for setting, name, gid in (
            ("socket_group", config.socket_group, self.admin_gid),
            ("readonly_group", config.readonly_group, self.readonly_gid),
        ):
            if name and gid is None:
                log.warning(
                    "group does not exist; its would-be members are refused",
                    setting=setting,
                    group=name,
                )
        self.clients = 0
        self.max_clients = self._max_clients()
        self.refused = 0
        self.timeouts = 0

    @staticmethod
    def _max_clients() -> int:
        """Connections served at once: what the fd limit allows, less a reserve for the
        work itself (nft/ip pipes, namespace sockets, the journal)."""
        import resource

        soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft == resource.RLIM_INFINITY:
            return 65536
        return max(16, soft - 128)

    def access_for(self, uid: int, gid: int, groups: frozenset[int] | None = None) -> str | None:
        """ "rw" (root, the daemon's own user, the socket group), "ro" (the read-only
        group) or None (anyone else)."""
        if uid == 0 or uid == os.getuid():
            return "rw"
        gids = _user_gids(uid, gid, groups)
        if self.admin_gid is not None and self.admin_gid in gids:
            return "rw"
        if self.readonly_gid is not None and self.readonly_gid in gids:
            return "ro"
        return None

    async def serve(self, listener: anyio.abc.SocketListener) -> None:
        """Accept connections until cancelled. A failing accept (EMFILE: every fd taken)
        is retried, not raised: anyio's ``serve`` would take the whole daemon down."""
        failing = False
        async with anyio.create_task_group() as tg:
            while True:
                try:
                    stream = await listener.accept()
                except anyio.BrokenResourceError as exc:
                    if not failing:
                        log.warning(
                            "accepting connections fails; retrying",
                            error=str(exc.__cause__ or exc),
                            clients=self.clients,
                        )
                    failing = True
                    await anyio.sleep(0.1)
                    continue
                failing = False
                tg.start_soon(self.serve_connection, stream)

    async def serve_connection(self, stream: SocketStream) -> None:
        self.clients += 1
        try:
            pid, uid, gid, groups = _peer_credentials(stream)
            with structlog.contextvars.bound_contextvars(peer_uid=uid, peer_pid=pid):
                try:
                    await self._serve(stream, pid, uid, gid, groups)
                except* (
                    anyio.BrokenResourceError,
                    anyio.ClosedResourceError,
                    anyio.EndOfStream,
                    ConnectionError,
                ):
                    pass  # the client went away
                except* TimeoutError:
                    self.timeouts += 1
                    log.info(
                        "client did not read its replies in time; disconnected",
                        timeout_s=self.config.client_timeout,
                    )
                except* Exception:
                    log.exception("connection failed")
        except OSError:
            log.exception("cannot read the peer's credentials; connection dropped")
        finally:
            self.clients -= 1
            with contextlib.suppress(Exception):
                await stream.aclose()

    async def _send(self, stream: SocketStream, msg: dict[str, Any]) -> None:
        """A reply; a client that does not read it within client_timeout is dropped."""
        with anyio.fail_after(self.config.client_timeout):
            await stream.send(protocol.encode(msg))

    async def _send_last(
        self, stream: SocketStream, err: NetagentError, req_id: Any = None
    ) -> None:
        """A last error reply before hanging up: best effort, never waits long."""
        grace = min(1.0, self.config.client_timeout)
        with contextlib.suppress(Exception), anyio.move_on_after(grace):
            await stream.send(protocol.encode(protocol.reply_error(req_id, err)))

    async def _refuse(self, stream: SocketStream, err: NetagentError) -> None:
        """Answer the first request with ``err`` and hang up. The request is read first
        (briefly, at most 64 KiB): closing on a client that is still sending would give
        it EPIPE instead of the reason."""
        req_id: Any = None
        grace = min(1.0, self.config.client_timeout)
        with contextlib.suppress(Exception), anyio.move_on_after(grace):
            line = await BufferedByteReceiveStream(stream).receive_until(b"\n", 1 << 16)
            with contextlib.suppress(Exception):
                req_id = protocol.parse_request(line)[0]
        await self._send_last(stream, err, req_id)

    async def _serve(
        self, stream: SocketStream, pid: int, uid: int, gid: int, groups: frozenset[int] | None
    ) -> None:
        if self.clients > self.max_clients:
            log.warning(
                "too many clients; connection refused",
                clients=self.clients - 1,
                limit=self.max_clients,
            )
            await self._refuse(
                stream,
                Internal(
                    f"netagent is serving {self.clients - 1} clients, its limit; try again shortly"
                ),
            )
            return
        access = self.access_for(uid, gid, groups)
        if access is None:
            self.refused += 1
            log.warning(
                "connection refused: not root and not in an allowed group",
                peer_gid=gid,
                socket_group=self.config.socket_group,
                readonly_group=self.config.readonly_group,
            )
            look = (
                f", or to {self.config.readonly_group!r} to look only"
                if self.config.readonly_group
                else ""
            )
            await self._refuse(
                stream,
                PermissionDenied(
                    f"uid {uid} (pid {pid}) may not use netagent: ask an administrator to add the "
                    f"user to the group {self.config.socket_group!r}{look}"
                ),
            )
            return
        peer = Peer(pid, uid, gid, access)
        reader = BufferedByteReceiveStream(stream)
        while True:
            try:
                with anyio.fail_after(self.config.client_timeout):
                    # +1: a line of exactly MAX_LINE bytes must not trip the limit before
                    # its newline arrives; a longer one that came in the same chunk as
                    # its newline is caught below
                    line = await reader.receive_until(b"\n", protocol.MAX_LINE + 1)
                if len(line) > protocol.MAX_LINE:
                    raise anyio.DelimiterNotFound(protocol.MAX_LINE)
            except anyio.IncompleteRead:
                if reader.buffer.strip():
                    await self._send_last(
                        stream,
                        BadRequest(
                            "the request ended without a newline; end each JSON object with \\n"
                        ),
                    )
                return  # the client hung up
            except anyio.DelimiterNotFound:
                log.info("request too large; disconnected", limit=protocol.MAX_LINE)
                await self._send_last(
                    stream,
                    RequestTooLarge(
                        f"request is over {protocol.MAX_LINE} bytes; send one JSON object per "
                        "line, each smaller than that"
                    ),
                )
                return
            except TimeoutError:
                self.timeouts += 1
                log.info(
                    "no complete request in time; disconnected",
                    timeout_s=self.config.client_timeout,
                    pending_bytes=len(reader.buffer),
                )
                await self._send_last(
                    stream,
                    RequestTimeout(f"no complete request within {self.config.client_timeout:g}s"),
                )
                return
            if not line.strip():
                continue
            if await self._one(stream, line, peer):
                return

    async def _one(self, stream: SocketStream, line: bytes, peer: Peer) -> bool:
        """Answer one request; True when the connection is done (event stream ended)."""
        t0 = time.perf_counter()
        req_id: Any = None
        op = "?"
        try:
            try:
                req_id, op, args = protocol.parse_request(line)
            except RecursionError:  # json's C decoder on deeply nested arrays
                raise BadRequest("request nests too deeply; send a flat JSON object") from None
            self.agent.requests += 1
            if op == "events":
                await self._events(stream, req_id, args)
                return True
            result = await self.agent.handle(op, args, peer)
            reply = protocol.reply_ok(req_id, result)
            log.info(
                "request",
                op=op,
                ok=True,
                changed=result.get("changed") if isinstance(result, dict) else None,
                duration_ms=round((time.perf_counter() - t0) * 1000, 2),
            )
        except NetagentError as exc:
            reply = protocol.reply_error(req_id, exc)
            log.info(
                "request",
                op=op,
                ok=False,
                code=exc.code,
                error=exc.message,
                duration_ms=round((time.perf_counter() - t0) * 1000, 2),
            )
        except Exception as exc:
            log.exception("request failed", op=op)
            reply = protocol.reply_error(req_id, Internal(f"internal error: {exc}"))
        await self._send(stream, reply)
        return False

    async def _events(self, stream: SocketStream, req_id: Any, args: dict[str, Any]) -> None:
        bus = self.agent.bus
        watcher = bus.subscribe()
        watcher.push(
            {
                "ts": time.time(),
                "type": "watching",
                "message": f"watching netagent (pid {os.getpid()})",
            }
        )
        try:
            await self._send(stream, protocol.reply_ok(req_id, {"streaming": True}))
            async with anyio.create_task_group() as tg:

                async def watch_eof() -> None:
                    # the watcher hangs up: stop streaming
                    with contextlib.suppress(Exception):
                        while await stream.receive():
                            pass
                    tg.cancel_scope.cancel()

                tg.start_soon(watch_eof)
                while True:
                    for event in await watcher.next_batch():
                        await self._send(stream, {"v": protocol.VERSION, "event": event})
        finally:
            bus.unsubscribe(watcher)


def _grant_socket_access(path: str, gid: int) -> None:
    """Let a second group (the read-only one) connect to the 0660 socket: a POSIX ACL
    entry ``group:GID:rw-`` (connect(2) needs write permission on a socket file). The mode
    stays 0660; written as the ``system.posix_acl_access`` xattr, so no setfacl needed."""
    undefined = 0xFFFFFFFF
    entries = [  # (tag, perm, id), sorted by tag as the kernel requires
        (0x01, 6, undefined),  # ACL_USER_OBJ rw
        (0x04, 6, undefined),  # ACL_GROUP_OBJ rw
        (0x08, 6, gid),  # ACL_GROUP gid rw
        (0x10, 6, undefined),  # ACL_MASK rw
        (0x20, 0, undefined),  # ACL_OTHER ---
    ]
    acl = struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)
    try:
        os.setxattr(path, "system.posix_acl_access", acl)
    except OSError as exc:
        log.warning(
            "cannot let the read-only group reach the socket (no POSIX ACLs here?); "
            "its members will get 'permission denied'",
            socket=path,
            gid=gid,
            error=exc.strerror,
        )


def _bind_socket(config: Config) -> tuple[socket.socket, Path | None]:
    """The listening socket, and the path to remove at exit (None when systemd owns it).

    Passed in by systemd (LISTEN_FDS, netagent.socket: SocketMode=0660, SocketGroup=) or
    bound here: created 0660 from the start (umask during bind), owner root, group
    ``socket_group``; the read-only group, if any, gets an ACL entry."""
    import stat

    readonly_gid = _group_gid(config.readonly_group)
    admin_gid = _group_gid(config.socket_group)
    passed = sdnotify.listen_fds(unset_environment=True)
    if passed:
        if len(passed) > 1:
            log.warning("systemd passed several sockets; using the first", fds=passed)
        try:
            sock = socket.socket(fileno=passed[0])
        except OSError as exc:
            raise Internal(
                f"fd {passed[0]} from systemd (LISTEN_FDS) is not a socket: {exc.strerror}"
            ) from None
        listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
        if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM or not listening:
            sock.detach()
            raise Internal(
                f"fd {passed[0]} from systemd is not a listening Unix stream "
                "socket; netagent.socket needs ListenStream=/run/netagent/netagent.sock"
            )
        name = sock.getsockname()
        where = name if isinstance(name, str) and name.startswith("/") else None
        if where and readonly_gid is not None and readonly_gid != admin_gid:
            _grant_socket_access(where, readonly_gid)
        if where and where != config.socket:
            log.warning(
                "the socket systemd passed is not the configured one",
                passed=where,
                configured=config.socket,
            )
        log.info("using the socket systemd passed in", fd=passed[0], socket=where or repr(name))
        return sock, None
    path = Path(config.socket)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    try:
        st = path.lstat()
    except FileNotFoundError:
        st = None
    if st is not None:
        if not stat.S_ISSOCK(st.st_mode):
            raise Internal(
                f"{path} exists and is not a socket; remove it or choose another --socket"
            )
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
            raise Internal(f"another netagent is already listening on {path}")
        except (ConnectionRefusedError, FileNotFoundError):
            path.unlink(missing_ok=True)  # left by a daemon that died
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    old_umask = os.umask(0o117)
    try:
        sock.bind(str(path))
    except OSError as exc:
        sock.close()
        raise Internal(f"cannot listen on {path}: {exc.strerror or exc}") from None
    finally:
        os.umask(old_umask)
    try:
        made = path.stat()  # created by this process: owner = its uid, group = its gid
        if admin_gid is not None and made.st_gid != admin_gid:
            # needs CAP_CHOWN unless the daemon is in the group (systemd: Group=netagent)
            try:
                os.chown(path, -1, admin_gid)
            except PermissionError:
                raise Internal(
                    f"cannot give {path} the group {config.socket_group!r}: run "
                    "the daemon with that group (Group=) or CAP_CHOWN"
                ) from None
        os.chmod(path, 0o660)
        if readonly_gid is not None and readonly_gid != admin_gid:
            _grant_socket_access(str(path), readonly_gid)
        sock.listen(1024)
    except BaseException:
        sock.close()
        path.unlink(missing_ok=True)
        raise
    return sock, path


def _lock_state_dir(state_dir: str) -> int:
    """One daemon per state dir: a second one would interleave journal lines.

    A POSIX record lock (lockf), not flock: it belongs to this process only, so the
    children pyroute2 forks to enter namespaces do not inherit it and keep it held after
    ``kill -9``; the kernel drops it the moment the process dies."""
    import fcntl

    directory = Path(state_dir)
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    lock = directory / "lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
        os.close(fd)
        raise Internal(
            f"another netagent (pid {holder or '?'}) is using the state dir "
            f"{directory}; stop it first"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


async def _wait_for_stop_signal() -> int:
    """Wait for SIGTERM or SIGINT sent to *this* process.

    Not ``anyio.open_signal_receiver``: it uses a wakeup fd, which the processes pyroute2
    forks to enter namespaces inherit; pyroute2 ends them with SIGTERM, and the signal
    arrived through the shared fd as if the daemon itself had been told to stop. Here a
    forked child that gets the signal just dies of it.
    """
    loop = asyncio.get_running_loop()
    main_pid = os.getpid()
    stop = anyio.Event()
    received: list[int] = []

    def handler(signum: int, _frame: object) -> None:
        if os.getpid() != main_pid:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        received.append(signum)
        loop.call_soon_threadsafe(stop.set)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        await stop.wait()
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    return received[0]


async def run_daemon(config: Config) -> None:
    """Lock the state dir, take the socket, load and reconcile, then serve; READY=1 goes
    to systemd only once all of that is done.

    The socket is bound before the (possibly long) start-up so a client that comes early
    waits in the backlog instead of being refused, and a second daemon on the same socket
    stops before it touches anything."""
    sdnotify.notify("STATUS=starting: loading state")
    lock_fd = _lock_state_dir(config.state_dir)
    raw, owned = _bind_socket(config)
    agent = Agent(config)
    try:
        try:
            sdnotify.notify("STATUS=starting: loading state and reconciling")
            await agent.start()
        except NetagentError as exc:
            sdnotify.notify(f"STATUS=failed to start: {sdnotify.one_line(exc.message)}")
            raise
        assert agent.rec is not None
        assert agent.firewall is not None
        server = agent.server = Server(agent, config)
        listener = await anyio.abc.SocketListener.from_socket(raw)
        try:
            async with anyio.create_task_group() as tg:
                agent.events = EventSource(agent.rec, agent.links, agent.bus)
                await tg.start(agent.events.run)
                tg.start_soon(agent.rec.run)
                tg.start_soon(agent.events.watch_namespaces)
                tg.start_soon(watch_firewall, agent.rec, agent.firewall, agent.bus)
                tg.start_soon(server.serve, listener)
                gc.freeze()  # what start-up made lives forever: keep it out of GC passes
                sdnotify.notify(f"READY=1\nSTATUS={sdnotify.one_line(agent.summary())}")
                tg.start_soon(sdnotify.watchdog_loop, agent.summary)
                log.info(
                    "netagent ready",
                    socket=config.socket,
                    firewall=agent.firewall_why,
                    max_clients=server.max_clients,
                    watchdog_s=sdnotify.watchdog_interval(),
                )
                signum = await _wait_for_stop_signal()
                log.info(
                    "stopping; links and rules stay in place", signal=signal.Signals(signum).name
                )
                sdnotify.notify("STOPPING=1")
                tg.cancel_scope.cancel()
        finally:
            with contextlib.suppress(Exception):
                await listener.aclose()
    finally:
        raw.close()
        if owned is not None:
            with contextlib.suppress(FileNotFoundError):
                owned.unlink()
        agent.store.close()
        await agent.links.close()
        os.close(lock_fd)
