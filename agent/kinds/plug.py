"""Kind ``plug``: a namespace plugged into a bridge.

A veth pair: ``ifname`` created directly inside the namespace (addressed, up, ``lo`` up, a
default route via the bridge's address of each IP version), ``host_ifname`` enslaved to the
bridge and up. Names follow the seed (``veth-red`` inside, ``veth-red-br`` on the host)
when they fit in 15 characters, else a stable short hash. The namespace may be netagent's
(``ns add``) or someone else's that exists under ``/run/netns``: it is used, never taken.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from netagent.backends.netlink import Link, alias_for, mac_for

from ..errors import (
    AddressInUse,
    BadRequest,
    Conflict,
    InvalidAddress,
    NameTaken,
    NotFound,
)
from ..ops import PlugAdd, PlugDel
from ..schema import Request
from ..values import IPInterface, check_families, check_name, parse_interfaces
from .base import Actions, Context, Kind, OwnedName, Placed, want
from .bridge import Bridge, bridge_key
from .leases import lease
from .linkops import (
    BridgedPair,
    ensure_bridged_pair,
    gather,
    new_pair,
)
from .namespace import ns_key

if TYPE_CHECKING:
    from ..linkcache import LinkCache
    from ..state import DesiredState


@dataclass(frozen=True)
class Plug:
    kind: ClassVar[str] = "plug"
    ns: str
    bridge: str
    addresses: tuple[IPInterface, ...]
    ifname: str
    host_ifname: str

    def __post_init__(self) -> None:
        check_name(self.ns, "namespace name")
        check_name(self.bridge, "bridge name")
        check_name(self.ifname, "interface name")
        check_name(self.host_ifname, "interface name")
        if not self.addresses:
            raise InvalidAddress(f"plug {self.ns} into {self.bridge}: give --address CIDR")
        check_families(self.addresses, f"plug {self.ns} address")

    @property
    def key(self) -> str:
        return plug_key(self.ns, self.bridge)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "ns": self.ns,
            "bridge": self.bridge,
            "addresses": [str(a) for a in self.addresses],
            "ifname": self.ifname,
            "host_ifname": self.host_ifname,
        }

    def describe(self) -> str:
        addrs = ", ".join(map(str, self.addresses))
        return (
            f"{self.ns}:{self.ifname} at {addrs} plugged into {self.bridge} via {self.host_ifname}"
        )


def plug_key(ns: str, bridge: str) -> str:
    return f"plug/{ns}/{bridge}"


def announce(ifname: str) -> dict[str, str]:
    """The sysctls that make an interface announce its addresses when it comes up."""
    return {
        f"net/ipv4/conf/{ifname}/arp_notify": "1",
        f"net/ipv6/conf/{ifname}/ndisc_notify": "1",
    }


def check_in_subnet(addr: IPInterface, br: Bridge) -> None:
    """A plug's address belongs in its bridge's subnet, with the same prefix."""
    gw = br.gateway(addr.version)
    if gw is None:
        return
    if addr.ip not in gw.network:
        raise InvalidAddress(
            f"{addr} is outside {br.name}'s subnet {gw.network}; pick an address in {gw.network}"
        )
    if addr.network != gw.network:
        raise InvalidAddress(
            f"{addr} has another prefix length than {br.name}'s subnet {gw.network}; "
            f"give it as {addr.ip}/{gw.network.prefixlen}"
        )
    if addr.ip == gw.ip:
        raise AddressInUse(f"{addr.ip} is {br.name}'s own address; pick another address")


def require_bridge(state: DesiredState, name: str) -> Bridge:
    br = state.get(bridge_key(name))
    if not isinstance(br, Bridge):
        raise NotFound(f"bridge {name} does not exist; create it with `bridge add {name}`")
    return br


class PlugKind(Kind[Plug]):
    name = "plug"
    key_prefix = "plug"
    order = 3
    at_once = True
    plural = "plugs"
    rename_hint = " (--ifname)"

    def from_dict(self, d: Mapping[str, Any]) -> Plug:
        return Plug(
            ns=want(d, "ns"),
            bridge=want(d, "bridge"),
            addresses=parse_interfaces(want(d, "addresses"), "plug address"),
            ifname=want(d, "ifname"),
            host_ifname=want(d, "host_ifname"),
        )

    def key_of(self, d: Mapping[str, Any]) -> str | None:
        return plug_key(str(d["ns"]), str(d["bridge"]))

    def label(self, intent: Plug) -> str:
        return intent.ns

    def needs(self, intent: Plug) -> tuple[str, ...]:
        return (ns_key(intent.ns), bridge_key(intent.bridge))

    def names(self, intent: Plug) -> tuple[OwnedName, ...]:
        return ((None, intent.host_ifname), (intent.ns, intent.ifname))

    def addresses(self, intent: Plug) -> tuple[Placed, ...]:
        return tuple((intent.ns, bridge_key(intent.bridge), a) for a in intent.addresses)

    def namespaces(self, intent: Plug) -> tuple[str, ...]:
        return (intent.ns,)

    def drifted(self, intent: Plug, link: Link, links: LinkCache) -> bool:
        if link.name != intent.host_ifname:
            return False
        bridge = links.named(intent.bridge)
        return not link.up or bridge is None or link.master != bridge.index

    def unmet(self, state: DesiredState, intent: Plug) -> list[str]:
        missing = []
        if not state.namespace_known(intent.ns):
            missing.append(f"namespace {intent.ns}")
        if bridge_key(intent.bridge) not in state:
            missing.append(f"bridge {intent.bridge}")
        return missing

    # ---- requests -------------------------------------------------------------------
    def add(self, state: DesiredState, req: Request) -> Plug:
        assert isinstance(req, PlugAdd)
        if req.ns is None or req.netns is not None or req.pid is not None:
            raise BadRequest(
                "a plug names a namespace NS under /run/netns; another tool's namespace "
                "(--netns PATH, --pid PID) is plugged with `ctl plug`, not in a document"
            )
        ns, key = req.ns, plug_key(req.ns, req.bridge)
        if not state.namespace_known(ns):
            raise NotFound(f"namespace {ns} does not exist; create it with `ns add {ns}`")
        br = require_bridge(state, req.bridge)
        for addr in req.addresses:
            check_in_subnet(addr, br)
        existing = state.get(key)
        addresses = req.addresses
        if not addresses:
            # leased: the plug that holds them already, or free ones of the subnet
            addresses = existing.addresses if isinstance(existing, Plug) else lease(state, br)
        if req.ifname == "lo":
            raise NameTaken("lo is the namespace's loopback; pick another --ifname")
        if isinstance(existing, Plug):
            if existing.addresses == addresses and req.ifname in (None, existing.ifname):
                return existing
            raise Conflict(
                f"{ns} is already plugged into {req.bridge} ({existing.describe()}); "
                f"`unplug {ns} {req.bridge}` first to change it"
            )
        if req.ifname is not None:
            owner = state.name_owner(ns, req.ifname)
            if owner is not None:
                raise NameTaken(f"interface {req.ifname} in {ns} is already used by {owner}")
        inner = req.ifname or state.pick_name(ns, f"veth-{ns}", key + "#ns", key)
        host = state.pick_name(None, f"veth-{ns}-br", key + "#host", key)
        return Plug(ns, req.bridge, addresses, inner, host)

    def delete(self, state: DesiredState, req: Request) -> list[str]:
        assert isinstance(req, PlugDel)
        if req.ns is None:
            raise BadRequest("give the namespace NS (or --netns PATH, --pid PID) and BRIDGE")
        key = plug_key(req.ns, req.bridge)
        if key not in state:
            raise NotFound(f"{req.ns} is not plugged into {req.bridge}; `show` lists the plugs")
        return [key]

    # ---- the kernel -----------------------------------------------------------------
    async def _ensure(self, ctx: Context, plug: Plug, acts: Actions) -> list[str]:
        net = ctx.net
        br = ctx.state.get(bridge_key(plug.bridge))
        if not isinstance(br, Bridge):
            raise NotFound(f"bridge {plug.bridge} is not desired")
        if not net.ns_exists(plug.ns):
            raise NotFound(f"namespace {plug.ns} does not exist")
        pair = BridgedPair(
            plug.key,
            plug.ns,
            plug.ifname,
            plug.host_ifname,
            br,
            plug.addresses,
            host_hint="remove it, or plug with another --ifname",
            inner_hint="remove it, or plug with another --ifname",
            lo_up=True,
        )
        return await ensure_bridged_pair(
            net, pair, acts, lambda index: self._create(ctx, plug, br, index, acts)
        )

    async def _create(
        self, ctx: Context, plug: Plug, br: Bridge, bridge_index: int, acts: Actions
    ) -> None:
        """The fresh path: everything about the new pair is known, so nothing is observed
        but the inner index (``plug`` is on the hot path of every container start)."""
        net = ctx.net
        where = f"{plug.ns}:{plug.ifname}"
        await net.add_veth(
            plug.host_ifname,
            None,
            plug.ifname,
            plug.ns,
            master=bridge_index,
            up=True,
            mac=mac_for(plug.key, "host"),
            peer_mac=mac_for(plug.key, "ns"),
        )
        host_index, inner = await new_pair(net, plug.host_ifname, plug.ns, plug.ifname)
        # addressed while still down, so that coming up announces it: a gratuitous ARP
        # (arp_notify) and an unsolicited neighbour advertisement (ndisc_notify); in a
        # namespace netagent made, every interface does so by default
        own = net.announcing(plug.ns)
        if not own:
            await net.set_ns_sysctls(plug.ns, announce(plug.ifname))
        for addr in plug.addresses:
            acts.add(f"add {addr} to {where}")
            await net.add_address(plug.ns, inner, addr)
        await gather(
            net.set_link(None, host_index, alias=alias_for(plug.key)),
            net.set_link(plug.ns, inner, alias=alias_for(plug.key), up=True),
            # lo is index 1 in every namespace (the namespace kind keeps its own up)
            *([] if own else [net.set_link(plug.ns, 1, up=True)]),
        )
        acts.add(f"mark {plug.host_ifname} and {where}, set {where} up")
        for addr in plug.addresses:
            gw = br.gateway(addr.version)
            if gw is None:
                continue
            if await net.add_default_route(plug.ns, inner, gw.ip):
                acts.add(f"route default via {gw.ip} in {plug.ns}")
            else:
                acts.add(f"kept the default route already in {plug.ns}")

    async def ensure(self, ctx: Context, intent: Plug, old: Plug | None) -> list[str]:
        return await self._ensure(ctx, intent, Actions())

    async def inspect(self, ctx: Context, intent: Plug) -> list[str]:
        return await self._ensure(ctx, intent, Actions(dry_run=True))

    async def remove(self, ctx: Context, intent: Plug) -> list[str]:
        net = ctx.net
        done = []
        host = await net.link(None, intent.host_ifname)
        if host is not None and host.belongs_to(intent.key):
            await net.del_link(None, host.index)
            done.append(f"deleted veth {intent.host_ifname}")
        if net.ns_exists(intent.ns):
            inner = await net.link(intent.ns, intent.ifname)
            if inner is not None and inner.belongs_to(intent.key):
                await net.del_link(intent.ns, inner.index)
                done.append(f"deleted {intent.ns}:{intent.ifname}")
        return done

    async def released(self, ctx: Context, intent: Plug) -> None:
        await release_namespace(ctx, intent.ns)


async def release_namespace(ctx: Context, ns: str) -> None:
    """Close what is kept open in a namespace nothing of netagent's acts in any more."""
    if not ctx.state.lookup("ns", ns):
        await ctx.net.forget(ns)
