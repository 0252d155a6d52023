"""Kind ``vxlan``: this host's VXLAN device, the tunnel end the cluster's peers reach.

flannel's vxlan backend, in netagent's terms: one device per cluster (VNI), learning
off, a fixed MAC, on the underlay interface (the one holding ``--underlay``, so the
kernel gives it that interface's MTU minus 50), carrying the first address of this
host's subnet as a /32 (the VTEP address peers route this subnet via). With learning off
nothing is learned from traffic: the peers' routes, neighbour and FDB entries
(``agent/kinds/peer.py``) are the whole truth.

The cluster room (``agent/cluster.py``) makes the intent from the subnet it leased in
etcd; nobody asks for it with a request.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from ..errors import InvalidArgument, NameTaken, NotFound
from ..schema import Request
from ..values import check_name
from .base import Actions, Context, Kind, OwnedName, want
from .linkops import ensure_mark, ensure_up, remove_owned_link

if TYPE_CHECKING:
    from netagent.backends.netlink import Link

    from ..linkcache import LinkCache
    from ..state import DesiredState

_MAC = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}\Z")


def check_mac(value: object, what: str = "MAC address") -> str:
    """A unicast MAC in the kernel's form (``0a:58:0a:f4:01:00``)."""
    if not isinstance(value, str) or not _MAC.match(value.lower()):
        raise InvalidArgument(f"{what} {value!r} is not a MAC address like 0a:58:0a:f4:01:00")
    mac = value.lower()
    if int(mac[:2], 16) & 1:
        raise InvalidArgument(f"{what} {mac} is a multicast MAC; give a unicast one")
    return mac


def check_ipv4(value: object, what: str) -> str:
    try:
        return str(ipaddress.IPv4Address(str(value)))
    except ValueError:
        raise InvalidArgument(f"{what} {value!r} is not an IPv4 address") from None


def check_subnet(value: object, what: str = "subnet") -> ipaddress.IPv4Network:
    try:
        net = ipaddress.IPv4Network(str(value))
    except ValueError:
        raise InvalidArgument(
            f"{what} {value!r} is not an IPv4 subnet like 10.244.1.0/24"
        ) from None
    if net.prefixlen > 30:
        raise InvalidArgument(f"{what} {net} leaves no address for the bridge and a namespace")
    return net


def device_name(vni: int) -> str:
    """``netagent.<vni>`` (flannel's ``flannel.<vni>``) while it fits in 15 characters."""
    name = f"netagent.{vni}"
    return name if len(name) <= 15 else f"navx{vni}"


def vxlan_key(name: str) -> str:
    return f"vxlan/{name}"


@dataclass(frozen=True)
class Vxlan:
    kind: ClassVar[str] = "vxlan"
    name: str
    vni: int
    port: int
    #: this host's underlay address (the tunnel's outer source)
    local: str
    #: this host's subnet (its first address is the VTEP address)
    subnet: ipaddress.IPv4Network
    mac: str

    def __post_init__(self) -> None:
        check_name(self.name, "VXLAN device name")
        if not isinstance(self.vni, int) or not 0 < self.vni < 1 << 24:
            raise InvalidArgument(f"VNI {self.vni!r} must be 1 to 16777215")
        if not isinstance(self.port, int) or not 0 < self.port < 65536:
            raise InvalidArgument(f"VXLAN port {self.port!r} must be 1 to 65535")
        check_ipv4(self.local, "underlay address")
        check_subnet(self.subnet)
        check_mac(self.mac, "VTEP MAC")

    @property
    def key(self) -> str:
        return vxlan_key(self.name)

    @property
    def vtep(self) -> ipaddress.IPv4Interface:
        return ipaddress.IPv4Interface(f"{self.subnet.network_address}/32")

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "name": self.name,
            "vni": self.vni,
            "port": self.port,
            "local": self.local,
            "subnet": str(self.subnet),
            "mac": self.mac,
        }

    def describe(self) -> str:
        return (
            f"VXLAN {self.name} (VNI {self.vni}, UDP {self.port}) from {self.local}, "
            f"VTEP {self.vtep.ip} {self.mac} for {self.subnet}"
        )


