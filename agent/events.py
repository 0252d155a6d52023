"""The kernel's link and address events: attach rules, and hints for self-repair.

Order that loses nothing (``shared/notes/pyroute2.md``): subscribe, then dump, then read.
Attaching a matching interface is done right here, from the event, with one raw netlink
request, so it takes well under a millisecond; everything else only *kicks* the
reconciler with the keys that may have drifted. Lost events (ENOBUFS) mean: open a new
socket, subscribe, dump, and ask the reconciler for a full pass.

Events are read with :mod:`netagent.backends.rtnl` rather than pyroute2, whose
per-message parsing costs ~0.5-1 ms: too slow to keep up with a burst of 1,000 veths.
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
from dataclasses import dataclass
from typing import Any

import anyio
import structlog

from netagent.backends import rtnl
from netagent.backends.netlink import NetlinkBackend

from . import intents as I
from .bus import EventBus
from .reconcile import LinkInfo, Reconciler

log = structlog.get_logger("netagent.events")

NS_GROUPS = (
    rtnl.RTMGRP_LINK
    | rtnl.RTMGRP_IPV4_IFADDR
    | rtnl.RTMGRP_IPV6_IFADDR
    | rtnl.RTMGRP_IPV4_ROUTE
    | rtnl.RTMGRP_IPV6_ROUTE
)


@dataclass
class Seen:
    name: str
    kind: str | None
    master: int | None
    up: bool
    owner: str | None
    peer: int | None = None


def _is_enobufs(exc: BaseException) -> bool:
    if isinstance(exc, BaseExceptionGroup):
        return all(_is_enobufs(e) for e in exc.exceptions)
    return getattr(exc, "errno", None) == errno.ENOBUFS


class EventSource:
    def __init__(self, reconciler: Reconciler, links: NetlinkBackend, bus: EventBus) -> None:
        self.rec = reconciler
        self.links = links
        self.bus = bus
        self.seen: dict[int, Seen] = {}
        self.bridges: dict[str, int] = {}
        self.resyncs = 0
        #: the receive buffer of the host's event socket; NETAGENT_EVENT_RCVBUF makes it
        #: tiny in a test, to prove that lost events (ENOBUFS) lose no interface
        self.rcvbuf = int(os.environ.get("NETAGENT_EVENT_RCVBUF", 32 << 20))
        self._tg: anyio.abc.TaskGroup | None = None
        # interfaces this source attached: a later event still showing no master was
        # queued before the attach (the kernel announces a new veth more than once)
        self.attached: set[int] = set()
        self.pending: set[int] = set()

    async def run(self, *, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
        started = False
        while True:
            sock = rtnl.EventSocket(rcvbuf=self.rcvbuf)
            try:
                async with anyio.create_task_group() as tg:
                    # attaches run as tasks: a burst is handled pipelined, the reader never
                    # waits for the kernel's ACK of one before parsing the next event
                    self._tg = tg
                    await self._resync()
                    if not started:
                        started = True
                        task_status.started()
                    while True:
                        for datagram in await sock.receive():
                            for event in rtnl.parse(datagram):
                                self._handle(event)
            except Exception as exc:
                if not started:
                    raise  # at start-up: fail loudly rather than hang
                if _is_enobufs(exc):
                    self.resyncs += 1
                    log.warning("netlink events lost (ENOBUFS); resubscribing and resyncing")
                    self.bus.publish("resync", "kernel events were lost (ENOBUFS); full resync")
                else:
                    # never let the daemon go deaf: resubscribe, dump, resync
                    log.exception("event source failed; resubscribing")
                    await anyio.sleep(1)
            finally:
                with contextlib.suppress(Exception):
                    sock.close()

    # ---- inside the namespaces ------------------------------------------------------
    def _ns_keys(self, name: str) -> list[str]:
        keys = [f"ns/{name}"] if f"ns/{name}" in self.rec.desired.intents else []
        return keys + [i.key for i in self.rec.desired.users_of_namespace(name)]

    def _watched_namespaces(self) -> set[str]:
        names = {n.name for n in self.rec.desired.of_kind(I.Namespace)}
        for intent in self.rec.desired.intents.values():
            if isinstance(intent, I.Plug):
                names.add(intent.ns)
            elif isinstance(intent, I.Wire):
                names.update((intent.ns_a, intent.ns_b))
        return names

    async def watch_namespaces(self, interval: float = 0.25) -> None:
        """Notice a namespace deleted (nothing in the host announces it when no veth
        joins it), and watch inside each namespace for what netagent set there (an
        address, a route, the veth) being removed. A namespace recreated under the same
        name is a new namespace: its watcher is opened anew."""
        watchers: dict[str, tuple[tuple[int, int], rtnl.EventSocket, anyio.CancelScope]] = {}
        try:
            async with anyio.create_task_group() as tg:
                while True:
                    try:
                        wanted = self._watched_namespaces()
                        for name in list(watchers):
                            if name not in wanted:
                                _ino, sock, scope = watchers.pop(name)
                                scope.cancel()
                                sock.close()
                        for name in wanted:
                            path = str(self.links.netns_dir / name)
                            try:
                                st = os.stat(path)
                                ino = (st.st_dev, st.st_ino)
                            except FileNotFoundError:
                                ino = None
                            current = watchers.get(name)
                            if current is not None and current[0] == ino:
                                continue
                            if current is not None:
                                current[2].cancel()
                                current[1].close()
                                del watchers[name]
                                await self.links.forget_namespace(name)  # the old one
                                if ino is None or f"ns/{name}" in self.rec.desired.intents:
                                    self.bus.publish(
                                        "ns-removed" if ino is None else "ns-replaced",
                                        f"namespace {name} was "
                                        f"{'deleted' if ino is None else 'replaced'}",
                                        ns=name,
                                    )
                                self.rec.kick(self._ns_keys(name))
                            if ino is None:
                                continue
                            try:
                                raw = await anyio.to_thread.run_sync(rtnl.socket_in_netns, path)
                            except OSError:
                                continue
                            sock = rtnl.EventSocket(groups=NS_GROUPS, rcvbuf=4 << 20, sock=raw)
                            scope = anyio.CancelScope()
                            watchers[name] = (ino, sock, scope)
                            tg.start_soon(self._watch_inside, name, sock, scope)
                    except Exception:
                        log.exception("namespace watch failed; trying again")
                    await anyio.sleep(interval)
        finally:
            for _ino, sock, scope in watchers.values():
                scope.cancel()
                sock.close()

    async def _watch_inside(
        self, name: str, sock: rtnl.EventSocket, scope: anyio.CancelScope
    ) -> None:
        with scope:
            while True:
                try:
                    datagrams = await sock.receive()
                except OSError:
                    self.rec.kick(self._ns_keys(name))
                    continue
                for datagram in datagrams:
                    for ev in rtnl.parse(datagram):
                        gone = getattr(ev, "deleted", False) or (
                            isinstance(ev, rtnl.LinkEvent) and ev.owner_key and not ev.up
                        )
                        if gone:
                            keys = self._ns_keys(name)
                            self.bus.publish(
                                "ns-drift",
                                f"something netagent set in {name} changed",
                                ns=name,
                                keys=keys,
                            )
                            self.rec.kick(keys)
                            break

    def link_view(self) -> list[LinkInfo]:
        return [
            LinkInfo(i, s.name, s.kind, s.master, s.up, s.peer, s.owner)
            for i, s in self.seen.items()
        ]

    async def _resync(self) -> None:
        links = await self.links.links()
        self.attached.clear()
        self.seen = {
            lk.index: Seen(lk.name, lk.kind, lk.master, lk.up, lk.owner_key, lk.peer)
            for lk in links
        }
        self.bridges = {lk.name: lk.index for lk in links if lk.kind == "bridge"}
        for lk in links:
            ev = rtnl.LinkEvent(
                False, lk.index, lk.name, lk.up, lk.master, lk.alias, lk.kind, lk.peer
            )
            self._consider(ev, time.monotonic())
        self.rec.link_view = self.link_view
        self.rec.kick(full=True)

    def _handle(self, ev: rtnl.Event) -> None:
        t_recv = time.monotonic()
        if isinstance(ev, rtnl.RouteEvent):
            return
        if isinstance(ev, rtnl.AddrEvent):
            seen = self.seen.get(ev.index)
            if ev.deleted and seen is not None and seen.owner in self.rec.desired.intents:
                self.bus.publish(
                    "addr-removed",
                    f"an address of {seen.name} ({seen.owner}) was removed",
                    key=seen.owner,
                )
                self.rec.kick([seen.owner])
            return
        if ev.name is None:
            return
        if ev.deleted:
            self.seen.pop(ev.index, None)
            self.attached.discard(ev.index)
            if ev.kind == "bridge" and self.bridges.get(ev.name) == ev.index:
                del self.bridges[ev.name]
            owner = ev.owner_key
            if owner is not None and owner in self.rec.desired.intents:
                self.bus.publish(
                    "link-removed", f"{ev.name} ({owner}) was deleted", key=owner, ifname=ev.name
                )
                self.rec.kick([owner])
            return
        if ev.index not in self.seen:
            self.bus.publish("link-appeared", f"{ev.name} appeared", ifname=ev.name, kind=ev.kind)
        self.seen[ev.index] = Seen(ev.name, ev.kind, ev.master, ev.up, ev.owner_key, ev.peer)
        if ev.kind == "bridge":
            self.bridges[ev.name] = ev.index
        self._consider(ev, t_recv)

    def _consider(self, ev: rtnl.LinkEvent, t_recv: float) -> None:
        owner = ev.owner_key
        if owner is not None:
            if owner in self.rec.desired.intents and self._drifted(ev, owner):
                self.rec.kick([owner])
            return
        if ev.kind == "bridge" or ev.name is None:
            return
        rule = self.rec.rule_for(ev.name)
        if rule is None:
            return
        bridge_index = self.bridges.get(rule.bridge)
        if bridge_index is None or (ev.master == bridge_index and ev.up):
            return
        if ev.index in self.attached and not ev.master:
            return
        if ev.index in self.pending:
            return
        if ev.peer is not None and ev.peer != ev.index:
            peer = self.seen.get(ev.peer)
            if ev.peer in self.pending or (peer is not None and peer.master == bridge_index):
                self.bus.publish(
                    "left-alone",
                    f"{ev.name} matches {rule.pattern!r}, but its veth peer "
                    f"{peer.name if peer else ev.peer} is on {rule.bridge} already: both ends "
                    "on one bridge would make a loop",
                    ifname=ev.name,
                    bridge=rule.bridge,
                )
                return
        master = self.seen.get(ev.master) if ev.master else None
        self.pending.add(ev.index)
        assert self._tg is not None
        self._tg.start_soon(
            self._attach, ev, bridge_index, rule, master.name if master else None, t_recv
        )

    async def _attach(
        self,
        ev: rtnl.LinkEvent,
        bridge_index: int,
        rule: I.AttachRule,
        master_name: str | None,
        t_recv: float,
    ) -> None:
        assert ev.name is not None
        try:
            done = await self.rec.attach(
                ev.index, ev.name, ev.master, ev.up, bridge_index, rule, master_name=master_name
            )
        except OSError as exc:  # gone already, or the bridge is full (1023 ports)
            log.info("attach failed", ifname=ev.name, error=str(exc))
            self.bus.publish(
                "attach-failed",
                f"{ev.name} could not be attached to {rule.bridge}: {exc.strerror or exc}",
                ifname=ev.name,
                bridge=rule.bridge,
            )
            return
        finally:
            self.pending.discard(ev.index)
        if done and done[0].startswith("attached"):
            self.attached.add(ev.index)
            log.debug(
                "attached",
                ifname=ev.name,
                bridge=rule.bridge,
                latency_ms=round((time.monotonic() - t_recv) * 1000, 3),
            )

    def _drifted(self, ev: rtnl.LinkEvent, owner: str) -> bool:
        intent = self.rec.desired.intents.get(owner)
        if isinstance(intent, I.Bridge):
            return not ev.up
        if isinstance(intent, I.Plug) and ev.name == intent.host_ifname:
            return not ev.up or ev.master != self.bridges.get(intent.bridge)
        return False
