"""The daemon: load state, reconcile, then serve requests on the Unix socket.

Start-up order: load and replay the persisted state, open the backends, remove the rules
of a different firewall backend that wrote them last, run a full reconcile pass, start
listening to kernel events, and only then accept requests (and tell systemd READY=1).
SIGTERM stops serving and exits; the data plane (links, rules) stays as it is.
"""

from __future__ import annotations

import asyncio
import contextlib
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
    NetagentError,
    NotFound,
    PermissionDenied,
    ReadOnly,
    RequestTimeout,
    RequestTooLarge,
    UnknownOp,
)
from .events import EventSource
from .reconcile import FIREWALL_KEY, Reconciler
from .state import Change, DesiredState
from .store import StateStore

log = structlog.get_logger("netagent")

Handler = Callable[[dict[str, Any]], Awaitable[Any]]


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
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
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
        self.links = NetlinkBackend()
        self.desired = DesiredState(external_namespace=self.links.namespace_exists)
        self.store = StateStore(Path(config.state_dir))
        self.firewall: fwreg.FirewallBackend | None = None
        self.firewall_why = ""
        self.rec: Reconciler | None = None
        self.events: EventSource | None = None
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
        async with self.rec.lock:
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
                log.info("removed the previous firewall backend's rules", backend=previous,
                         removed=removed)
                self.bus.publish("firewall-switched", f"removed {previous} rules; now {current}")
            except NetagentError as exc:
                log.warning("could not remove the previous backend's rules", backend=previous,
                            error=exc.message)
        if previous != current:
            tmp = marker.with_name(marker.name + ".tmp")
            tmp.write_text(current + "\n")
            os.replace(tmp, marker)

    def summary(self) -> str:
        counts: dict[str, int] = {}
        for i in self.desired.intents.values():
            counts[i.kind] = counts.get(i.kind, 0) + 1
        errors = sum(1 for s in (self.rec.status.values() if self.rec else []) if s.error)
        parts = [f"{counts.get(k, 0)} {n}" for k, n in (
            ("ns", "namespaces"), ("br", "bridges"), ("plug", "plugs"), ("fwd", "forwards"))]
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

    async def mutate(self, fn: Callable[[], list[Change]]) -> dict[str, Any]:
        """Validate and record a change, persist it, realize it; then answer."""
        assert self.rec is not None
        async with self.rec.lock:
            with self.desired.transaction() as changes:
                fn()
            if changes:
                self.store.append(changes)
                if self.store.needs_compaction():
                    self.store.compact(self.desired.to_wire())
            result = await self.rec.realize(changes) if changes else None
        reply: dict[str, Any] = {
            "changed": bool(changes),
            "changes": [c.to_wire() for c in changes],
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
            if item["kind"] == "fwd" and pending.full:
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

    async def _kernel_view(self, args: dict[str, Any], fn: Callable[[str | None], Awaitable[Any]]) -> Any:
        ns = _arg(args, "ns", str, None)
        if ns is not None:
            I.check_name(ns, "namespace name")
            if not self.links.namespace_exists(ns):
                raise NotFound(f"namespace {ns} does not exist; `ns list` shows the namespaces")
        return await fn(ns)

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


def _peer_credentials(stream: SocketStream) -> tuple[int, int, int]:
    sock = stream.extra(SocketAttribute.raw_socket)
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, SO_PEERCRED_LEN)
    pid, uid, gid = struct.unpack("3i", raw)
    return pid, uid, gid


def _group_gid(name: str | None) -> int | None:
    if not name:
        return None
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        return None


def _user_gids(uid: int, gid: int) -> set[int]:
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        return {gid}
    return set(os.getgrouplist(user, gid))


