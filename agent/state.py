"""Desired state: the intents netagent has acknowledged, and the rules between them.

Pure logic, no I/O. A change is first *proposed* (:meth:`DesiredState.propose`: the
request's validation runs against the state and the changes it would make are returned,
the state itself left exactly as it was), then made durable by the store, and only then
*committed* (:meth:`DesiredState.commit`). So whoever reads the state (the reconciler, the
event source, ``show``) sees only what is acknowledged or about to be, never a change a
failing request will take back.

The state knows intents only through their kinds (``agent/kinds``): what each needs, the
names it owns, the addresses it places, and the kind's own lookups, all kept in one
index, so the checks that span kinds are written once here.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Hashable, Iterable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar, cast

from .errors import AddressInUse, Conflict, InUse, NameTaken

T = TypeVar("T")

if TYPE_CHECKING:
    from .kinds import Registry
    from .kinds.base import Intent, Kind
    from .values import IPAddress


@dataclass(frozen=True)
class Change:
    key: str
    old: Intent | None
    new: Intent | None

    @property
    def action(self) -> str:
        if self.old is None:
            return "added"
        if self.new is None:
            return "removed"
        return "updated"

    def to_wire(self) -> dict[str, str]:
        item = self.new if self.new is not None else self.old
        assert item is not None
        return {"key": self.key, "action": self.action, "what": item.describe()}


def net_changes(changes: Iterable[Change]) -> list[Change]:
    """One change per key: the first old value against the last new one (a key added
    and removed again in one request did not change)."""
    changes = list(changes)
    if len({c.key for c in changes}) == len(changes):
        return changes  # one change per key (each a real change: _put/_delete skip no-ops)
    first: dict[str, Change] = {}
    last: dict[str, Change] = {}
    for c in changes:
        first.setdefault(c.key, c)
        last[c.key] = c
    out = []
    for key, c in first.items():
        new = last[key].new
        if c.old != new:
            out.append(Change(key, c.old, new))
    return out


class DesiredState:
    def __init__(
        self,
        kinds: Registry,
        external_namespace: Callable[[str], bool],
        name_in_use: Callable[[str | None, str, str], bool] | None = None,
    ) -> None:
        self.kinds = kinds
        #: (namespace or None, interface name, key) -> the kernel has an interface of that
        #: name that is not this key's (someone else's): names picked for new intents
        #: go round it
        self.name_in_use = name_in_use or (lambda _ns, _name, _key: False)
        self.intents: dict[str, Intent] = {}
        self._by_kind: dict[str, dict[str, Intent]] = {k.name: {} for k in kinds}
        #: bumped by every change of a kind: what is derived from a kind's intents is
        #: kept while this stays (``generation``)
        self._generation: dict[str, int] = {k.name: 0 for k in kinds}
        self._of_kind: dict[str, tuple[int, tuple[Intent, ...]]] = {}
        self._derived: dict[str, tuple[int, Any]] = {}
        #: index name -> value -> keys (see ``_entries``)
        self._index: dict[str, dict[Hashable, set[str]]] = defaultdict(dict)
        #: (segment, IP version) -> the addresses in use there, as integers: the
        #: "segment-ip" index seen by segment, kept with it (``used_on``)
        self._segment_ips: dict[tuple[str, int], set[int]] = defaultdict(set)
        #: (segment, IP version) -> (first, low): every address from ``first`` up to
        #: ``low`` is in use there (a lease's scan starts at ``low``; ``lease_start``)
        self._segment_low: dict[tuple[str, int], tuple[int, int]] = {}
        self._log: list[Change] | None = None
        self._memo: dict[str, tuple[Intent, list[tuple[str, Hashable]]]] = {}
        self._undoing = False
        self.external_namespace = external_namespace

    # ---- the index ------------------------------------------------------------------
    def _entries(self, intent: Intent, kind: Kind[Any] | None = None) -> list[tuple[str, Hashable]]:
        """What the index holds for an intent (asked of its kind once per intent
        object: a proposal puts, takes back and commits the same objects)."""
        memo = self._memo.get(intent.key)
        if memo is not None and memo[0] is intent:
            return memo[1]
        entries = self._compute_entries(intent, kind or self.kinds.of(intent))
        self._memo[intent.key] = (intent, entries)
        return entries

    @staticmethod
    def _compute_entries(intent: Intent, kind: Kind[Any]) -> list[tuple[str, Hashable]]:
        # 10,000 forwards in one apply: a relation the kind does not declare is not
        # asked, and an empty one costs a test, not a list built and joined
        has = kind.relations
        out: list[tuple[str, Hashable]] = []
        if "needs" in has:
            needs = kind.needs(intent)
            if needs:
                out += [("needs", k) for k in needs]
        if "names" in has:
            names = kind.names(intent)
            if names:
                out += [("name", n) for n in names]
        if "addresses" in has:
            for ns, segment, addr in kind.addresses(intent):
                out.append(("ns-addr", ns))
                out.append(("segment-ip", (segment, addr.ip)))
        if "namespaces" in has:
            namespaces = kind.namespaces(intent)
            if namespaces:
                out += [("ns", ns) for ns in namespaces]
        if "index" in has:
            out.extend(kind.index(intent))
        return out

    def needed(self) -> Mapping[Hashable, AbstractSet[str]]:
        """Each key some intent needs -> the keys of those that need it. Read only."""
        return self._index.get("needs", {})

    def lookup(self, name: str, value: Hashable) -> set[str]:
        """Keys of the intents indexed under (name, value); a copy."""
        index = self._index.get(name)
        return set(index.get(value, ())) if index else set()

    def has_indexed(self, name: str, value: Hashable) -> bool:
        index = self._index.get(name)
        return bool(index and index.get(value))

    def indexed(self, name: str) -> list[Hashable]:
        """The values an index holds (``indexed("ns")``: namespaces intents act in)."""
        return list(self._index.get(name, ()))

    def indexed_set(self, name: str) -> frozenset[Hashable]:
        """The values an index holds, as a snapshot: built from the index's dict, whose
        stored hashes it reuses (1,000 addresses: ~13 us, where hashing them again costs
        ~290: ``ipaddress`` hashes in Python)."""
        return frozenset(self._index.get(name, {}))

    def used_on(self, segment: str, version: int) -> AbstractSet[int]:
        """The IPv``version`` addresses intents use on ``segment``, as integers (a
        lease's scan compares integers: 1,000 containers on a bridge cost it
        microseconds, not a walk of every address on every segment). Read only."""
        return self._segment_ips.get((segment, version), frozenset())

    def lease_start(self, segment: str, version: int, first: int) -> int:
        """Where a lease's scan from ``first`` may start: every address below it (from
        ``first``) is in use on ``segment``. A freed address moves it back."""
        low = self._segment_low.get((segment, version))
        return low[1] if low is not None and low[0] == first else first

    def leased_from(self, segment: str, version: int, first: int, low: int) -> None:
        """A lease's scan found every address from ``first`` up to ``low`` in use."""
        self._segment_low[(segment, version)] = (first, low)

    # ---- low level: every mutation goes through these two ---------------------------
    def _put(self, intent: Intent, kind: Kind[Any] | None = None) -> Change | None:
        key = intent.key
        old = self.intents.get(key)
        if old is not None and old == intent:
            return None
        if old is not None:
            self._unindex(old)
        self.intents[key] = intent
        self._by_kind[intent.kind][key] = intent
        self._generation[intent.kind] += 1
        index = self._index
        for name, value in self._entries(intent, kind):
            values = index[name]
            keys = values.get(value)
            if keys is None:
                values[value] = {key}
                if name == "segment-ip":
                    self._note_ip(value, True)
            else:
                keys.add(key)
        change = Change(key, old, intent)
        if self._log is not None:
            self._log.append(change)
        return change

    def _delete(self, key: str) -> Change | None:
        old = self.intents.pop(key, None)
        if old is None:
            return None
        del self._by_kind[old.kind][key]
        self._generation[old.kind] += 1
        self._unindex(old)
        if self._log is None and not self._undoing:
            self._memo.pop(key, None)
        change = Change(key, old, None)
        if self._log is not None:
            self._log.append(change)
        return change

    def _unindex(self, intent: Intent) -> None:
        for name, value in self._entries(intent):
            index = self._index[name]
            keys = index.get(value)
            if keys is not None:
                keys.discard(intent.key)
                if not keys:
                    del index[value]
                    if name == "segment-ip":
                        self._note_ip(value, False)

    def _note_ip(self, value: Hashable, used: bool) -> None:
        segment, ip = cast("tuple[str, IPAddress]", value)
        where = (segment, ip.version)
        group = self._segment_ips[where]
        if used:
            group.add(int(ip))
        else:
            group.discard(int(ip))
            low = self._segment_low.get(where)
            if low is not None and int(ip) < low[1]:
                self._segment_low[where] = (low[0], max(low[0], int(ip)))

    # ---- transactions ---------------------------------------------------------------
    def propose(self, fn: Callable[[DesiredState], object]) -> list[Change]:
        """The changes ``fn`` makes, validated; the state is left as it was. Raises what
        ``fn`` raises (and nothing changed)."""
        changes = self.apply(fn)
        self.take_back(changes)
        return changes

    def apply(self, fn: Callable[[DesiredState], object]) -> list[Change]:
        """The changes ``fn`` makes, validated, and left made: the state, unless the
        caller takes them back (:meth:`take_back`) before anything else reads it. Raises
        what ``fn`` raises (and nothing changed)."""
        if self._log is not None:
            raise RuntimeError("proposals do not nest")
        log: list[Change] = []
        self._log = log
        try:
            fn(self)
        except BaseException:
            self._log = None
            self._restore(reversed(log))
            raise
        self._log = None
        return net_changes(log)

    def take_back(self, changes: list[Change]) -> None:
        """Undo changes that :meth:`apply` made (the state is as it was before)."""
        self._restore(reversed(changes))

    def _restore(self, changes: Iterable[Change]) -> None:
        self._undoing = True  # a commit may put the same objects back: keep the memo
        try:
            for change in changes:
                if change.old is None:
                    self._delete(change.key)
                else:
                    self._put(change.old)
        finally:
            self._undoing = False

    def commit(self, changes: Iterable[Change]) -> None:
        """Make proposed (and persisted) changes the state."""
        for c in changes:
            if c.new is None:
                self._delete(c.key)
            else:
                self._put(c.new)

    def load(self, pairs: Iterable[tuple[str, Intent | None]]) -> None:
        """Replay persisted changes as they were recorded (validated when first made)."""
        for key, intent in pairs:
            if intent is None:
                self._delete(key)
            else:
                self._put(intent)

    # ---- queries --------------------------------------------------------------------
    def get(self, key: str) -> Intent | None:
        return self.intents.get(key)

    def __contains__(self, key: object) -> bool:
        return key in self.intents

    def __len__(self) -> int:
        return len(self.intents)

    def of_kind(self, name: str) -> tuple[Intent, ...]:
        """The intents of one kind, in the order they came; one tuple per generation of
        the kind (a sync, the checks and a listing of 10,000 forwards ask for the same
        one, and a copy is ~40 us)."""
        generation = self._generation[name]
        held = self._of_kind.get(name)
        if held is not None and held[0] == generation:
            return held[1]
        value = tuple(self._by_kind[name].values())
        self._of_kind[name] = (generation, value)
        return value

    def generation(self, kind: str) -> int:
        return self._generation[kind]

    def derived(self, name: str, kind: str, compute: Callable[[], T]) -> T:
        """``compute()``, kept while the intents of ``kind`` do not change (something a
        kind works out from another kind's intents, asked once per item of a big
        request)."""
        generation = self._generation[kind]
        held = self._derived.get(name)
        if held is not None and held[0] == generation:
            value: T = held[1]
            return value
        value = compute()
        self._derived[name] = (generation, value)
        return value

    def count(self, name: str) -> int:
        return len(self._by_kind[name])

    def kind_of(self, key: str) -> Kind[Any] | None:
        intent = self.intents.get(key)
        return None if intent is None else self.kinds.of(intent)

    def dependents(self, key: str) -> list[Intent]:
        """The intents that need ``key``, in realize order."""
        found = [self.intents[k] for k in self.lookup("needs", key) if k in self.intents]
        return sorted(found, key=self.kinds.sort_key)

    def label(self, key: str) -> str:
        intent = self.intents.get(key)
        return key if intent is None else self.kinds.of(intent).label(intent)

    def name_owner(self, ns: str | None, ifname: str) -> str | None:
        owners = self.lookup("name", (ns, ifname))
        return min(owners) if owners else None

    def pick_name(self, ns: str | None, preferred: str, seed: str, key: str) -> str:
        """An interface name for ``key``: the seed's style (``veth-red``) when it fits in
        15 characters and is free, else a stable short hash of ``seed``."""
        from .glob import MAX_NAME
        from .values import short_hash

        if (
            len(preferred) <= MAX_NAME
            and self.name_owner(ns, preferred) in (None, key)
            and not self.name_in_use(ns, preferred, key)
        ):
            return preferred
        return f"na{short_hash(seed, 10)}"

    def in_namespace(self, ns: str) -> list[Intent]:
        """Intents acting in the named namespace (its own, plugs, wires ...)."""
        return [self.intents[k] for k in sorted(self.lookup("ns", ns))]

    def namespace_known(self, name: str) -> bool:
        return f"ns/{name}" in self.intents or self.external_namespace(name)

    # ---- changes, with the checks that span kinds -----------------------------------
    def put(self, intent: Intent) -> Change | None:
        """Add or replace an intent after checking what spans kinds: its names are free,
        its addresses are not used on its segment, and no namespace gets two
        overlapping subnets."""
        kind = self.kinds.of(intent)
        key = intent.key
        if "names" in kind.relations:
            for ns, ifname in kind.names(intent):
                owner = self.name_owner(ns, ifname)
                if owner is not None and owner != key:
                    where = f"{ifname} in {ns}" if ns else ifname
                    raise NameTaken(f"interface name {where} is already used by {owner}")
        for ns, segment, addr in kind.addresses(intent) if "addresses" in kind.relations else ():
            for user in sorted(self.lookup("segment-ip", (segment, addr.ip)) - {key}):
                raise AddressInUse(
                    f"{addr.ip} is already used on {self.label(segment)} by "
                    f"{self.label(user)} ({user}); pick another address",
                    conflicts_with=user,
                )
            for other_key in sorted(self.lookup("ns-addr", ns) - {key}):
                other = self.intents[other_key]
                for ons, _seg, theirs in self.kinds.of(other).addresses(other):
                    if ons != ns or theirs.version != addr.version:
                        continue
                    if theirs.network.overlaps(addr.network):
                        where = ns if ns else "the host"
                        raise Conflict(
                            f"{addr} for {key} overlaps {theirs} of {other_key} in {where}: "
                            f"overlapping subnets make {where}'s routing ambiguous; give "
                            f"each its own subnet, or remove {other_key} first",
                            conflicts_with=other_key,
                        )
        return self._put(intent, kind)

    def remove(self, key: str, what: str) -> Change | None:
        """Remove an intent that nothing else needs (else InUse, naming the first)."""
        users = self.dependents(key)
        if users:
            raise InUse(
                f"{what} is still used by {users[0].describe()}; remove that first",
                users=[u.key for u in users],
            )
        return self._delete(key)

    def forget(self, key: str) -> Change | None:
        """Remove without the dependency check (purge, prune: dependents go first)."""
        return self._delete(key)

    def check_references(self) -> None:
        """Every intent still has what it hangs on (after ``apply --prune``)."""
        for intent in self.intents.values():
            unmet = self.kinds.of(intent).unmet(self, intent)
            if unmet:
                raise InUse(
                    f"{intent.key} needs {unmet[0]}, which this change removes; "
                    "name it in the document too, or remove both"
                )

    def ordered(self, reverse: bool = False) -> list[Intent]:
        return sorted(self.intents.values(), key=self.kinds.sort_key, reverse=reverse)

    def to_wire(self) -> list[dict[str, Any]]:
        return [i.to_dict() for i in self.ordered()]
