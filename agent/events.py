"""The kernel's link and address events: the link cache, and marks for the reconciler.

Order that loses nothing (``docs/kernel-facts.md``): subscribe, then dump, then read.
Events are hints: each only updates the link cache and *marks* what may differ (an owned
interface deleted or no longer as its intent wants, an address removed, an interface a
rule may take); the reconciler decides and acts. Lost events (ENOBUFS) mean: open a new
socket, subscribe, dump, and mark everything.

Events are read with :mod:`netagent.backends.rtnl` rather than pyroute2, whose
per-message parsing costs ~0.5-1 ms: too slow to keep up with a burst of 1,000 veths.
Only committed desired state is read here (see ``agent/state.py``).
"""

from __future__ import annotations

import errno
import os
import time
from collections import deque
from typing import TYPE_CHECKING, Any

import anyio
import structlog

from netagent.backends import rtnl, rtnldump

from .keystatus import IN_PLACE
from .kinds.attach import NOTHING, AttachRule, decide
from .turns import Turns

if TYPE_CHECKING:
    from netagent.backends.netlink import Netlink

    from .api import Counters
    from .bus import EventBus
    from .linkcache import LinkCache
    from .reconcile import Reconciler
    from .state import DesiredState

log = structlog.get_logger("netagent.events")

NS_GROUPS = (
    rtnl.RTMGRP_LINK
    | rtnl.RTMGRP_IPV4_IFADDR
    | rtnl.RTMGRP_IPV6_IFADDR
    | rtnl.RTMGRP_IPV4_ROUTE
    | rtnl.RTMGRP_IPV6_ROUTE
)
#: namespace polls between two looks at which namespaces still hold a process
LIVENESS_EVERY = 20
#: seconds between looks at the namespace directory
NS_POLL = 0.25
#: ... or this many times what the last look took, if more: a look stats every
#: namespace in use (1,000 containers: ~3 ms), and takes at most ~2.5% of the loop
NS_POLL_SPACING = 40.0
#: seconds entering a namespace to open its watcher may take
NS_OPEN_TIMEOUT = 5.0


def namespaces_with_processes() -> set[tuple[int, int]] | None:
    """(device, inode) of every network namespace some process is in (None: /proc
    cannot tell)."""
    found: set[tuple[int, int]] = set()
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return None
    for pid in pids:
        try:
            st = os.stat(f"/proc/{pid}/ns/net")
        except OSError:
            continue  # gone meanwhile, or not ours to look at
        found.add((st.st_dev, st.st_ino))
    return found


def _is_enobufs(exc: BaseException) -> bool:
    if isinstance(exc, BaseExceptionGroup):
        return all(_is_enobufs(e) for e in exc.exceptions)
    return getattr(exc, "errno", None) == errno.ENOBUFS


