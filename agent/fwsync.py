"""The firewall as a whole, beside the reconciler: what changed since the last sync, and
how to bring the backend's rules to the desired forwards and bridges.

Forwards added or removed since the last good sync go to the backend as one small update
(``plan_update``: a change costs the same with 10 forwards as with 10,000); anything else
(a bridge changed, someone changed the rules, a failed sync, the periodic check) is a
full one: observe, plan, apply. Planning is pure and, for big states, runs in a worker
thread, so it never holds up the event loop. Connections of removed or retargeted
forwards are cleared right after the rules change, in the same sync; a removed forward
whose counter says it never carried a connection needs no walk of the conntrack table.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, cast

import anyio
import structlog

from netagent.backends.firewall import (
    COUNTERS_TIMEOUT,
    AnyBackend,
    Batch,
    Counts,
    FirewallSpec,
    VxlanGuard,
)

from .errors import NetagentError

if TYPE_CHECKING:
    from netagent.backends.conntrack import Conntrack
    from netagent.backends.xtfilter import FilterChains

    from .bus import EventBus
    from .kinds.forward import Forward
    from .kinds.peer import Peer
    from .state import Change, DesiredState
    from .values import IPAddress

log = structlog.get_logger("netagent.firewall")

#: above this many forwards a full plan runs in a worker thread
THREAD_PLAN = 500
#: forwards tried together while isolating one the backend refuses
ISOLATE_CHUNK = 1024
#: seconds one conntrack run may take
CONNTRACK_TIMEOUT = 10.0
_DELETED = re.compile(r"(\d+) flow entr(?:y|ies) ha(?:s|ve) been deleted")


class FirewallSync:
    def __init__(
        self,
        backend: AnyBackend,
        bus: EventBus,
        conntrack: bool = True,
        filters: FilterChains | None = None,
    ) -> None:
        self.backend = backend
        self.bus = bus
        self.conntrack = conntrack
        #: netagent's chains in the iptables filter tables (``backends/xtfilter.py``):
        #: accepts where another tool filters, and the guard for backends without one
        self.filters = filters
        #: the next sync reads the filter tables whatever changed (periodic, foreign)
        self._look_filters = True
        #: the conntrack tool, once the kernel turned out not to filter dumps ("": none)
        self._tool_only: str | None = None
        self._added: list[Forward] = []
        self._removed: list[Forward] = []
        #: peers' underlay addresses added / removed since the last sync
        self._peers_added: set[str] = set()
        self._peers_removed: set[str] = set()
        self._full = True
        self._full_guard = False
        #: what the last full plan found missing, until a sync succeeds
        self.pending: list[str] = []
        #: forward key -> why the backend refused it (kept out until the next full sync)
        self.quarantined: dict[str, str] = {}
        self._client: Conntrack | None = None
        #: the bridges the last good sync installed rules for: others need a full sync
        self._synced_bridges: frozenset[object] | None = None
        #: forwards whose counter has seen every connection they ever carried: their
        #: rule or element was made by an update of this run and nothing rewrote it
        #: since (a rebuild starts counters at zero while older flows stay tracked)
        self._counted: set[str] = set()
        #: removals whose conntrack walk the counters spared (``status`` shows it)
        self.walks_skipped = 0

    @property
    def name(self) -> str:
        return self.backend.name

    def spec(self, state: DesiredState, forwards: bool = True) -> FirewallSpec:
        """The forwards, and the bridges' NAT needs: netagent's bridges, and the other
        plugins' bridges behind chained CNI attachments (hairpin only). Without
        ``forwards``, a spec for an update that does not read them (``empty`` then asks
        the state)."""
        from .kinds.attachment import chained_bridges

        found: Any = tuple(state.of_kind("forward")) if forwards else ()
        bridges: Any = tuple(state.of_kind("bridge"))
        names = {b.name for b in bridges}
        extra = state.derived("fwsync.chained", "attachment", lambda: chained_bridges(state))
        bridges += tuple(b for b in extra if b.name not in names)
        lean = None if forwards else state.count("forward")
        dests = cast("frozenset[IPAddress]", state.indexed_set("fwd-dest"))
        return FirewallSpec(found, bridges, vxlan_guard(state), lean_count=lean, dest_ips=dests)

    def note(self, change: Change) -> None:
        """A committed change of a firewall kind (told apart by their kind's name: an
        ``apply`` of 10,000 forwards notes each, and imports here cost a tenth of it)."""
        old, new = change.old, change.new
        item = new if new is not None else old
        kind = item.kind if item is not None else None
        if kind == "forward":
            if old is not None:
                self._removed.append(cast("Forward", old))
            if new is not None:
                self._added.append(cast("Forward", new))
        elif kind == "peer":
            # a peer's underlay address: one element of the VXLAN guard
            if old is not None:
                self._peers_removed.add(cast("Peer", old).underlay)
            if new is not None:
                self._peers_added.add(cast("Peer", new).underlay)
        elif kind == "attachment":
            # ``sync`` compares the bridges the spec needs with the last synced (a
            # chained one's bridge needs hairpin NAT), and changes nothing otherwise
            pass
        else:
            self._full = True  # a bridge, the VXLAN device: their rules are few, plan them whole

    def drifted(self, why: str) -> None:
        self._full = True
        self._look_filters = True

    def look(self) -> None:
        """The periodic pass, or someone else changed a filter table: the next sync
        reads the filter tables (the NAT rules only on drift: their watcher says)."""
        self._look_filters = True

    async def _plan(self, spec: FirewallSpec, observed: object) -> Batch[object]:
        if len(spec.forwards) > THREAD_PLAN:
            return await anyio.to_thread.run_sync(self.backend.plan, spec, observed)
        return self.backend.plan(spec, observed)

    async def sync(self, state: DesiredState) -> list[str]:
        # an update that reads no forwards gets none (the full sync takes them after)
        lean = not self._full and not self.backend.update_reads_forwards
        spec = self.spec(state, forwards=not lean)
        added, removed = self._added, self._removed
        self._added, self._removed = [], []
        peers_added, peers_removed = self._peers_added, self._peers_removed
        self._peers_added, self._peers_removed = set(), set()
        # taken now, not cleared at the end: a drift or a change noted while this sync
        # runs (another tool flushing the rules again) asks for the next one whole
        full, self._full = self._full, False
        try:
            bridges = frozenset(spec.bridges)
            full = full or bridges != self._synced_bridges
            steps: list[str] = []
            # before the rules go: which removed forwards never carried a connection (an
            # update reads their counters as it applies, in the same call)
            counted = [f for f in removed if f.key in self._counted] if self.conntrack else []
            update = not full and bool(added or removed) and not spec.empty
            idle = await self._idle(counted) if counted and not update else set()
            if spec.empty:
                # nothing desired: the firewall holds nothing of netagent's (an empty table
                # or empty chains would be something left behind)
                steps = await self.backend.purge()
                if self.filters is not None:
                    steps += await self.filters.purge()
                self._counted.clear()
            else:
                if not full and (added or removed):
                    batch = self.backend.plan_update(spec, added, removed)
                    try:
                        if counted:
                            counts = await self.backend.apply_counted(batch, counted)
                            idle = _never_used(counted, counts)
                        else:
                            await self.backend.apply(batch)
                        steps = batch.steps
                        self._counted.difference_update(f.key for f in removed)
                        self._counted.update(f.key for f in added)
                    except NetagentError as exc:
                        # the rules drifted under us: observe and converge the whole of it
                        log.info("firewall update failed; planning it whole", error=exc.message)
                        full = True
                if not full and (peers_added or peers_removed):
                    steps = [*steps, *await self._guard_update(spec, peers_added, peers_removed)]
                    full = self._full_guard
                if full:
                    if spec.lean_count is not None:
                        spec = self.spec(state)
                    steps = await self._full_sync(spec)
                if self.filters is not None:
                    look, self._look_filters = self._look_filters or full, False
                    steps = [*steps, *await self.filters.sync(spec, look)]
            self._synced_bridges = bridges
            self.pending = []
        except BaseException:
            self._full = True  # until a sync succeeds
            raise
        if removed and self.conntrack:
            walk = [f for f in removed if f.key not in idle]
            self.walks_skipped += len(removed) - len(walk)
            if len(walk) < len(removed):
                log.debug("no conntrack walk for idle forwards", idle=len(removed) - len(walk))
            if walk:
                steps = [*steps, *await self.clear_connections(walk)]
        return steps

    async def _guard_update(
        self, spec: FirewallSpec, added: set[str], removed: set[str]
    ) -> list[str]:
        """Peers came or went: the guard's elements alone, when the backend can
        (``plan_guard``); else (or when applying fails) a full sync follows."""
        self._full_guard = False
        want = spec.vxlan.peers if spec.vxlan is not None else frozenset()
        batch = self.backend.plan_guard(spec, added & want, removed - want)
        if batch is None:
            self._full_guard = True
            return []
        try:
            await self.backend.apply(batch)
        except NetagentError as exc:
            log.info("VXLAN guard update failed; planning it whole", error=exc.message)
            self._full_guard = True
            return []
        return batch.steps

    async def _idle(self, counted: list[Forward]) -> set[str]:
        """The keys of removed forwards that never carried a connection: counted since
        their rule was made (``counted``: in ``_counted``), and their counter still at
        zero. Their tracked connections need no walk of the conntrack table (~12 ms a
        dump). The counters are read before the rules go; when they cannot be, every one
        walks."""
        return _never_used(counted, await self.counters(counted))

    async def counters(self, forwards: Sequence[Forward]) -> dict[str, Counts] | None:
        """The backend's counters, or None (not counted, or the read failed: the
        counters are a help, never a reason for a request to fail)."""
        try:
            with anyio.fail_after(COUNTERS_TIMEOUT):
                return await self.backend.counters(forwards)
        except (NetagentError, OSError, TimeoutError) as exc:
            log.info("reading the forwards' counters failed", error=str(exc))
            return None

    async def _full_sync(self, spec: FirewallSpec) -> list[str]:
        observed = await self.backend.observe()
        batch = await self._plan(spec, observed)
        self.pending = batch.steps
        if batch.rebuild:
            self._counted.clear()
        else:
            self._counted.difference_update(batch.touched)
        try:
            await self.backend.apply(batch)
        except NetagentError as exc:
            if not spec.forwards:
                raise
            # one transaction is all or nothing: a forward the backend cannot take must
            # not keep every other one out; find it, refuse it, install the rest
            log.warning("a full firewall sync failed; isolating what it refuses", error=exc.message)
            self._counted.clear()
            return await self._isolate(spec)
        self.quarantined.clear()
        return batch.steps

    async def _isolate(self, spec: FirewallSpec) -> list[str]:
        """Install the bridges' rules, then the forwards in chunks as updates; a chunk
        that fails is halved until the forwards the backend refuses are found. Those are
        reported (``quarantined``, their keys fail) and retried at the next full sync."""
        base = FirewallSpec(forwards=(), bridges=spec.bridges, vxlan=spec.vxlan)
        batch = await self._plan(base, await self.backend.observe())
        await self.backend.apply(batch)  # if the bridges' own rules fail, that is the error
        installed: list[Forward] = []
        refused: dict[str, str] = {}

        async def add(group: list[Forward]) -> None:
            current = FirewallSpec(
                forwards=(*installed, *group), bridges=spec.bridges, vxlan=spec.vxlan
            )
            try:
                await self.backend.apply(self.backend.plan_update(current, group, []))
                installed.extend(group)
            except NetagentError as exc:
                if len(group) == 1:
                    refused[group[0].key] = exc.message
                    return
                half = len(group) // 2
                await add(group[:half])
                await add(group[half:])

        forwards = list(spec.forwards)
        for start in range(0, len(forwards), ISOLATE_CHUNK):
            await add(forwards[start : start + ISOLATE_CHUNK])
        self.quarantined.clear()
        self.quarantined.update(refused)
        for key, why in refused.items():
            self.bus.publish("refused", f"the firewall refuses {key}: {why}", key=key)
        return [
            f"installed {len(installed)} forwards and the bridges' rules; the firewall "
            f"refused {len(refused)}: {', '.join(sorted(refused)[:5])}"
        ]

    async def inspect(self, state: DesiredState) -> Batch[object]:
        """What a full sync would do now (nothing is changed)."""
        spec = self.spec(state)
        return await self._plan(spec, await self.backend.observe())

    # ---- conntrack ------------------------------------------------------------------
    async def clear_connections(self, forwards: list[Forward]) -> list[str]:
        """The tracked connections of removed or retargeted forwards are dropped, so
        their flows do not keep the old destination; done right after the rules change,
        so the request that removed them says how many. Over netlink
        (``backends/conntrack.py``), one kernel dump for all of them, in a worker thread
        (the kernel walks its whole conntrack table for a dump: ~12 ms here); the
        ``conntrack`` tool where the kernel cannot filter a dump."""
        if self._client is None:
            from netagent.backends import conntrack

            self._client = conntrack.Conntrack()
        steps = []
        for family in (4, 6):
            batch = [f for f in forwards if f.family == family]
            if batch:
                steps += await self._clear_batch(self._client, family, batch)
        return steps

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    async def _clear_batch(
        self, client: Conntrack, family: int, forwards: list[Forward]
    ) -> list[str]:
        from netagent.backends import conntrack

        flows: dict[conntrack.Flow, Forward] = {}
        for fwd in forwards:
            ip = fwd.dest_ip.packed
            proto = conntrack.PROTO[fwd.proto]
            for hport, dport in fwd.pairs():
                flows[(proto, hport, ip, dport)] = fwd
        counts: dict[str, int] = {}
        try:
            if self._tool_only is None:
                for flow, n in (await client.clear_flows(family, set(flows))).items():
                    counts[flows[flow].key] = counts.get(flows[flow].key, 0) + n
            elif self._tool_only:
                for fwd in forwards:
                    for hport, dport in fwd.pairs()[:64]:
                        n = await _clear_one(self._tool_only, fwd, hport, dport)
                        counts[fwd.key] = counts.get(fwd.key, 0) + n
        except conntrack.Unsupported:
            self._tool_only = shutil.which("conntrack") or ""
            return await self._clear_batch(client, family, forwards)  # with the tool
        except (OSError, TimeoutError) as exc:
            log.warning("clearing tracked connections failed", error=str(exc))
            return [f"could not clear tracked connections: {exc}"]
        steps = []
        for fwd in forwards:
            cleared = counts.get(fwd.key, 0)
            if cleared:
                steps.append(f"cleared {cleared} tracked connections of {fwd.describe()}")
                self.bus.publish(
                    "connections-cleared",
                    f"cleared {cleared} tracked connections of {fwd.describe()}",
                    key=fwd.key,
                    cleared=cleared,
                )
        return steps


def _never_used(counted: list[Forward], counts: dict[str, Counts] | None) -> set[str]:
    """The keys whose counter read zero (none when the counters could not be read)."""
    if counts is None:
        return set()
    return {f.key for f in counted if counts.get(f.key, (1, 0))[0] == 0}


def vxlan_guard(state: DesiredState) -> VxlanGuard | None:
    """The VXLAN device's port and every peer's underlay address (``agent/kinds``)."""
    devices = state.of_kind("vxlan") if state.kinds.get("vxlan") else []
    if not devices:
        return None
    vx: Any = min(devices, key=lambda d: d.key)
    # the peers' underlay addresses from the index (1,000 peers: a copy, not a walk)
    peers = frozenset(cast("list[str]", state.indexed("peer-underlay")))
    return VxlanGuard(device=vx.name, port=vx.port, peers=peers)


async def _clear_one(tool: str, fwd: Forward, hport: int, dport: int) -> int:
    """``conntrack -D`` for one port, from a worker thread (the fallback)."""
    argv = [
        tool,
        "-D",
        "-f",
        "ipv4" if fwd.family == 4 else "ipv6",
        "-p",
        fwd.proto,
        "--orig-port-dst",
        str(hport),
        "--reply-src",
        str(fwd.dest_ip),
        "--reply-port-src",
        str(dport),
    ]
    try:
        return await anyio.to_thread.run_sync(_run_conntrack, argv)
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("clearing conntrack entries failed", forward=fwd.key, error=str(exc))
        return 0


def _run_conntrack(argv: list[str]) -> int:
    done = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=CONNTRACK_TIMEOUT,
        check=False,
        env={"LANG": "C", "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin")},
    )
    # "conntrack v1.4.7 (conntrack-tools): 2 flow entries have been deleted."
    found = _DELETED.search(done.stderr)
    return int(found.group(1)) if found else 0