class VxlanKind(Kind[Vxlan]):
    name = "vxlan"
    key_prefix = "vxlan"
    order = 6
    #: the VXLAN port's guard (known peers only) is in the firewall
    firewall = True

    def from_dict(self, d: Mapping[str, Any]) -> Vxlan:
        return Vxlan(
            name=want(d, "name"),
            vni=want(d, "vni"),
            port=want(d, "port"),
            local=want(d, "local"),
            subnet=check_subnet(want(d, "subnet")),
            mac=want(d, "mac"),
        )

    def label(self, intent: Vxlan) -> str:
        return intent.name

    def names(self, intent: Vxlan) -> tuple[OwnedName, ...]:
        return ((None, intent.name),)

    def index(self, intent: Vxlan) -> Iterable[tuple[str, Hashable]]:
        # packets from the tunnel are routed onto the bridge and back
        return [("forwarding", 4)]

    def drifted(self, intent: Vxlan, link: Link, links: LinkCache) -> bool:
        return not link.up or (link.mac is not None and link.mac != intent.mac)

    def add(self, state: DesiredState, req: Request) -> Vxlan:
        raise InvalidArgument("the VXLAN device is the cluster's: run the daemon with --cluster-*")

    def delete(self, state: DesiredState, req: Request) -> list[str]:
        raise InvalidArgument("the VXLAN device is the cluster's: run the daemon with --cluster-*")

    # ---- the kernel -----------------------------------------------------------------
    async def _ensure(self, ctx: Context, vx: Vxlan, old: Vxlan | None, acts: Actions) -> list[str]:
        net = ctx.net
        dev = await net.address_owner(vx.local)
        if dev is None:
            raise NotFound(
                f"no interface of this host has the underlay address {vx.local}; give "
                "--underlay an address of this host"
            )
        have = await net.vxlan(vx.name)
        if have is None:
            link = await net.link(None, vx.name)
            if link is not None:
                raise NameTaken(
                    f"{vx.name} exists and is a {link.kind or 'plain'} interface, not "
                    "netagent's VXLAN device; netagent leaves it alone: remove it"
                )
        elif not have.link.belongs_to(vx.key):
            raise NameTaken(f"{vx.name} exists and was not made by netagent; it is left alone")
        elif (have.vni, have.port, have.local, have.dev, have.learning, have.link.mac) != (
            vx.vni,
            vx.port,
            vx.local,
            dev,
            False,
            vx.mac,
        ):
            if acts.add(f"delete {vx.name}: its settings differ (recreated)"):
                await net.del_link(None, have.link.index)
            have = None
        if have is None:
            what = f"create VXLAN {vx.name} (VNI {vx.vni}, port {vx.port}, local {vx.local})"
            if not acts.add(what):
                acts.add(f"add {vx.vtep} to {vx.name}")
                return acts.done
            await net.add_vxlan(
                vx.name, vni=vx.vni, port=vx.port, local=vx.local, dev=dev, mac=vx.mac
            )
            created = await net.link(None, vx.name)
            if created is None:
                raise NotFound(f"{vx.name} vanished right after it was created")
            link = created
        else:
            link = have.link
        await ensure_mark(net, None, link, vx.key, acts)
        await ensure_up(net, None, link, vx.name, acts)
        addrs = await net.addresses(None, link.index)
        if vx.vtep not in addrs and acts.add(f"add {vx.vtep} to {vx.name}"):
            await net.add_address(None, link.index, vx.vtep)
        for stale in sorted(a for a in addrs if a != vx.vtep and a.version == 4):
            if acts.add(f"remove {stale} from {vx.name}"):
                await net.del_address(None, link.index, stale)
        return acts.done

    async def ensure(self, ctx: Context, intent: Vxlan, old: Vxlan | None) -> list[str]:
        return await self._ensure(ctx, intent, old, Actions())

    async def inspect(self, ctx: Context, intent: Vxlan) -> list[str]:
        return await self._ensure(ctx, intent, None, Actions(dry_run=True))

    async def remove(self, ctx: Context, intent: Vxlan) -> list[str]:
        return await remove_owned_link(
            ctx.net,
            intent.name,
            intent.key,
            f"VXLAN {intent.name} (and every peer's entries on it)",
        )
