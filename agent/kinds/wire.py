"""Kind ``wire``: the seed's direct veth link between two namespaces.

``ifname_a`` in ``ns_a`` and ``ifname_b`` in ``ns_b``, each end created directly in its
namespace, addressed and up. The key sorts the two names, so ``wire red blue`` and
``wire blue red`` are one wire.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from netagent.backends.netlink import mac_for

from ..errors import (
    AddressInUse,
    BackendFailed,
    Conflict,
    InvalidAddress,
    InvalidArgument,
    NotFound,
)
from ..ops import WireAdd, WireDel
from ..schema import Request
from ..values import IPInterface, check_families, check_name, parse_interfaces
from .base import Actions, Context, Kind, OwnedName, Placed, want
from .linkops import ensure_addresses, ensure_lo_up, ensure_mark, ensure_up, refuse_foreign
from .namespace import ns_key
from .plug import announce, release_namespace

if TYPE_CHECKING:
    from ..state import DesiredState


@dataclass(frozen=True)
class Wire:
    kind: ClassVar[str] = "wire"
    ns_a: str
    addresses_a: tuple[IPInterface, ...]
    ns_b: str
    addresses_b: tuple[IPInterface, ...]
    ifname_a: str
    ifname_b: str

    def __post_init__(self) -> None:
        check_name(self.ns_a, "namespace name")
        check_name(self.ns_b, "namespace name")
        check_name(self.ifname_a, "interface name")
        check_name(self.ifname_b, "interface name")
        if self.ns_a == self.ns_b:
            raise InvalidArgument(f"wire {self.ns_a} to itself: give two different namespaces")
        check_families(self.addresses_a, f"wire {self.ns_a} address")
        check_families(self.addresses_b, f"wire {self.ns_b} address")

    @property
    def key(self) -> str:
        return wire_key(self.ns_a, self.ns_b)

    def ends(self) -> tuple[tuple[str, str, tuple[IPInterface, ...]], ...]:
        return (
            (self.ns_a, self.ifname_a, self.addresses_a),
            (self.ns_b, self.ifname_b, self.addresses_b),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "ns_a": self.ns_a,
            "addresses_a": [str(a) for a in self.addresses_a],
            "ns_b": self.ns_b,
            "addresses_b": [str(a) for a in self.addresses_b],
            "ifname_a": self.ifname_a,
            "ifname_b": self.ifname_b,
        }

    def describe(self) -> str:
        a = ", ".join(map(str, self.addresses_a))
        b = ", ".join(map(str, self.addresses_b))
        return f"{self.ns_a}:{self.ifname_a} ({a}) wired to {self.ns_b}:{self.ifname_b} ({b})"


def wire_key(ns_a: str, ns_b: str) -> str:
    first, second = sorted((ns_a, ns_b))
    return f"wire/{first}/{second}"


class WireKind(Kind[Wire]):
    name = "wire"
    key_prefix = "wire"
    order = 4
    plural = "wires"

    def from_dict(self, d: Mapping[str, Any]) -> Wire:
        return Wire(
            ns_a=want(d, "ns_a"),
            addresses_a=parse_interfaces(want(d, "addresses_a"), "address"),
            ns_b=want(d, "ns_b"),
            addresses_b=parse_interfaces(want(d, "addresses_b"), "address"),
            ifname_a=want(d, "ifname_a"),
            ifname_b=want(d, "ifname_b"),
        )

    def key_of(self, d: Mapping[str, Any]) -> str | None:
        return wire_key(str(d["ns_a"]), str(d["ns_b"]))

    def needs(self, intent: Wire) -> tuple[str, ...]:
        return (ns_key(intent.ns_a), ns_key(intent.ns_b))

    def names(self, intent: Wire) -> tuple[OwnedName, ...]:
        return ((intent.ns_a, intent.ifname_a), (intent.ns_b, intent.ifname_b))

    def addresses(self, intent: Wire) -> tuple[Placed, ...]:
        return tuple((ns, intent.key, a) for ns, _n, addrs in intent.ends() for a in addrs)

    def namespaces(self, intent: Wire) -> tuple[str, ...]:
        return (intent.ns_a, intent.ns_b)

    def unmet(self, state: DesiredState, intent: Wire) -> list[str]:
        return [
            f"namespace {n}" for n in (intent.ns_a, intent.ns_b) if not state.namespace_known(n)
        ]

    # ---- requests -------------------------------------------------------------------
    def add(self, state: DesiredState, req: Request) -> Wire:
        assert isinstance(req, WireAdd)
        ns_a, ns_b = req.ns_a, req.ns_b
        for ns in (ns_a, ns_b):
            if not state.namespace_known(ns):
                raise NotFound(f"namespace {ns} does not exist; create it with `ns add {ns}`")
        for a in req.addresses_a:
            for b in req.addresses_b:
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
        key = wire_key(ns_a, ns_b)
        existing = state.get(key)
        if isinstance(existing, Wire):
            asked = {(ns_a, req.addresses_a), (ns_b, req.addresses_b)}
            if {(ns, addrs) for ns, _n, addrs in existing.ends()} == asked:
                return existing
            raise Conflict(
                f"{ns_a} and {ns_b} are already wired ({existing.describe()}); "
                f"`unwire {ns_a} {ns_b}` first to change it"
            )
        name_a = state.pick_name(ns_a, f"veth-{ns_a}", key + "#a", key)
        name_b = state.pick_name(ns_b, f"veth-{ns_b}", key + "#b", key)
        return Wire(ns_a, req.addresses_a, ns_b, req.addresses_b, name_a, name_b)

    def delete(self, state: DesiredState, req: Request) -> list[str]:
        assert isinstance(req, WireDel)
        check_name(req.ns_a, "namespace name")
        key = wire_key(req.ns_a, req.ns_b)
        if key not in state:
            raise NotFound(f"{req.ns_a} and {req.ns_b} are not wired")
        return [key]

    # ---- the kernel -----------------------------------------------------------------
    async def _ensure(self, ctx: Context, wire: Wire, acts: Actions) -> list[str]:
        net = ctx.net
        for ns in (wire.ns_a, wire.ns_b):
            if not net.ns_exists(ns):
                raise NotFound(f"namespace {ns} does not exist")
        a = await net.link(wire.ns_a, wire.ifname_a)
        b = await net.link(wire.ns_b, wire.ifname_b)
        for link, ns in ((a, wire.ns_a), (b, wire.ns_b)):
            if link is not None:
                refuse_foreign(link, wire.key, f"{ns}:{link.name}")
        if (a is None) != (b is None):
            if a is not None and acts.add(f"delete stray {wire.ns_a}:{wire.ifname_a}"):
                await net.del_link(wire.ns_a, a.index)
            if b is not None and acts.add(f"delete stray {wire.ns_b}:{wire.ifname_b}"):
                await net.del_link(wire.ns_b, b.index)
            a = b = None
        if a is None:
            what = f"create veth {wire.ns_a}:{wire.ifname_a} <-> {wire.ns_b}:{wire.ifname_b}"
            if not acts.add(what):
                return acts.done
            await net.add_veth(
                wire.ifname_a,
                wire.ns_a,
                wire.ifname_b,
                wire.ns_b,
                mac=mac_for(wire.key, wire.ns_a),
                peer_mac=mac_for(wire.key, wire.ns_b),
            )
            for ns, name in ((wire.ns_a, wire.ifname_a), (wire.ns_b, wire.ifname_b)):
                if not net.announcing(ns):
                    await net.set_ns_sysctls(ns, announce(name))
            a = await net.link(wire.ns_a, wire.ifname_a)
            b = await net.link(wire.ns_b, wire.ifname_b)
            if a is None or b is None:
                raise BackendFailed("wire vanished right after creation")
        assert b is not None
        for link, (ns, _name, addrs) in zip((a, b), wire.ends(), strict=True):
            where = f"{ns}:{link.name}"
            await ensure_mark(net, ns, link, wire.key, acts)
            await ensure_addresses(net, ns, link, addrs, where, acts)
            await ensure_up(net, ns, link, where, acts)
            await ensure_lo_up(net, ns, acts)
        return acts.done

    async def ensure(self, ctx: Context, intent: Wire, old: Wire | None) -> list[str]:
        return await self._ensure(ctx, intent, Actions())

    async def inspect(self, ctx: Context, intent: Wire) -> list[str]:
        return await self._ensure(ctx, intent, Actions(dry_run=True))

    async def remove(self, ctx: Context, intent: Wire) -> list[str]:
        done = []
        for ns, name, _addrs in intent.ends():
            if not ctx.net.ns_exists(ns):
                continue
            link = await ctx.net.link(ns, name)
            if link is not None and link.belongs_to(intent.key):
                await ctx.net.del_link(ns, link.index)
                done.append(f"deleted {ns}:{name}")
        return done

    async def released(self, ctx: Context, intent: Wire) -> None:
        for ns in (intent.ns_a, intent.ns_b):
            await release_namespace(ctx, ns)
