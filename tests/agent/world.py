"""The daemon's rooms wired as ``agent/main.py`` wires them, over the in-memory fakes.

A real ``DesiredState``, ``StateStore`` (in ``tmp_path``), ``Reconciler``,
``FirewallSync``, ``Service`` and ``EventSource``, with ``FakeNetlink`` for the kernel's
links and ``FakeFirewall`` for the rules. The fake netlink announces host link changes
the way the kernel does: either into the link cache only (``feed="cache"``), or through
the event source (``feed="events"``), which also marks what drifted; with ``feed="none"``
nothing is announced (a test feeds the event source itself).

Every wait has a deadline: a test that would hang fails instead.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

import anyio

from netagent.agent.api import Counters, Peer, Service
from netagent.agent.bus import EventBus
from netagent.agent.events import EventSource
from netagent.agent.fwsync import FirewallSync
from netagent.agent.hostcheck import HostCheck
from netagent.agent.hostview import HostView
from netagent.agent.kinds import default_kinds
from netagent.agent.kinds.base import Context
from netagent.agent.kinds.namespace import Claims
from netagent.agent.linkcache import LinkCache
from netagent.agent.probe import NOOP, Probe
from netagent.agent.reconcile import Reconciler
from netagent.agent.state import DesiredState
from netagent.agent.store import StateStore
from netagent.backends import rtnl
from netagent.backends.fakefw import FakeFirewall
from netagent.backends.fakenet import FakeNetlink
from netagent.backends.firewall import AnyBackend
from netagent.backends.hostfw import HostFirewall
from netagent.backends.netlink import Link

from ..support.wait import LIMIT

RW = Peer(pid=1, uid=0, gid=0, access="rw")
RO = Peer(pid=2, uid=1000, gid=1000, access="ro")


@dataclass
class World:
    net: FakeNetlink
    fw: FakeFirewall
    state: DesiredState
    store: StateStore
    links: LinkCache
    bus: EventBus
    ctx: Context
    sync: FirewallSync
    rec: Reconciler
    counters: Counters
    api: Service
    events: EventSource
    #: what the doctor reads as the host (change it, then refresh the checker)
    host: HostView

    async def call(self, op: str, peer: Peer = RW, **args: Any) -> Any:
        """One request through the API (the reconciler must be running)."""
        with anyio.fail_after(LIMIT):
            return await self.api.handle(op, args, peer)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """The reconciler's loop runs while the block does; the block's own exception
        comes out as it is (not wrapped in an exception group)."""
        failure: Exception | None = None
        async with anyio.create_task_group() as tg:
            tg.start_soon(self.rec.run)
            try:
                yield
            except Exception as exc:
                failure = exc
            finally:
                tg.cancel_scope.cancel()
        if failure is not None:
            raise failure

    def slow_disk(self) -> None:
        """The journal's flushes go to its thread from now on, as after a flush that
        took too long on the loop (``SerialThread.start_quick``): what a test of the
        flush beside the pass needs."""
        self.api._journal.back_off()

    def published(self, type_: str) -> list[dict[str, Any]]:
        return [e for e in self.bus.recent if e["type"] == type_]

    def link(self, name: str) -> Link:
        index = self.net.host_index(name)
        assert index is not None, f"{name} is not in the fake host"
        found = self.net.host.links[index]
        return found


def make_world(
    tmp_path: Path,
    *,
    feed: Literal["cache", "events", "none"] = "cache",
    resync_interval: float = 3600.0,
    probe: Probe = NOOP,
) -> World:
    net = FakeNetlink(netns_dir=tmp_path / "netns")
    fw = FakeFirewall(calls=net.calls)
    kinds = default_kinds()
    store = StateStore(tmp_path / "state", kinds)
    links = LinkCache()
    state = DesiredState(kinds, external_namespace=net.ns_exists, name_in_use=links.foreign_name)
    state.load(store.load())
    links.reset(list(net.host.links.values()))
    bus = EventBus(listeners=[probe.event])
    counters = Counters()
    sync = FirewallSync(cast(AnyBackend, fw), bus, conntrack=False)
    ctx = Context(
        net=net,
        state=state,
        bus=bus,
        links=links,
        claims=Claims(tmp_path / "claims"),
        refused=sync.quarantined,
        quarantined=store.quarantine,
    )
    rec = Reconciler(state, ctx, sync, bus, resync_interval, probe=probe)
    host = HostView(HostFirewall())
    checker = HostCheck(ctx, sync, reader=lambda *_args: host)
    rec.checker = checker
    events = EventSource(state, rec, net, links, bus, counters)
    api = Service(
        state=state,
        store=store,
        reconciler=rec,
        ctx=ctx,
        firewall=sync,
        bus=bus,
        counters=counters,
        about={"socket": str(tmp_path / "sock"), "state_dir": str(tmp_path / "state")},
        checker=checker,
    )
    if feed == "events":

        def announce(deleted: bool, link: Link) -> None:
            events._handle(rtnl.LinkEvent(deleted, link))

        net.on_link = announce
    elif feed == "cache":

        def update(deleted: bool, link: Link) -> None:
            if deleted:
                links.remove(link.index)
            else:
                links.update(link)

        net.on_link = update
    return World(net, fw, state, store, links, bus, ctx, sync, rec, counters, api, events, host)


def lines(text: str) -> list[str]:
    return text.splitlines()
