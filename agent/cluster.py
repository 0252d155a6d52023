"""The cluster room: this host's subnet lease in etcd, the other hosts' leases, and the
intents they become.

flannel's way (``pkg/subnet/etcd``, ``pkg/backend/vxlan``), in netagent's rooms:

* **join**: the shared settings are written once (create-if-absent) and compared; a
  lease is granted; a subnet is claimed with a create-if-absent transaction (at random
  among the free ones; the lost race tries again), or taken back: the subnet this
  host's desired state already holds, or a record with this host's node id or underlay
  address (a restart after ``kill -9``, whose old lease still holds the key), is
  replaced under the new lease with a transaction on its ``mod_revision``. The cluster
  bridge (its gateway is the subnet's first address) and the VXLAN device are then
  committed like any request: propose, journal, commit, one reconcile pass.
* **keep**: a keep-alive every TTL/3. etcd unreachable is not the lease lost: the data
  plane stays as it is and the keep-alive goes on; etcd answering TTL 0 is (the lease
  expired while this host could not reach a quorum): join again, same subnet first.
* **watch**: list the subnets, then watch from the listing's revision + 1; a watch that
  ends (compaction, a member's INTERNAL stream end), or etcd coming back after being
  unreachable, lists again: a full resync, in which every peer is keyed by its subnet,
  so none is lost or duplicated.
* **peers**: what was seen becomes ``peer`` intents (``agent/kinds/peer.py``), committed
  through the same journal. Peers are journaled although etcd is their truth: a daemon
  restarted while etcd is unreachable then keeps its routes, instead of finding them as
  orphans and removing them at start.
* **leave**: on a clean stop the lease is revoked, so the others remove this host at once
  instead of a TTL later; links and routes stay (the data plane outlives the daemon).
"""

from __future__ import annotations

import ipaddress
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import anyio
import structlog

from netagent.backends.etcd import ClusterStore, KeyValue, StoreError

from . import ops
from .errors import BackendFailed, InvalidArgument, NetagentError
from .kinds.bridge import Bridge, bridge_key
from .kinds.peer import Peer, peer_key
from .kinds.vxlan import Vxlan, vxlan_key
from .subnets import Record, Settings, gateway, pick, vtep_mac

if TYPE_CHECKING:
    from netagent.backends.netlink import Netlink

    from .bus import EventBus
    from .state import DesiredState

log = structlog.get_logger("netagent.cluster")


class Mutate(Protocol):
    """``Service.mutate``: the peers' changes are ``mirror`` ones (etcd keeps them)."""

    def __call__(
        self, fn: Callable[[DesiredState], object], *, mirror: bool = False
    ) -> Awaitable[dict[str, Any]]: ...


#: seconds between tries while etcd does not answer, or refuses to let this host join
RETRY = 1.0
CONFLICT_RETRY = 10.0


class JoinRefused(Exception):
    """Joining cannot work as configured (the message says why and what to do)."""


@dataclass
class Seen:
    """A peer's record as this host last saw it in etcd."""

    kv: KeyValue
    record: Record | None
    #: why the record is not used (None: it is)
    invalid: str | None
    #: when this host first saw this lease of it (time.time())
    first_seen: float
    #: the intent it asks for (None: none; made once, not at every sync)
    peer: Peer | None = None


