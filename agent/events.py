"""The kernel's link and address events: attach rules, and hints for self-repair.

Order that loses nothing (``shared/notes/pyroute2.md``): subscribe, then dump, then read.
Attaching a matching interface is done right here, from the event, so it takes one
netlink round trip; everything else only *kicks* the reconciler with the keys that may
have drifted. On ENOBUFS the socket is dead for good: open a new one, subscribe, dump,
and ask the reconciler for a full pass.
"""

from __future__ import annotations

import contextlib
import errno
import socket
import time
from dataclasses import dataclass
from typing import Any

import anyio
import structlog

from netagent.backends.netlink import Link, NetlinkBackend

from . import intents as I
from .bus import EventBus
from .reconcile import Reconciler

from pyroute2 import AsyncIPRoute
from pyroute2.netlink.rtnl import (
    RTMGRP_IPV4_IFADDR,
    RTMGRP_IPV6_IFADDR,
    RTMGRP_LINK,
)

log = structlog.get_logger("netagent.events")

SO_RCVBUFFORCE = 33
RCVBUF = 32 << 20
GROUPS = RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR


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
        #: (monotonic receive time, ifname) of the last attach, for the benchmark
        self.last_attach: tuple[float, str] | None = None

    async def _open(self) -> Any:
        mon = AsyncIPRoute(rcvbuf=RCVBUF)
        await mon.setup_endpoint()
        with contextlib.suppress(OSError):
            # as root, go past net.core.rmem_max; bursts of 1,000 veths need it
            mon.socket.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RCVBUF)
        await mon.bind(groups=GROUPS)
        return mon

    async def run(self, *, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
        started = False
        while True:
            mon = await self._open()
            try:
                await self._resync()
                if not started:
                    started = True
                    task_status.started()
                while True:
                    async for msg in mon.get():
                        await self._handle(msg)
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    raise
                self.resyncs += 1
                log.warning("netlink events lost (ENOBUFS); resubscribing and resyncing")
                self.bus.publish("resync", "kernel events were lost (ENOBUFS); full resync")
            except Exception as exc:
                if getattr(exc, "code", None) != errno.ENOBUFS:
                    raise
                self.resyncs += 1
                log.warning("netlink events lost (ENOBUFS); resubscribing and resyncing")
                self.bus.publish("resync", "kernel events were lost (ENOBUFS); full resync")
            finally:
                with contextlib.suppress(Exception):
                    mon.close()

    async def _resync(self) -> None:
        links = await self.links.links()
        self.seen = {lk.index: self._seen(lk) for lk in links}
        self.bridges = {lk.name: lk.index for lk in links if lk.kind == "bridge"}
        for lk in links:
            await self._consider(lk, time.monotonic())
        self.rec.kick(full=True)

    @staticmethod
    def _seen(lk: Link) -> Seen:
        return Seen(lk.name, lk.kind, lk.master, lk.up, lk.owner_key)

    async def _handle(self, msg: Any) -> None:
        event = msg["event"]
        t_recv = time.monotonic()
        if event == "RTM_NEWLINK":
            lk = Link.from_msg(msg)
            if lk.name is None:
                return
            prev = self.seen.get(lk.index)
            if prev is None:
                self.bus.publish("link-appeared", f"{lk.name} appeared", ifname=lk.name,
                                 kind=lk.kind)
            self.seen[lk.index] = self._seen(lk)
            if lk.kind == "bridge":
                self.bridges[lk.name] = lk.index
            await self._consider(lk, t_recv)
        elif event == "RTM_DELLINK":
            lk = Link.from_msg(msg)
            self.seen.pop(lk.index, None)
            if lk.kind == "bridge" and self.bridges.get(lk.name) == lk.index:
                del self.bridges[lk.name]
            owner = lk.owner_key
            if owner is not None and owner in self.rec.desired.intents:
                self.bus.publish("link-removed", f"{lk.name} ({owner}) was deleted", key=owner,
                                 ifname=lk.name)
                self.rec.kick([owner])
        elif event == "RTM_DELADDR":
            seen = self.seen.get(msg["index"])
            if seen is not None and seen.owner in self.rec.desired.intents:
                self.bus.publish("addr-removed", f"an address of {seen.name} ({seen.owner}) "
                                 "was removed", key=seen.owner)
                self.rec.kick([seen.owner])

    async def _consider(self, lk: Link, t_recv: float) -> None:
        owner = lk.owner_key
        if owner is not None:
            if owner in self.rec.desired.intents and self._drifted(lk, owner):
                self.rec.kick([owner])
            return
        if lk.kind == "bridge":
            return
        rule = self.rec.rule_for(lk.name)
        if rule is None:
            return
        bridge_index = self.bridges.get(rule.bridge)
        if bridge_index is None:
            return
        try:
            done = await self.rec.attach(lk.index, lk.name, lk.master, lk.up, bridge_index, rule)
        except Exception as exc:  # the link may be gone already
            log.info("attach failed", ifname=lk.name, error=str(exc))
            return
        if done and done[0].startswith("attached"):
            self.last_attach = (t_recv, lk.name)
            log.info("attached", ifname=lk.name, bridge=rule.bridge,
                     latency_ms=round((time.monotonic() - t_recv) * 1000, 3))

    def _drifted(self, lk: Link, owner: str) -> bool:
        intent = self.rec.desired.intents.get(owner)
        if isinstance(intent, I.Bridge):
            return not lk.up
        if isinstance(intent, I.Plug) and lk.name == intent.host_ifname:
            return not lk.up or lk.master != self.bridges.get(intent.bridge)
        return False