class EventSource:
    def __init__(
        self,
        state: DesiredState,
        reconciler: Reconciler,
        net: Netlink,
        links: LinkCache,
        bus: EventBus,
        counters: Counters,
    ) -> None:
        self.state = state
        self.rec = reconciler
        self.net = net
        self.links = links
        self.bus = bus
        self.counters = counters
        #: namespaces intents act in whose deletion was told (until they are back)
        self._absent: set[str] = set()
        #: the receive buffer of the host's event socket; NETAGENT_EVENT_RCVBUF makes it
        #: tiny in a test, to prove that lost events (ENOBUFS) lose no interface
        self.rcvbuf = int(os.environ.get("NETAGENT_EVENT_RCVBUF", 32 << 20))
        #: datagrams read from the host's socket and not yet handled, in the kernel's
        #: order: the reader and :meth:`catch_up` both take from its front
        self._backlog: deque[bytes] = deque()
        #: the host's socket while the cache follows it (subscribed, dumped)
        self._sock: rtnl.EventSocket | None = None
        links.feed = self.catch_up

    # ---- the host -------------------------------------------------------------------
    async def run(self, *, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
        started = False
        while True:
            sock = rtnl.EventSocket(rcvbuf=self.rcvbuf)
            try:
                self.links.reset(await self.net.links(None))
                self.links.addressed = await self.net.host_addressed()
                self._backlog.clear()
                self._sock = sock
                if started:
                    self.rec.mark_all("resync")
                else:
                    started = True
                    task_status.started()
                while True:
                    if not self._backlog:
                        self._backlog.extend(await sock.receive())
                    # a burst of datagrams must not hold the loop for long: requests and
                    # passes run between slices of it
                    await self._drain()
            except Exception as exc:
                if not started:
                    raise  # at start-up: fail loudly rather than hang
                if _is_enobufs(exc):
                    self.counters.event_resyncs += 1
                    log.warning("netlink events lost (ENOBUFS); resubscribing and resyncing")
                    self.bus.publish("resync", "kernel events were lost (ENOBUFS); full resync")
                else:
                    # never let the daemon go deaf: resubscribe, dump, resync
                    log.exception("event source failed; resubscribing")
                    await anyio.sleep(1)
            finally:
                self._sock = None
                sock.close()

    async def _drain(self) -> None:
        turns = Turns()
        while self._backlog:
            for event in rtnl.parse(self._backlog.popleft()):
                self._handle(event)
            if turns.due():
                await anyio.sleep(0)

    async def catch_up(self) -> bool:
        """Handle every host event the kernel has queued so far. True when the link
        cache then holds what the kernel announced up to now: a change is announced
        under the kernel's lock before it is done, so the cache is as fresh as a lookup
        of each link would be (without the lookups, which wait for that lock, behind
        every ``ip`` of a burst). False when it cannot be (not subscribed yet, events
        lost): then ask the kernel."""
        sock = self._sock
        if sock is None:
            return False
        datagrams, exc = sock.pending()
        self._backlog.extend(datagrams)
        if exc is not None:
            sock.fail(exc)  # the reader raises it and resyncs
            return False
        try:
            await self._drain()
        except Exception:
            log.exception("handling an event failed; resubscribing")
            sock.fail(OSError(errno.EIO, "handling an event failed"))
            return False
        return self._sock is sock

    def _rules(self) -> list[AttachRule]:
        return [r for r in self.state.of_kind("attach") if isinstance(r, AttachRule)]

    def _handle(self, ev: rtnl.Event) -> None:
        if isinstance(ev, rtnl.RouteEvent):
            return
        if isinstance(ev, rtnl.AddrEvent):
            if ev.address and ev.scope < rtnl.RT_SCOPE_LINK:
                self.links.address_changed(ev.index, ev.address, ev.deleted)
            link = self.links.get(ev.index)
            key = link.owner_key if link is not None else None
            if ev.deleted and key is not None and key in self.state:
                assert link is not None
                self.bus.publish(
                    "addr-removed", f"an address of {link.name} ({key}) was removed", key=key
                )
                self.rec.drift(key, f"an address of {link.name} was removed")
            return
        link = ev.link
        key = link.owner_key
        if ev.deleted:
            self.links.remove(link.index)
            if key is not None and key in self.state:
                self.bus.publish(
                    "link-removed", f"{link.name} ({key}) was deleted", key=key, ifname=link.name
                )
                self.rec.drift(key, f"{link.name} was deleted")
            return
        if self.links.update(link) is None:
            self.bus.publish(
                "link-appeared", f"{link.name} appeared", ifname=link.name, kind=link.kind
            )
        if key is not None:
            intent = self.state.get(key)
            if intent is not None and self.state.kinds.of(intent).drifted(intent, link, self.links):
                self.rec.drift(key, f"{link.name} changed")
            return
        # the one attach decision, on what the cache knows now: a pass only for a link
        # it would attach or report (not for the announcements of an attach it made)
        if decide(self._rules(), link, self.links) is not NOTHING:
            self.rec.mark_links([link.index])

    # ---- inside the namespaces ------------------------------------------------------
    def _keys_in(self, name: str) -> list[str]:
        return sorted(self.state.lookup("ns", name))

    def _realized_in(self, name: str) -> bool:
        """Whether something acting in namespace ``name`` is reported in place."""
        status = self.rec.status
        return any(
            (st := status.get(key)) is not None and st.state == IN_PLACE
            for key in self._keys_in(name)
        )

    async def watch_namespaces(self) -> None:
        """Notice a namespace deleted (nothing in the host announces it when no veth
        joins it), and watch inside each namespace intents act in for what netagent set
        there (an address, a route, the veth) being removed. A namespace made again
        under the same name is a new namespace: its watcher is opened anew."""
        watchers: dict[str, tuple[tuple[int, int], rtnl.EventSocket, anyio.CancelScope]] = {}
        try:
            async with anyio.create_task_group() as tg:
                polls = 0
                while True:
                    t0 = time.perf_counter()
                    try:
                        await self._poll(watchers, tg)
                        if polls % LIVENESS_EVERY == 0:
                            await self._liveness()
                    except Exception:
                        log.exception("namespace watch failed; trying again")
                    polls += 1
                    await anyio.sleep(max(NS_POLL, NS_POLL_SPACING * (time.perf_counter() - t0)))
        finally:
            for _ident, sock, scope in watchers.values():
                scope.cancel()
                sock.close()

    async def _liveness(self) -> None:
        """A namespace someone else made (``ip netns attach c2 PID``, a container's) whose
        last process has left is kept alive only by its bind mount: what is plugged
        into it reaches nothing. Say so for each intent acting in it (``show``), until a
        process is back or the name points at another namespace (then it is followed:
        the watcher above sees the new identity and the intents are realized there)."""
        alive = await anyio.to_thread.run_sync(namespaces_with_processes)
        for name in (str(n) for n in self.state.indexed("ns")):
            if f"ns/{name}" in self.state:
                continue  # netagent's own: no process in it is normal
            ident = self.net.ns_identity(name)
            empty = ident is not None and alive is not None and ident not in alive
            reason = (
                f"no process is left in namespace {name} (the container stopped?); what "
                "is plugged into it reaches nothing"
                if empty
                else None
            )
            for key in self._keys_in(name):
                self.rec.condition(key, reason)

    async def _poll(
        self,
        watchers: dict[str, tuple[tuple[int, int], rtnl.EventSocket, anyio.CancelScope]],
        tg: anyio.abc.TaskGroup,
    ) -> None:
        wanted = {str(n) for n in self.state.indexed("ns")}
        for name in list(watchers):
            if name not in wanted:
                _ident, sock, scope = watchers.pop(name)
                scope.cancel()
                sock.close()
        self._absent &= wanted
        for name in sorted(wanted):
            ident = self.net.ns_identity(name)
            current = watchers.get(name)
            if current is not None and current[0] == ident:
                continue
            if ident is None and (
                name in self._absent or (current is None and not self._realized_in(name))
            ):
                continue  # told already; or nothing in it was realized (being made)
            if current is not None:
                current[2].cancel()
                current[1].close()
                del watchers[name]
            if current is not None or ident is None:
                # replaced, or gone: deleted between two polls is gone too, even when
                # no watcher was open yet (a plug then `ip netns del` within one poll)
                await self.net.forget(name)  # the old one
                gone = ident is None
                if gone:
                    self._absent.add(name)
                self.bus.publish(
                    "ns-removed" if gone else "ns-replaced",
                    f"namespace {name} was {'deleted' if gone else 'replaced'}",
                    ns=name,
                )
                for key in self._keys_in(name):
                    self.rec.drift(key, f"namespace {name} was {'deleted' if gone else 'replaced'}")
            if ident is None:
                continue
            self._absent.discard(name)
            path = name if name.startswith("/") else str(self.net.netns_dir / name)
            try:
                with anyio.fail_after(NS_OPEN_TIMEOUT):
                    raw = await anyio.to_thread.run_sync(rtnldump.socket_in_netns, path)
            except (OSError, TimeoutError):
                continue
            sock = rtnl.EventSocket(groups=NS_GROUPS, rcvbuf=4 << 20, sock=raw)
            scope = anyio.CancelScope()
            watchers[name] = (ident, sock, scope)
            tg.start_soon(self._watch_inside, name, sock, scope)

    async def _watch_inside(
        self, name: str, sock: rtnl.EventSocket, scope: anyio.CancelScope
    ) -> None:
        with scope:
            while True:
                try:
                    datagrams = await sock.receive()
                except OSError:
                    self.rec.mark(self._keys_in(name), "event")
                    continue
                for datagram in datagrams:
                    for ev in rtnl.parse(datagram):
                        if isinstance(ev, rtnl.LinkEvent):
                            gone = ev.deleted or (ev.link.owner_key is not None and not ev.link.up)
                        else:
                            gone = ev.deleted
                        if gone:
                            keys = self._keys_in(name)
                            self.bus.publish(
                                "ns-drift",
                                f"something netagent set in {name} changed",
                                ns=name,
                                keys=keys,
                            )
                            for key in keys:
                                self.rec.drift(key, f"something it set in {name} changed")
                            break
