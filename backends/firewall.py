"""The firewall backend interface and the registry that finds backends by name.

A backend realizes a :class:`FirewallSpec` (the forwards and the bridges' NAT needs) in
rules it owns, and nothing else. It is generic over what it observes (``ObservedT``) and
what a batch carries to :meth:`FirewallBackend.apply` (``PayloadT``), so the reconciler
never looks inside either. The reconciler calls, in this order:

``probe()``
    classmethod: is this backend usable on this host? ``(ok, why)``.
``observe()``
    read only what the backend owns. The one place a backend may keep a cache (an
    observation still valid because nothing changed), and only in a separate object.
``plan(spec, observed)``
    **pure**: desired + observed -> a :class:`Batch` (empty when nothing differs). The
    same arguments give the same batch, and nothing is remembered.
``plan_update(spec, added, removed)``
    **pure**: the smaller batch for forwards added/removed since the last sync, applied
    without observing first; if applying it fails the reconciler observes and plans.
``apply(batch)``
    one transaction: all of it or nothing.
``purge()``
    remove everything the backend owns (and nothing else); idempotent.
``drift_watcher()``
    what tells the reconciler that someone changed the backend's rules (or None: the
    periodic pass finds it).
``counters(forwards)``
    optional: packets and bytes per forward (None: not counted).

Third-party backends register under the entry point group ``netagent.firewall_backends``
(``name = "package.module:Class"``) and are then selectable with ``--firewall name``.
"""

from __future__ import annotations

import functools
import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, ClassVar, Generic, Protocol, TypeVar

import anyio

from netagent.agent.errors import BackendUnavailable, InvalidArgument, NetagentError

if TYPE_CHECKING:
    from netagent.agent import intents as I

ENTRY_POINT_GROUP = "netagent.firewall_backends"
BUILTIN: dict[str, str] = {
    "nftables": "netagent.backends.nftables:NftablesBackend",
    "iptables": "netagent.backends.iptables:IptablesBackend",
}
#: the order ``--firewall auto`` tries
AUTO_ORDER = ("nftables", "iptables")
#: seconds a backend's counters may take to read (they are a help, never a reason for a
#: request to fail)
COUNTERS_TIMEOUT = 5.0

ObservedT = TypeVar("ObservedT")
#: (packets, bytes)
Counts = tuple[int, int]
PayloadT = TypeVar("PayloadT")


@dataclass(frozen=True)
class VxlanGuard:
    """The cluster's needs: the VXLAN port open to the known peers' underlay addresses
    only (an open VXLAN port lets anyone inject frames into the overlay), and forwarded
    connections that leave through the VXLAN device (a forward to an address on
    another host's subnet) masqueraded, so the peer's replies come back through this
    host, where the connection's DNAT is undone."""

    device: str
    port: int
    #: the peers' underlay IPv4 addresses
    peers: frozenset[str] = frozenset()


@dataclass(frozen=True)
class FirewallSpec:
    """What the firewall must do: forwards in, masquerade/hairpin for bridges, the VXLAN
    port's guard."""

    forwards: tuple[I.Forward, ...] = ()
    bridges: tuple[I.Bridge, ...] = ()
    vxlan: VxlanGuard | None = None
    #: a lean spec, for an update that reads no forwards (``update_reads_forwards``):
    #: ``forwards`` left empty, and how many there are
    lean_count: int | None = None
    #: the forwards' destination addresses, each once, when the desired state keeps
    #: them (its index); None: read from ``forwards`` (see :meth:`destinations`)
    dest_ips: frozenset[I.IPAddress] | None = None

    @functools.cached_property
    def forward_ids(self) -> frozenset[int]:
        """The forwards' ``id``s, built once per spec (specs are compared by the identity
        of their forwards: the reconciler hands the same objects each time)."""
        return frozenset(map(id, self.forwards))

    def destinations(self) -> AbstractSet[I.IPAddress]:
        """Every forward's destination address, each once (a lean spec's too): with
        10,000 forwards to a few addresses, a few, not a pass over the 10,000."""
        if self.dest_ips is not None:
            return self.dest_ips
        return {f.dest_ip for f in self.forwards}

    @property
    def empty(self) -> bool:
        count = len(self.forwards) if self.lean_count is None else self.lean_count
        return not count and not self.bridges and self.vxlan is None


@dataclass
class Batch(Generic[PayloadT]):
    """A transaction a backend will run, with a human description of each step.

    ``rebuild``: the batch rewrites what every forward's path depends on (a table, a
    jump from a built-in chain); until it is applied no forward is in place.
    ``touched``: the keys of the forwards whose own rules or elements the batch adds or
    changes; until it is applied those are not in place. ``show`` asks :meth:`touches`.
    """

    steps: list[str] = field(default_factory=list)
    payload: PayloadT | None = None
    rebuild: bool = False
    touched: frozenset[str] = frozenset()

    @property
    def empty(self) -> bool:
        return not self.steps

    def touches(self, key: str) -> bool:
        return self.rebuild or key in self.touched


