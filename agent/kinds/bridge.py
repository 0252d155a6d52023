"""Kind ``bridge``: a Linux bridge, up, with optional gateway addresses and masquerade.

Its gateway addresses are the plugs' default routes; the firewall gives each bridge
hairpin NAT (a namespace reaching a forward through the host's address) and, with
``masquerade``, NAT of its subnet on the way out.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from netagent.backends.netlink import mac_for

from ..errors import AddressInUse, InvalidAddress, InvalidArgument, NameTaken, NotFound
from ..ops import BridgeAdd, BridgeDel
from ..schema import Request
from ..values import IPInterface, check_families, check_name, parse_interfaces
from .base import Actions, Context, Kind, OwnedName, Placed, want
from .linkops import ensure_addresses, ensure_mark, remove_addresses, remove_owned_link

if TYPE_CHECKING:
    from netagent.backends.netlink import Link

    from ..linkcache import LinkCache
    from ..state import DesiredState


@dataclass(frozen=True)
class Bridge:
    kind: ClassVar[str] = "bridge"
    name: str
    addresses: tuple[IPInterface, ...] = ()
    masquerade: bool = False

    def __post_init__(self) -> None:
        check_name(self.name, "bridge name")
        check_families(self.addresses, f"bridge {self.name} address")
        if not isinstance(self.masquerade, bool):
            raise InvalidArgument("masquerade must be true or false")
        for addr in self.addresses:
            if addr.network.prefixlen == addr.max_prefixlen:
                raise InvalidAddress(
                    f"bridge {self.name} address {addr}: a /{addr.network.prefixlen} leaves no "
                    "address for a plug; give the subnet's prefix, e.g. /24 or /64"
                )
        if self.masquerade and not self.addresses:
            raise InvalidArgument(
                f"bridge {self.name}: --masquerade needs --address, the subnet to masquerade"
            )

    @property
    def key(self) -> str:
        return bridge_key(self.name)

    def gateway(self, version: int) -> IPInterface | None:
        return next((a for a in self.addresses if a.version == version), None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "name": self.name,
            "addresses": [str(a) for a in self.addresses],
            "masquerade": self.masquerade,
        }

    def describe(self) -> str:
        addr = f" at {', '.join(map(str, self.addresses))}" if self.addresses else ""
        return f"bridge {self.name}{addr}{' (masquerade)' if self.masquerade else ''}"


def bridge_key(name: str) -> str:
    return f"br/{name}"


class BridgeKind(Kind[Bridge]):
    name = "bridge"
    aliases = ("br",)
    key_prefix = "br"
    order = 1
    firewall = True
    plural = "bridges"

    def from_dict(self, d: Mapping[str, Any]) -> Bridge:
        return Bridge(
            name=want(d, "name"),
            addresses=parse_interfaces(d.get("addresses", ()), "bridge address"),
            masquerade=d.get("masquerade", False),
        )

    def key_of(self, d: Mapping[str, Any]) -> str | None:
        return bridge_key(str(d["name"]))

    def label(self, intent: Bridge) -> str:
        return intent.name

    def names(self, intent: Bridge) -> tuple[OwnedName, ...]:
        return ((None, intent.name),)

    def addresses(self, intent: Bridge) -> tuple[Placed, ...]:
        return tuple((None, intent.key, a) for a in intent.addresses)

    def index(self, intent: Bridge) -> Iterable[tuple[str, Hashable]]:
        return [("forwarding", a.version) for a in intent.addresses]

    def drifted(self, intent: Bridge, link: Link, links: LinkCache) -> bool:
        return not link.up

    # ---- requests -------------------------------------------------------------------
    def add(self, state: DesiredState, req: Request) -> Bridge:
        assert isinstance(req, BridgeAdd)
        br = Bridge(req.name, req.addresses, req.masquerade)
        # a new address must be free on the segment and keep every plug in its subnet
        for user in state.dependents(br.key):
            for _ns, _seg, addr in state.kinds.of(user).addresses(user):
                for gw in br.addresses:
                    if addr.version != gw.version:
                        continue
                    if addr.ip == gw.ip:
                        raise AddressInUse(
                            f"{gw.ip} is already used on {br.name} by {user.key}; "
                            "pick another address"
                        )
                    if addr.ip not in gw.network:
                        raise InvalidAddress(
                            f"{user.key} at {addr} is outside {gw.network}; "
                            "the bridge address must share the plugs' subnet"
                        )
        return br

    def delete(self, state: DesiredState, req: Request) -> list[str]:
        assert isinstance(req, BridgeDel)
        key = bridge_key(req.name)
        if key not in state:
            raise NotFound(f"bridge {req.name} does not exist; `bridge list` shows the bridges")
        return [key]

    def rows(self, ctx: Context) -> list[dict[str, Any]]:
        state = ctx.state
        rows = []
        for br in sorted(state.of_kind(self.name), key=lambda b: b.key):
            assert isinstance(br, Bridge)
            plugs = [u for u in state.dependents(br.key) if u.kind == "plug"]
            rows.append({**br.to_dict(), "plugs": [getattr(p, "ns", "") for p in plugs]})
        return rows

    # ---- the kernel -----------------------------------------------------------------
    async def _ensure(
        self, ctx: Context, br: Bridge, old: Bridge | None, acts: Actions
    ) -> list[str]:
        net = ctx.net
        created = False
        link = await net.link(None, br.name)
        if link is not None and link.kind != "bridge":
            raise NameTaken(
                f"{br.name} exists and is a {link.kind or 'plain'} interface, not a bridge; "
                "netagent leaves it alone: remove it or pick another name"
            )
        if link is None:
            if not acts.add(f"create bridge {br.name}"):
                acts.add(f"set {br.name} up")
                acts.done.extend(f"add {a} to {br.name}" for a in br.addresses)
                return acts.done
            await net.add_bridge(br.name, mac=mac_for(br.key, "bridge"))
            created = True
            link = await net.link(None, br.name)
            if link is None:
                raise NotFound(f"bridge {br.name} vanished right after it was created")
        if not created and not link.belongs_to(br.key):
            raise NameTaken(
                f"{br.name} exists and was not made by netagent; it is left alone: "
                "pick another name"
            )
        await ensure_mark(net, None, link, br.key, acts)
        if not link.up and acts.add(f"set {br.name} up"):
            await net.set_link(None, link.index, up=True)
        await ensure_addresses(net, None, link, br.addresses, br.name, acts)
        if old is not None:
            stale = tuple(a for a in old.addresses if a not in br.addresses)
            await remove_addresses(net, None, link, stale, br.name, acts)
        if any(a.version == 4 for a in br.addresses) and not acts.dry_run:
            # traffic from the host to 127.0.0.1:PORT is DNATed to the bridge's subnet;
            # the kernel routes it only with route_localnet on the way out
            net.set_sysctl(f"net/ipv4/conf/{br.name}/route_localnet", "1")
        return acts.done

    async def ensure(self, ctx: Context, intent: Bridge, old: Bridge | None) -> list[str]:
        return await self._ensure(ctx, intent, old, Actions())

    async def inspect(self, ctx: Context, intent: Bridge) -> list[str]:
        return await self._ensure(ctx, intent, None, Actions(dry_run=True))

    async def remove(self, ctx: Context, intent: Bridge) -> list[str]:
        return await remove_owned_link(ctx.net, intent.name, intent.key, f"bridge {intent.name}")
