"""Desired state: the intents netagent has acknowledged, with their conflict rules.

Pure logic, no I/O: every operation either raises a NetagentError and changes nothing, or
returns the list of changes it made (each a key with its old and new intent). The store
(``store.py``) persists those changes; the reconciler realizes them.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

from . import intents as I
from .errors import AddressInUse, Conflict, InUse, InvalidAddress, NameTaken, NotFound, PortInUse

T = TypeVar("T", bound=I.Intent)


@dataclass(frozen=True)
class Change:
    key: str
    old: I.Intent | None
    new: I.Intent | None

    @property
    def action(self) -> str:
        if self.old is None:
            return "added"
        if self.new is None:
            return "removed"
        return "updated"

    def to_wire(self) -> dict[str, Any]:
        item = self.new if self.new is not None else self.old
        assert item is not None
        return {"key": self.key, "action": self.action, "what": item.describe()}


class DesiredState:
    def __init__(self, external_namespace: Callable[[str], bool] | None = None) -> None:
        self.intents: dict[str, I.Intent] = {}
        # kind -> key -> intent: a kind's intents without scanning 10,000 forwards
        self._by_kind: dict[str, dict[str, I.Intent]] = {k: {} for k in I.INTENT_TYPES}
        self._fwd_families: dict[int, int] = {4: 0, 6: 0}
        # (proto, host port) -> keys of the forwards that cover it
        self._ports: dict[tuple[str, int], set[str]] = defaultdict(set)
        self._log: list[Change] | None = None
        self.external_namespace = external_namespace or (lambda _name: False)

    # ---- low level: every mutation goes through these two ---------------------------
    def _put(self, intent: I.Intent) -> Change | None:
        old = self.intents.get(intent.key)
        if old == intent:
            return None
        if isinstance(old, I.Forward):
            self._unindex(old)
        self.intents[intent.key] = intent
        self._by_kind[intent.kind][intent.key] = intent
        if isinstance(intent, I.Forward):
            self._fwd_families[intent.family] += 1
            for port in intent.host_ports:
                self._ports[(intent.proto, port)].add(intent.key)
        change = Change(intent.key, old, intent)
        if self._log is not None:
            self._log.append(change)
        return change

    def _delete(self, key: str) -> Change | None:
        old = self.intents.pop(key, None)
        if old is None:
            return None
        del self._by_kind[old.kind][key]
        if isinstance(old, I.Forward):
            self._unindex(old)
        change = Change(key, old, None)
        if self._log is not None:
            self._log.append(change)
        return change

    def _unindex(self, fwd: I.Forward) -> None:
        self._fwd_families[fwd.family] -= 1
        for port in fwd.host_ports:
            keys = self._ports.get((fwd.proto, port))
            if keys is not None:
                keys.discard(fwd.key)
                if not keys:
                    del self._ports[(fwd.proto, port)]

    def remove(self, key: str) -> Change | None:
        """Forget an intent without the dependency checks (purge, apply --prune: they
        remove dependents first)."""
        return self._delete(key)

    def load_changes(self, changes: list[tuple[str, I.Intent | None]]) -> None:
        """Replay persisted changes as they were recorded (no validation of conflicts:
        they were validated when first made)."""
        for key, intent in changes:
            if intent is None:
                self._delete(key)
            else:
                self._put(intent)

    @contextmanager
    def transaction(self) -> Iterator[list[Change]]:
        """Collect the changes of a block; if it raises, undo them all."""
        outer = self._log
        log: list[Change] = []
        self._log = log
        try:
            yield log
        except BaseException:
            self._log = None
            for change in reversed(log):
                if change.old is None:
                    self._delete(change.key)
                else:
                    self._put(change.old)
            raise
        finally:
            self._log = outer
        if outer is not None:
            outer.extend(log)

    # ---- queries --------------------------------------------------------------------
    def of_kind(self, cls: type[T]) -> list[T]:
        return list(self._by_kind[cls.kind].values())  # type: ignore[arg-type]

    def forward_families(self) -> set[int]:
        """The IP versions that have at least one forward."""
        return {v for v, n in self._fwd_families.items() if n}

    def get(self, key: str) -> I.Intent | None:
        return self.intents.get(key)

    def namespace_known(self, name: str) -> bool:
        return f"ns/{name}" in self.intents or self.external_namespace(name)

    def bridge(self, name: str) -> I.Bridge | None:
        br = self.intents.get(f"br/{name}")
        return br if isinstance(br, I.Bridge) else None

    def plugs_on(self, bridge: str) -> list[I.Plug]:
        return [p for p in self.of_kind(I.Plug) if p.bridge == bridge]

    def users_of_namespace(self, name: str) -> list[I.Intent]:
        users: list[I.Intent] = []
        for i in self.intents.values():
            if (isinstance(i, I.Plug) and i.ns == name) or (
                isinstance(i, I.Wire) and name in (i.ns_a, i.ns_b)
            ):
                users.append(i)
        return users

    def users_of_bridge(self, name: str) -> list[I.Intent]:
        return [
            i
            for i in self.intents.values()
            if isinstance(i, (I.Plug, I.AttachRule)) and i.bridge == name
        ]

    def ifnames_in(self, ns: str | None) -> dict[str, str]:
        """Interface names netagent gives out in a namespace (None: the host) -> key."""
        names: dict[str, str] = {}
        for i in self.intents.values():
            if isinstance(i, I.Plug):
                if i.ns == ns:
                    names[i.ifname] = i.key
                if ns is None:
                    names[i.host_ifname] = i.key
            elif isinstance(i, I.Wire):
                if i.ns_a == ns:
                    names[i.ifname_a] = i.key
                if i.ns_b == ns:
                    names[i.ifname_b] = i.key
            elif isinstance(i, I.Bridge) and ns is None:
                names[i.name] = i.key
        return names

    def forwards_covering(self, proto: str, port: int) -> list[I.Forward]:
        result = []
        for key in self._ports.get((proto, port), ()):
            fwd = self.intents[key]
            assert isinstance(fwd, I.Forward)
            result.append(fwd)
        return result

    # ---- namespaces -----------------------------------------------------------------
    def add_namespace(self, name: str) -> list[Change]:
        ns = I.Namespace(name)
        change = self._put(ns)
        return [change] if change else []

    def del_namespace(self, name: str) -> list[Change]:
        I.check_name(name, "namespace name")
        if f"ns/{name}" not in self.intents:
            raise NotFound(
                f"namespace {name} is not managed by netagent; `ns list` shows those that are"
            )
        users = self.users_of_namespace(name)
        if users:
            raise InUse(
                f"namespace {name} is still used by {users[0].describe()}; "
                f"remove that first (unplug/unwire)",
                users=[u.key for u in users],
            )
        change = self._delete(f"ns/{name}")
        return [change] if change else []

    # ---- bridges --------------------------------------------------------------------
    def add_bridge(
        self, name: str, addresses: tuple[I.IPInterface, ...] = (), masquerade: bool = False
    ) -> list[Change]:
        br = I.Bridge(name, addresses, masquerade)
        taken = self.ifnames_in(None).get(name)
        if taken is not None and taken != br.key:
            raise NameTaken(f"interface name {name} is already used by {taken}")
        # the new address must be free on the segment and keep every plug in its subnet
        for plug in self.plugs_on(name):
            for gw in br.addresses:
                for addr in plug.addresses:
                    if addr.version != gw.version:
                        continue
                    if addr.ip == gw.ip:
                        raise AddressInUse(
                            f"{gw.ip} is already used on {name} by {plug.key}; pick another address"
                        )
                    if addr.ip not in gw.network:
                        raise InvalidAddress(
                            f"{plug.key} at {addr} is outside {gw.network}; "
                            f"the bridge address must share the plugs' subnet"
                        )
        self._check_overlap(br)
        change = self._put(br)
        return [change] if change else []

    def _check_overlap(self, br: I.Bridge) -> None:
        """Two bridges with overlapping subnets make routing ambiguous."""
        for other in self.of_kind(I.Bridge):
            if other.name == br.name:
                continue
            for a in br.addresses:
                for b in other.addresses:
                    if a.version == b.version and a.network.overlaps(b.network):
                        raise Conflict(
                            f"bridge {br.name} at {a} overlaps bridge {other.name} at {b}; "
                            "give each bridge its own subnet"
                        )

    def del_bridge(self, name: str) -> list[Change]:
        I.check_name(name, "bridge name")
        if f"br/{name}" not in self.intents:
            raise NotFound(f"bridge {name} does not exist; `bridge list` shows the bridges")
        users = self.users_of_bridge(name)
        if users:
            raise InUse(
                f"bridge {name} is still used by {users[0].describe()}; remove that first",
                users=[u.key for u in users],
            )
        change = self._delete(f"br/{name}")
        return [change] if change else []

    # ---- plugs ----------------------------------------------------------------------
    def _require_namespace(self, name: str) -> None:
        I.check_name(name, "namespace name")
        if not self.namespace_known(name):
            raise NotFound(f"namespace {name} does not exist; create it with `ns add {name}`")

    def _require_bridge(self, name: str) -> I.Bridge:
        I.check_name(name, "bridge name")
        br = self.bridge(name)
        if br is None:
            raise NotFound(f"bridge {name} does not exist; create it with `bridge add {name}`")
        return br

    def _pick_name(
        self, preferred: str, fallback_seed: str, taken: dict[str, str], key: str
    ) -> str:
        if len(preferred) <= I.MAX_NAME and taken.get(preferred, key) == key:
            return preferred
        return f"na{I.short_hash(fallback_seed, 10)}"

    def _check_namespace_subnets(
        self, ns: str, addresses: tuple[I.IPInterface, ...], key: str
    ) -> None:
        """Two interfaces of one namespace in overlapping subnets make its routing
        ambiguous (the seed's wire and bridge both at 192.168.15.0/24): refuse it."""
        for other in self.users_of_namespace(ns):
            if other.key == key:
                continue
            if isinstance(other, I.Plug):
                theirs = other.addresses
            elif isinstance(other, I.Wire):
                theirs = other.addresses_a if other.ns_a == ns else other.addresses_b
            else:
                continue
            for a in addresses:
                for b in theirs:
                    if a.version == b.version and a.network.overlaps(b.network):
                        raise Conflict(
                            f"{ns} already has {b} through {other.key}, in an overlapping "
                            f"subnet; remove that first or use another subnet"
                        )

    def add_plug(
        self,
        ns: str,
        bridge: str,
        addresses: tuple[I.IPInterface, ...],
        ifname: str | None = None,
    ) -> list[Change]:
        self._require_namespace(ns)
        br = self._require_bridge(bridge)
        key = f"plug/{ns}/{bridge}"
        existing = self.intents.get(key)
        if not addresses:
            raise InvalidAddress(f"plug {ns} into {bridge}: give --address CIDR")
        for addr in addresses:
            gw = br.gateway(addr.version)
            if gw is not None and addr.ip not in gw.network:
                raise InvalidAddress(
                    f"{addr} is outside {bridge}'s subnet {gw.network}; "
                    f"pick an address in {gw.network}"
                )
            if gw is not None and addr.network != gw.network:
                raise InvalidAddress(
                    f"{addr} has another prefix length than {bridge}'s subnet {gw.network}; "
                    f"give it as {addr.ip}/{gw.network.prefixlen}"
                )
            if gw is not None and addr.ip == gw.ip:
                raise AddressInUse(f"{addr.ip} is {bridge}'s own address; pick another address")
            for other in self.plugs_on(bridge):
                if other.key != key and any(o.ip == addr.ip for o in other.addresses):
                    raise AddressInUse(
                        f"{addr.ip} is already used on {bridge} by {other.ns} ({other.key}); "
                        "pick another address"
                    )
        if ifname is not None:
            I.check_name(ifname, "interface name")
            if ifname == "lo":
                raise NameTaken("lo is the namespace's loopback; pick another --ifname")
        self._check_namespace_subnets(ns, addresses, key)
        if isinstance(existing, I.Plug):
            if existing.addresses == tuple(addresses) and ifname in (None, existing.ifname):
                return []
            raise Conflict(
                f"{ns} is already plugged into {bridge} ({existing.describe()}); "
                f"`unplug {ns} {bridge}` first to change it"
            )
        in_ns = self.ifnames_in(ns)
        if ifname is not None and ifname in in_ns:
            raise NameTaken(f"interface {ifname} in {ns} is already used by {in_ns[ifname]}")
        name = ifname or self._pick_name(f"veth-{ns}", key + "#ns", in_ns, key)
        host = self._pick_name(f"veth-{ns}-br", key + "#host", self.ifnames_in(None), key)
        plug = I.Plug(ns, bridge, tuple(addresses), name, host)
        change = self._put(plug)
        return [change] if change else []

    def del_plug(self, ns: str, bridge: str) -> list[Change]:
        I.check_name(ns, "namespace name")
        I.check_name(bridge, "bridge name")
        change = self._delete(f"plug/{ns}/{bridge}")
        if change is None:
            raise NotFound(f"{ns} is not plugged into {bridge}; `show` lists the plugs")
        return [change]

    # ---- wires ----------------------------------------------------------------------
    def add_wire(
        self,
        ns_a: str,
        addresses_a: tuple[I.IPInterface, ...],
        ns_b: str,
        addresses_b: tuple[I.IPInterface, ...],
    ) -> list[Change]:
        self._require_namespace(ns_a)
        self._require_namespace(ns_b)
        for a in addresses_a:
            for b in addresses_b:
                if a.version != b.version:
                    continue
                if a.ip == b.ip:
                    raise AddressInUse(
                        f"{a.ip} is given to both {ns_a} and {ns_b} on one link; "
                        f"give {ns_b} another address in {a.network}"
                    )
                if a.network != b.network:
                    raise InvalidAddress(
                        f"{a} and {b} are not in one subnet, so neither end has an on-link "
                        "route to the other; give both ends the same prefix"
                    )
        key = I.wire_key(ns_a, ns_b)
        self._check_namespace_subnets(ns_a, addresses_a, key)
        self._check_namespace_subnets(ns_b, addresses_b, key)
        existing = self.intents.get(key)
        if isinstance(existing, I.Wire):
            same = (existing.ns_a, existing.addresses_a, existing.addresses_b) == (
                ns_a,
                tuple(addresses_a),
                tuple(addresses_b),
            ) or (existing.ns_b, existing.addresses_b, existing.addresses_a) == (
                ns_a,
                tuple(addresses_a),
                tuple(addresses_b),
            )
            if same:
                return []
            raise Conflict(
                f"{ns_a} and {ns_b} are already wired ({existing.describe()}); "
                f"`unwire {ns_a} {ns_b}` first to change it"
            )
        name_a = self._pick_name(f"veth-{ns_a}", key + "#a", self.ifnames_in(ns_a), key)
        name_b = self._pick_name(f"veth-{ns_b}", key + "#b", self.ifnames_in(ns_b), key)
        wire = I.Wire(ns_a, tuple(addresses_a), ns_b, tuple(addresses_b), name_a, name_b)
        change = self._put(wire)
        return [change] if change else []

    def del_wire(self, ns_a: str, ns_b: str) -> list[Change]:
        I.check_name(ns_a, "namespace name")
        I.check_name(ns_b, "namespace name")
        change = self._delete(I.wire_key(ns_a, ns_b))
        if change is None:
            raise NotFound(f"{ns_a} and {ns_b} are not wired")
        return [change]

    # ---- attach rules ---------------------------------------------------------------
    def add_rule(self, pattern: str, bridge: str) -> list[Change]:
        rule = I.AttachRule(pattern, bridge)
        self._require_bridge(bridge)
        for other in self.of_kind(I.AttachRule):
            if other.bridge != bridge and I.patterns_overlap(pattern, other.pattern):
                raise Conflict(
                    f"pattern {pattern!r} can match the same interfaces as {other.pattern!r}, "
                    f"which attaches to {other.bridge}; make the patterns disjoint"
                )
        change = self._put(rule)
        return [change] if change else []

    def del_rule(self, pattern: str, bridge: str) -> list[Change]:
        rule = I.AttachRule(pattern, bridge)
        change = self._delete(rule.key)
        if change is None:
            raise NotFound(f"there is no rule {pattern!r} for {bridge}; `attach list` shows them")
        return [change]

    # ---- forwards -------------------------------------------------------------------
    def add_forward(self, fwd: I.Forward) -> list[Change]:
        for port in fwd.host_ports:
            for other in self.forwards_covering(fwd.proto, port):
                if other == fwd:
                    continue
                same_scope = other.family == fwd.family and (
                    other.host_ip is None or fwd.host_ip is None or other.host_ip == fwd.host_ip
                )
                if same_scope:
                    raise PortInUse(
                        f"host port {port}/{fwd.proto} is already forwarded "
                        f"({other.describe()}); `unforward {other.port_spec} --proto "
                        f"{other.proto}` first to retarget it",
                        conflicts_with=other.key,
                    )
        change = self._put(fwd)
        return [change] if change else []

    def del_forward(
        self, proto: I.Proto, host_port: int, count: int, host_ip: I.IPAddress | None
    ) -> list[Change]:
        """Remove the forward of these host ports, of both IP versions."""
        changes = []
        for family in (4, 6):
            change = self._delete(I.forward_key(proto, host_port, count, host_ip, family))
            if change is not None:
                changes.append(change)
        if not changes:
            covering = self.forwards_covering(proto, host_port)
            hint = f" (it is part of {covering[0].describe()})" if covering else ""
            raise NotFound(
                f"host port {I.port_spec(host_port, count)}/{proto} is not forwarded{hint}"
            )
        return changes

    # ---- whole documents ------------------------------------------------------------
    def check_references(self) -> None:
        """Every plug, wire and rule still has what it hangs on (after ``apply --prune``
        removed what a document did not name)."""
        for intent in self.intents.values():
            needs: list[tuple[str, bool]] = []
            if isinstance(intent, I.Plug):
                needs = [
                    (f"namespace {intent.ns}", self.namespace_known(intent.ns)),
                    (f"bridge {intent.bridge}", self.bridge(intent.bridge) is not None),
                ]
            elif isinstance(intent, I.Wire):
                needs = [
                    (f"namespace {n}", self.namespace_known(n)) for n in (intent.ns_a, intent.ns_b)
                ]
            elif isinstance(intent, I.AttachRule):
                needs = [(f"bridge {intent.bridge}", self.bridge(intent.bridge) is not None)]
            for what, present in needs:
                if not present:
                    raise InUse(
                        f"{intent.key} needs {what}, which this change removes; "
                        "name it in the document too, or remove both"
                    )

    def to_wire(self) -> list[dict[str, Any]]:
        order = {k: n for n, k in enumerate(I.KIND_ORDER)}
        items = sorted(self.intents.values(), key=lambda i: (order[i.kind], i.key))
        return [i.to_dict() for i in items]