class Cluster:
    def __init__(
        self,
        settings: Settings,
        store: ClusterStore,
        state: DesiredState,
        net: Netlink,
        bus: EventBus,
        node: str,
        status_of: Callable[[str], str | None],
        *,
        keepalive_interval: float | None = None,
        retry: float = RETRY,
        conflict_retry: float = CONFLICT_RETRY,
    ) -> None:
        self.settings = settings
        self.store = store
        self.state = state
        self.net = net
        self.bus = bus
        self.node = node
        #: key -> its reconcile state (``in place``, ...), from the reconciler
        self.status_of = status_of
        self.host = settings.host or socket.gethostname()
        #: seconds between keep-alives (a third of the TTL), and between tries
        self.keepalive_interval = keepalive_interval or max(1.0, settings.lease_ttl / 3)
        self.retry = retry
        self.conflict_retry = conflict_retry
        self.underlay: str | None = settings.underlay
        #: None: not asked yet; then whether the last call to etcd was answered
        self.reachable: bool | None = None
        self.error: str | None = None
        self.since = time.time()
        self.lease: int | None = None
        self.subnet: ipaddress.IPv4Network | None = None
        self.joined_at: float | None = None
        self.seen: dict[ipaddress.IPv4Network, Seen] = {}
        self.listed_at: float | None = None
        #: a listing was taken since the last join: only then are peers synced (what
        #: was seen before is not known to be complete)
        self._listed = False
        self.resyncs = 0
        self.last_sync: dict[str, Any] = {}
        self._mutate: Mutate | None = None
        self._dirty = anyio.Event()
        self._dirty_since: float | None = None
        self._relist: anyio.CancelScope | None = None
        #: subnets seen changing since the last sync (None: compare them all)
        self._changed: set[ipaddress.IPv4Network] | None = None

    # ---- reachability ---------------------------------------------------------------
    def _answered(self, resync: bool = True) -> None:
        was = self.reachable
        self.reachable, self.error = True, None
        if was is not True:
            self.since = time.time()
            if was is False:
                log.info("etcd is reachable again; resyncing")
                self.bus.publish("cluster-reachable", "etcd is reachable again; full resync")
                if resync:
                    self.resync()

    def _unanswered(self, exc: BaseException) -> None:
        was = self.reachable
        self.reachable, self.error = False, str(exc)
        if was is not False:
            self.since = time.time()
            log.warning("etcd is unreachable; the data plane stays as it is", error=str(exc))
            self.bus.publish("cluster-unreachable", f"etcd is unreachable: {exc}")

    def resync(self) -> None:
        """List everything again (the watch in progress is dropped)."""
        if self._relist is not None:
            self._relist.cancel()

    # ---- the room's life ------------------------------------------------------------
    async def run(self, mutate: Mutate) -> None:
        """Join, keep the lease, watch; until cancelled (then revoke the lease)."""
        self._mutate = mutate
        store = self.store
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._sync_loop)
                while True:
                    try:
                        await self._join(store)
                        async with anyio.create_task_group() as inner:
                            inner.start_soon(self._watch_loop, store)
                            await self._keep(store)  # returns when the lease is lost
                            inner.cancel_scope.cancel()
                    except StoreError as exc:
                        self._unanswered(exc)
                        await anyio.sleep(self.retry)
                    except (JoinRefused, NetagentError) as exc:
                        message = exc.message if isinstance(exc, NetagentError) else str(exc)
                        self.error = message
                        log.error("cannot join the cluster", error=message)
                        self.bus.publish("cluster-refused", message)
                        await anyio.sleep(self.conflict_retry)
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(3):
                await self._leave(store)

    async def _leave(self, store: ClusterStore) -> None:
        if self.lease is not None:
            try:
                await store.revoke(self.lease)
                log.info("left the cluster: lease revoked", subnet=str(self.subnet))
            except StoreError as exc:
                log.warning("could not revoke the lease; it expires by itself", error=str(exc))
            self.lease = None
        await store.close()

    # ---- join -----------------------------------------------------------------------
    async def _find_underlay(self) -> str:
        """``--underlay``, or the address of the interface the default route uses."""
        if self.settings.underlay:
            return self.settings.underlay
        for route in await self.net.default_routes(None, 4):
            if route.oif is not None:
                for addr in sorted(await self.net.addresses(None, route.oif)):
                    if addr.version == 4:
                        return str(addr.ip)
        raise JoinRefused(
            "no default route to find this host's underlay address by; give --underlay"
        )

    async def _check_shared(self, store: ClusterStore) -> None:
        import json

        want = self.settings.shared()
        key = self.settings.config_key
        if await store.create(key, json.dumps(want, sort_keys=True).encode(), 0):
            return
        _rev, kvs = await store.list_prefix(key)
        have = next((kv for kv in kvs if kv.key == key), None)
        try:
            theirs = json.loads(have.value) if have is not None else want
        except ValueError:
            theirs = None
        if theirs != want:
            raise JoinRefused(
                f"the cluster's settings in etcd ({key}: {theirs}) differ from this host's "
                f"({want}); start every host with the same --cluster-cidr, "
                "--cluster-subnet-len, --cluster-vni and --cluster-port"
            )

    def _held(self) -> ipaddress.IPv4Network | None:
        """The subnet the desired state already holds (the VXLAN device's)."""
        vx = self.state.get(vxlan_key(self.settings.device))
        return vx.subnet if isinstance(vx, Vxlan) else None

    def _own_missing(self) -> bool:
        """The cluster's bridge or VXLAN device is not desired (a purge, an apply
        --prune): while this host holds a subnet they are put back."""
        return self.subnet is not None and (
            vxlan_key(self.settings.device) not in self.state
            or bridge_key(self.settings.bridge) not in self.state
        )

    def _plugged(self) -> bool:
        return any(
            u.kind == "plug" for u in self.state.dependents(bridge_key(self.settings.bridge))
        )

    async def _join(self, store: ClusterStore) -> None:
        self._listed = False
        self.underlay = await self._find_underlay()
        await self._check_shared(store)
        self._answered()
        lease = await store.grant(self.settings.lease_ttl)
        self.lease = lease
        subnet = await self._claim(store, lease)
        self.subnet = subnet
        self.joined_at = time.time()
        log.info("joined the cluster", subnet=str(subnet), lease=f"{lease:x}", node=self.node)
        self.bus.publish("cluster-joined", f"holding {subnet} (lease {lease:x})")
        await self._commit_own(subnet)

    def _record(self, subnet: ipaddress.IPv4Network) -> bytes:
        assert self.underlay is not None
        s = self.settings
        rec = Record(self.node, self.host, self.underlay, vtep_mac(subnet), s.vni, s.port)
        return rec.encode()

    def _mine(self, kv: KeyValue) -> bool:
        try:
            rec = Record.decode(kv.value)
        except InvalidArgument:
            return False
        return rec.node == self.node or (rec.underlay == self.underlay and rec.host == self.host)

    async def _claim(self, store: ClusterStore, lease: int) -> ipaddress.IPv4Network:
        s = self.settings
        for _attempt in range(16):
            _rev, kvs = await store.list_prefix(s.subnets_prefix)
            taken = {net: kv for kv in kvs if (net := s.subnet_of(kv.key)) is not None}
            held = self._held()
            if held is not None and held.prefixlen == s.subnet_len and held.subnet_of(s.cidr):
                kv = taken.get(held)
                if kv is None:
                    if await store.create(s.subnet_key(held), self._record(held), lease):
                        return held
                    continue  # taken meanwhile: look again
                if self._mine(kv):
                    if await store.replace(
                        s.subnet_key(held), self._record(held), lease, kv.mod_revision
                    ):
                        return held
                    continue
                if self._plugged():
                    raise JoinRefused(
                        f"this host's subnet {held} is now held by another host ({kv.value!r}); "
                        f"namespaces on {s.bridge} use it, so this host keeps its data plane "
                        "and does not join: unplug them to take a new subnet"
                    )
            for net, kv in sorted(taken.items()):
                # our record from before the state was lost
                if self._mine(kv) and await store.replace(
                    s.subnet_key(net), self._record(net), lease, kv.mod_revision
                ):
                    return net
            free = pick(n for n in s.candidates() if n not in taken)
            if free is None:
                raise JoinRefused(
                    f"every subnet of {s.cidr} is leased; give --cluster-cidr a larger range"
                )
            if await store.create(s.subnet_key(free), self._record(free), lease):
                return free
        raise StoreError("could not claim a subnet in 16 tries (too many hosts racing)")

    async def _commit_own(self, subnet: ipaddress.IPv4Network) -> None:
        """The cluster bridge with the subnet's gateway, and the VXLAN device."""
        assert self._mutate is not None and self.underlay is not None
        s = self.settings
        vx = Vxlan(s.device, s.vni, s.port, self.underlay, subnet, vtep_mac(subnet))
        gw = gateway(subnet)

        def change(st: DesiredState) -> None:
            kind = st.kinds.get("bridge")
            assert kind is not None
            old = st.get(bridge_key(s.bridge))
            masquerade = isinstance(old, Bridge) and old.masquerade
            args: dict[str, object] = {"name": s.bridge, "addresses": [str(gw)]}
            if masquerade:
                args["masquerade"] = True
            st.put(kind.add(st, ops.BridgeAdd.parse(args)))
            st.put(vx)

        await self._mutate(change)
        self._mark_dirty()

    # ---- keep -----------------------------------------------------------------------
    async def _keep(self, store: ClusterStore) -> None:
        """Renew every TTL/3 (1 s while etcd does not answer); return when etcd says the
        lease is gone."""
        assert self.lease is not None
        interval = self.keepalive_interval
        wait = interval
        while True:
            await anyio.sleep(wait)
            try:
                left = await store.keepalive(self.lease)
            except StoreError as exc:
                self._unanswered(exc)
                wait = min(self.retry, interval)
                continue
            self._answered()
            wait = interval
            if self._own_missing():
                self._mark_dirty()  # purged, or pruned: the sync puts them back
            if left <= 0:
                log.warning("the lease expired (etcd was out of reach); joining again")
                self.bus.publish("cluster-lease-lost", f"lease {self.lease:x} expired; rejoining")
                self.lease = None
                return

    # ---- watch ----------------------------------------------------------------------
    async def _watch_loop(self, store: ClusterStore) -> None:
        prefix = self.settings.subnets_prefix
        while True:
            try:
                rev, kvs = await store.list_prefix(prefix)
            except StoreError as exc:
                self._unanswered(exc)
                await anyio.sleep(self.retry)
                continue
            self._answered(resync=False)  # this listing is the resync
            self._take_listing(kvs)
            try:
                with anyio.CancelScope() as scope:
                    self._relist = scope
                    async for events in store.watch(prefix, rev + 1):
                        self._answered(resync=False)  # events are etcd answering too
                        for ev in events:
                            self._take(ev.kv, deleted=ev.kind == "delete")
                        self._mark_dirty()
            except StoreError as exc:
                log.info("the watch ended; listing again", error=str(exc))
                await anyio.sleep(self.retry)
            finally:
                self._relist = None
            self.resyncs += 1

    def _take_listing(self, kvs: list[KeyValue]) -> None:
        now = set()
        for kv in kvs:
            net = self._take(kv, deleted=False)
            if net is not None:
                now.add(net)
        for gone in set(self.seen) - now:
            del self.seen[gone]
        self.listed_at = time.time()
        self._listed = True
        self._changed = None  # compare everything
        self._mark_dirty()

    def _take(self, kv: KeyValue, deleted: bool) -> ipaddress.IPv4Network | None:
        net = self.settings.subnet_of(kv.key)
        if net is None:
            return None
        if deleted:
            self.seen.pop(net, None)
            if self._changed is not None:
                self._changed.add(net)
            return net
        old = self.seen.get(net)
        first = (
            old.first_seen
            if old is not None and old.kv.create_revision == kv.create_revision
            else time.time()
        )
        record: Record | None = None
        why: str | None = None
        try:
            record = Record.decode(kv.value)
            if (record.vni, record.port) != (self.settings.vni, self.settings.port):
                why = (
                    f"it uses VNI {record.vni} port {record.port}; this host "
                    f"{self.settings.vni} {self.settings.port}"
                )
        except InvalidArgument as exc:
            why = f"its record is not valid: {exc.message}"
        peer = None
        if record is not None and why is None and record.node != self.node:
            # (a record of this host's own node id is an old one, left to expire)
            try:
                peer = Peer(
                    net, record.underlay, record.vtep_mac, record.host, self.settings.device
                )
            except InvalidArgument as exc:
                why = f"its record is not valid: {exc.message}"
        self.seen[net] = Seen(kv, record, why, first, peer)
        if self._changed is not None:
            self._changed.add(net)
        return net

    # ---- peers into intents ---------------------------------------------------------
    def _mark_dirty(self) -> None:
        if self._dirty_since is None:
            self._dirty_since = time.perf_counter()
        self._dirty.set()

    def _wanted(self, net: ipaddress.IPv4Network) -> Peer | None:
        seen = self.seen.get(net)
        return None if seen is None or net == self.subnet else seen.peer

    def wanted(self) -> dict[str, Peer]:
        """The peer intents what was seen asks for (not this host's own subnet)."""
        return {p.key: p for net in self.seen if (p := self._wanted(net)) is not None}

    async def _sync_loop(self) -> None:
        while True:
            await self._dirty.wait()
            self._dirty = anyio.Event()
            if self.subnet is None or self._mutate is None or not self._listed:
                continue  # not joined, or not listed since: that marks dirty again
            started, self._dirty_since = self._dirty_since, None
            if self._own_missing():
                try:
                    await self._commit_own(self.subnet)
                except NetagentError as exc:
                    log.warning("the cluster's bridge and device not back yet", error=exc.message)
                self._changed = None  # and every peer with them
            changed, self._changed = self._changed, set()
            if changed is None:  # a listing: everything
                want = self.wanted()
                have = {p.key: p for p in self.state.of_kind("peer")}
            else:  # the watch's events: only what they named (1 of 1,000 costs 1)
                want, have = {}, {}
                for net in changed:
                    key = peer_key(net)
                    if (p := self._wanted(net)) is not None:
                        want[key] = p
                    if (h := self.state.get(key)) is not None:
                        have[key] = h
            if want == have:
                continue

            change = _peer_change(want, have)
            added = len(want.keys() - have.keys())
            removed = len(have.keys() - want.keys())
            try:
                await self._mutate(change, mirror=True)
            except BackendFailed as exc:  # recorded, not in place yet: the reconciler retries
                log.warning("peers not all in place yet", error=exc.message)
            except NetagentError as exc:  # refused: compare everything next time
                log.error("peers could not be recorded", error=exc.message)
                self._changed = None
            ms = (time.perf_counter() - (started or time.perf_counter())) * 1000
            self.last_sync = {
                "added": added,
                "removed": removed,
                "updated": len(want) - added - (len(have) - removed),
                "ms": round(ms, 2),
                "at": time.time(),
            }
            log.info("peers synced", **self.last_sync)

    # ---- what status and ``ctl peers`` show -----------------------------------------
    def status(self) -> dict[str, Any]:
        peers = self.state.of_kind("peer")
        in_place = sum(1 for p in peers if self.status_of(p.key) == "in place")
        state = {None: "connecting", True: "reachable", False: "unreachable"}[self.reachable]
        return {
            "etcd": state,
            "etcd_since": round(self.since, 3),
            "error": self.error,
            "endpoints": list(self.settings.endpoints),
            "node": self.node,
            "host": self.host,
            "underlay": self.underlay,
            "subnet": str(self.subnet) if self.subnet else None,
            "lease": f"{self.lease:x}" if self.lease is not None else None,
            "lease_ttl": self.settings.lease_ttl,
            "device": self.settings.device,
            "bridge": self.settings.bridge,
            "peers": len(peers),
            "peers_in_place": in_place,
            "resyncs": self.resyncs,
            "last_sync": self.last_sync,
        }

    def peers(self) -> list[dict[str, Any]]:
        now = time.time()
        rows = []
        for peer in sorted(self.state.of_kind("peer"), key=lambda p: p.key):
            assert isinstance(peer, Peer)
            seen = self.seen.get(peer.subnet)
            st = self.status_of(peer.key)
            rows.append(
                {
                    "host": peer.host,
                    "subnet": str(peer.subnet),
                    "underlay": peer.underlay,
                    "vtep_mac": peer.mac,
                    "lease": f"{seen.kv.lease:x}" if seen is not None else None,
                    "lease_age": round(now - seen.first_seen, 1) if seen is not None else None,
                    "in_place": st == "in place",
                    "state": st or "pending",
                    "in_etcd": seen is not None,
                }
            )
        for net, seen in sorted(self.seen.items()):
            if seen.invalid is not None:
                rows.append(
                    {
                        "host": seen.record.host if seen.record else "",
                        "subnet": str(net),
                        "underlay": seen.record.underlay if seen.record else None,
                        "vtep_mac": seen.record.vtep_mac if seen.record else None,
                        "lease": f"{seen.kv.lease:x}",
                        "lease_age": round(now - seen.first_seen, 1),
                        "in_place": False,
                        "state": "refused",
                        "error": seen.invalid,
                        "in_etcd": True,
                    }
                )
        return rows


def _peer_change(want: dict[str, Peer], have: dict[str, Any]) -> Callable[[DesiredState], None]:
    """Put the peers wanted that differ, forget the ones no longer wanted."""

    def change(st: DesiredState) -> None:
        for key in have.keys() - want.keys():
            st.forget(key)
        for key, peer in want.items():
            if have.get(key) != peer:
                st.put(peer)

    return change
