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


@dataclass
class Seen:
    name: str
    kind: str | None
    master: int | None
    up: bool
    owner: str | None


class EventSource:
    def __init__(self, reconciler: Reconciler, links: NetlinkBackend, bus: EventBus) -> None:
        self.rec = reconciler
        self.links = links
        self.bus = bus
        self.seen: dict[int, Seen] = {}
        self.bridges: dict[str, int] = {}
        self.resyncs = 0
        self._tg: anyio.abc.TaskGroup | None = None
        # interfaces this source attached: a later event still showing no master was
        # queued before the attach (the kernel announces a new veth more than once)
        self.attached: set[int] = set()
        self.pending: set[int] = set()

    async def run(self, *, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
        started = False
        while True:
            sock = rtnl.EventSocket()
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
            except* OSError as group:
                if not all(getattr(e, "errno", None) == errno.ENOBUFS for e in group.exceptions):
                    raise
                self.resyncs += 1
                log.warning("netlink events lost (ENOBUFS); resubscribing and resyncing")
                self.bus.publish("resync", "kernel events were lost (ENOBUFS); full resync")
            finally:
                with contextlib.suppress(Exception):
                    sock.close()

    def link_view(self) -> list[LinkInfo]:
        return [LinkInfo(i, s.name, s.kind, s.master, s.up) for i, s in self.seen.items()]

    async def _resync(self) -> None:
        links = await self.links.links()
        self.attached.clear()
        self.seen = {
            lk.index: Seen(lk.name, lk.kind, lk.master, lk.up, lk.owner_key) for lk in links
        }
        self.bridges = {lk.name: lk.index for lk in links if lk.kind == "bridge"}
        for lk in links:
            ev = rtnl.LinkEvent(False, lk.index, lk.name, lk.up, lk.master, lk.alias, lk.kind)
            self._consider(ev, time.monotonic())
        self.rec.link_view = self.link_view
        self.rec.kick(full=True)

    def _handle(self, ev: rtnl.Event) -> None:
        t_recv = time.monotonic()
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
        self.seen[ev.index] = Seen(ev.name, ev.kind, ev.master, ev.up, ev.owner_key)
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
            log.info(
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