#: called by a drift watcher with a one-line description of the foreign change
DriftCallback = Callable[[str], None]


class DriftWatcher(Protocol):
    """Runs until cancelled; calls ``on_drift`` when someone else changed what the
    backend owns. It must never raise for a transient failure: it retries."""

    async def run(self, on_drift: DriftCallback) -> None: ...


class FirewallBackend(ABC, Generic[ObservedT, PayloadT]):
    name: ClassVar[str]
    #: the backend's own rules hold the localhost guard (CVE-2020-8558, see
    #: ``docs/backends.md``); when False the daemon writes it in the iptables filter
    #: table (``backends/xtfilter.py``), in the flavour ``xt_flavour`` names
    guards_localhost: ClassVar[bool] = False
    xt_flavour: str = "nft"
    #: ``plan_update`` reads ``spec.forwards`` (iptables: which blocks hold a forward);
    #: when False it is given a spec without them (a copy of 10,000 is ~0.1 ms a change)
    update_reads_forwards: ClassVar[bool] = True

    @classmethod
    @abstractmethod
    def probe(cls) -> tuple[bool, str]: ...

    @abstractmethod
    async def observe(self) -> ObservedT: ...

    @abstractmethod
    def plan(self, spec: FirewallSpec, observed: ObservedT) -> Batch[PayloadT]: ...

    @abstractmethod
    def plan_update(
        self, spec: FirewallSpec, added: list[I.Forward], removed: list[I.Forward]
    ) -> Batch[PayloadT]: ...

    def plan_guard(
        self, spec: FirewallSpec, added: set[str], removed: set[str]
    ) -> Batch[PayloadT] | None:
        """**pure**: the batch that adds and removes only these peers' underlay
        addresses in the VXLAN guard (a peer costs the same at 1,000 as at one); None:
        this backend does a full sync instead."""
        return None

    @abstractmethod
    async def apply(self, batch: Batch[PayloadT]) -> None: ...

    @abstractmethod
    async def purge(self) -> list[str]: ...

    def drift_watcher(self) -> DriftWatcher | None:
        """None: drift is found by the periodic pass only."""
        return None

    async def counters(self, forwards: Sequence[I.Forward]) -> dict[str, Counts] | None:
        """Optional: (packets, bytes) each forward's DNAT has counted, by key; None when
        the backend cannot tell (then every removal clears conntrack, and the counters
        are not shown). A forward that is not installed has no entry. A NAT rule sees
        the first packet of each connection only (established flows skip NAT), so these
        count connections' first packets, at no cost beyond the lookup."""
        return None

    async def apply_counted(
        self, batch: Batch[PayloadT], forwards: Sequence[I.Forward]
    ) -> dict[str, Counts] | None:
        """:meth:`apply`, and the counters of ``forwards`` as they were just before
        (None: not read; a read that fails is None, never a failed apply). This default
        is the two calls; a backend may make them one."""
        counts = None
        try:
            with anyio.move_on_after(COUNTERS_TIMEOUT):
                counts = await self.counters(forwards)
        except (OSError, NetagentError):
            pass
        await self.apply(batch)
        return counts

    async def close(self) -> None:
        """Release what the backend holds open (called once, at shutdown)."""


AnyBackend = FirewallBackend[object, object]


def _load(ref: str) -> type[AnyBackend]:
    module, _, attr = ref.partition(":")
    cls = getattr(importlib.import_module(module), attr)
    if not (isinstance(cls, type) and issubclass(cls, FirewallBackend)):
        raise TypeError(f"{ref} is not a FirewallBackend")
    return cls


def available() -> dict[str, str]:
    """Backend name -> "module:Class", built-ins first, then entry points."""
    found = dict(BUILTIN)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        found.setdefault(ep.name, ep.value)
    return found


def get_backend(name: str) -> type[AnyBackend]:
    refs = available()
    if name not in refs:
        raise InvalidArgument(
            f"unknown firewall backend {name!r}; known: {', '.join(sorted(refs))}, auto"
        )
    return _load(refs[name])


def choose_backend(name: str) -> tuple[type[AnyBackend], str]:
    """Resolve ``--firewall``: a name, or ``auto``. Returns the class and why it was chosen."""
    if name != "auto":
        cls = get_backend(name)
        ok, why = cls.probe()
        if not ok:
            raise BackendUnavailable(f"firewall backend {name} is not usable here: {why}")
        return cls, f"{name} requested"
    reasons: list[str] = []
    for candidate in AUTO_ORDER:
        cls = get_backend(candidate)
        ok, why = cls.probe()
        if ok:
            tail = f" ({'; '.join(reasons)})" if reasons else ""
            return cls, f"auto: {candidate} is usable: {why}{tail}"
        reasons.append(f"{candidate} not usable: {why}")
    raise BackendUnavailable("no firewall backend is usable: " + "; ".join(reasons))