class Server:
    def __init__(self, agent: Agent, config: Config) -> None:
        self.agent = agent
        self.config = config
        self.admin_gid = _group_gid(config.socket_group)
        self.readonly_gid = _group_gid(config.readonly_group)
        self.clients = 0

    def access_for(self, uid: int, gid: int) -> str | None:
        if uid == 0 or uid == os.getuid():
            return "rw"
        gids = _user_gids(uid, gid)
        if self.admin_gid is not None and self.admin_gid in gids:
            return "rw"
        if self.readonly_gid is not None and self.readonly_gid in gids:
            return "ro"
        return None

    async def serve_connection(self, stream: SocketStream) -> None:
        self.clients += 1
        try:
            await self._serve(stream)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, anyio.EndOfStream):
            pass
        except Exception:
            log.exception("connection failed")
        finally:
            self.clients -= 1
            with contextlib.suppress(Exception):
                await stream.aclose()

    async def _send(self, stream: SocketStream, msg: dict[str, Any]) -> None:
        with anyio.fail_after(self.config.client_timeout):
            await stream.send(protocol.encode(msg))

    async def _serve(self, stream: SocketStream) -> None:
        pid, uid, gid = _peer_credentials(stream)
        access = self.access_for(uid, gid)
        if access is None:
            log.warning("connection refused", peer_uid=uid, peer_pid=pid)
            err = PermissionDenied(
                f"uid {uid} may not use netagent; ask an administrator to add you to the "
                f"group {self.config.socket_group!r} (or {self.config.readonly_group!r} to look)"
            )
            with contextlib.suppress(Exception):
                await self._send(stream, protocol.reply_error(None, err))
            return
        peer = Peer(pid, uid, gid, access)
        reader = BufferedByteReceiveStream(stream)
        while True:
            try:
                with anyio.fail_after(self.config.client_timeout):
                    line = await reader.receive_until(b"\n", protocol.MAX_LINE)
            except anyio.IncompleteRead:
                return
            except anyio.DelimiterNotFound:
                err = RequestTooLarge(f"request is over {protocol.MAX_LINE} bytes")
                await self._send(stream, protocol.reply_error(None, err))
                return
            except TimeoutError:
                with contextlib.suppress(Exception):
                    await self._send(stream, protocol.reply_error(None, RequestTimeout(
                        f"no complete request within {self.config.client_timeout:g}s")))
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
        bound = structlog.contextvars.bound_contextvars(peer_uid=peer.uid, peer_pid=peer.pid)
        with bound:
            try:
                req_id, op, args = protocol.parse_request(line)
                self.agent.requests += 1
                if op == "events":
                    await self._events(stream, req_id, args)
                    return True
                result = await self.agent.handle(op, args, peer)
                reply = protocol.reply_ok(req_id, result)
                log.info("request", op=op, ok=True,
                         changed=result.get("changed") if isinstance(result, dict) else None,
                         duration_ms=round((time.perf_counter() - t0) * 1000, 2))
            except NetagentError as exc:
                reply = protocol.reply_error(req_id, exc)
                log.info("request", op=op, ok=False, code=exc.code, error=exc.message,
                         duration_ms=round((time.perf_counter() - t0) * 1000, 2))
            except Exception as exc:
                log.exception("request failed", op=op)
                reply = protocol.reply_error(req_id, Internal(f"internal error: {exc}"))
            await self._send(stream, reply)
        return False

    async def _events(self, stream: SocketStream, req_id: Any, args: dict[str, Any]) -> None:
        bus = self.agent.bus
        watcher = bus.subscribe()
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


def _bind_socket(config: Config) -> socket.socket:
    """The listening socket: passed in by systemd (LISTEN_FDS) or bound here, 0660."""
    passed = sdnotify.listen_fds()
    if passed:
        sock = socket.socket(fileno=passed[0])
        log.info("using the socket systemd passed in", fd=passed[0])
        return sock
    path = Path(config.socket)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    if path.exists() or path.is_symlink():
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
            raise Internal(f"another netagent is already listening on {path}")
        except (ConnectionRefusedError, FileNotFoundError):
            path.unlink()
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o117)
    try:
        sock.bind(str(path))
    finally:
        os.umask(old_umask)
    gid = _group_gid(config.socket_group)
    if gid is not None:
        os.chown(path, 0 if os.getuid() == 0 else -1, gid)
    os.chmod(path, 0o660)
    sock.listen(512)
    return sock


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
    agent = Agent(config)
    await agent.start()
    assert agent.rec is not None
    server = Server(agent, config)
    raw = _bind_socket(config)
    listener = await anyio.abc.SocketListener.from_socket(raw)
    async with anyio.create_task_group() as tg:
        agent.events = EventSource(agent.rec, agent.links, agent.bus)
        await tg.start(agent.events.run)
        tg.start_soon(agent.rec.run)
        tg.start_soon(listener.serve, server.serve_connection)
        sdnotify.notify(f"READY=1\nSTATUS={agent.summary()}")
        tg.start_soon(sdnotify.watchdog_loop, agent.summary)
        log.info("netagent ready", socket=config.socket, firewall=agent.firewall_why)
        signum = await _wait_for_stop_signal()
        log.info("stopping; links and rules stay in place", signal=signal.Signals(signum).name)
        sdnotify.notify("STOPPING=1")
        tg.cancel_scope.cancel()
    with contextlib.suppress(Exception):
        await listener.aclose()
    if not sdnotify.listen_fds():
        with contextlib.suppress(FileNotFoundError):
            Path(config.socket).unlink()
    agent.store.close()
    await agent.links.close()
