"""Kind ``forward``: host port(s) to a destination (DNAT), realized by the firewall backend.

``forward 80 192.168.15.2:80`` forwards TCP arriving at any host address on port 80;
ranges map one to one (``8000-8009 192.168.15.2:9000-9009``); ``--host-ip`` binds it to
one host address. An unbound IPv6 forward lives beside the IPv4 one of the same port.
The kind has no kernel steps of its own: the firewall is synced as a whole from the
forwards and bridges in the desired state.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, NoReturn

from ..errors import InUse, InvalidAddress, InvalidArgument, InvalidPort, NotFound, PortInUse
from ..ops import ForwardAdd, ForwardDel
from ..schema import Request
from ..values import IPAddress, Proto, parse_host_ip, parse_ip, parse_port, parse_proto
from .base import Context, Kind, cached, want

if TYPE_CHECKING:
    from ..state import DesiredState


@dataclass(frozen=True)
class Forward:
    """Host port(s) to a destination; ``host_ip`` None means every host address."""

    kind: ClassVar[str] = "forward"
    proto: Proto
    host_port: int
    dest_ip: IPAddress
    dest_port: int
    count: int = 1
    host_ip: IPAddress | None = None
    #: the key of the intent this forward belongs to (a container's attachment: its
    #: port mappings), or None for one of ``ctl forward``'s; it goes with its owner
    owner: str | None = None

    def __post_init__(self) -> None:
        # checked inline, the parsers only to say what is wrong: a 10,000-forward apply
        # makes 10,000 of these
        if self.proto != "tcp" and self.proto != "udp":
            parse_proto(self.proto)
        if self.owner is not None and (not isinstance(self.owner, str) or not self.owner):
            raise InvalidArgument("a forward's owner must be an intent key")
        host, dest, count = self.host_port, self.dest_port, self.count
        if type(host) is not int or not 1 <= host <= 65535:
            _not_a_port(host, "host port")
        if type(dest) is not int or not 1 <= dest <= 65535:
            _not_a_port(dest, "destination port")
        if type(count) is not int or count < 1:
            raise InvalidPort("a port range must hold at least one port")
        if host + count - 1 > 65535 or dest + count - 1 > 65535:
            raise InvalidPort("the port range runs past 65535")
        if self.host_ip is not None and self.host_ip.version != self.dest_ip.version:
            raise InvalidAddress(
                f"--host-ip {self.host_ip} and destination {self.dest_ip} are of different "
                "IP versions; NAT cannot translate between them"
            )

    @cached
    def family(self) -> int:
        return self.dest_ip.version

    @property
    def host_ports(self) -> range:
        return range(self.host_port, self.host_port + self.count)

    @property
    def port_spec(self) -> str:
        return port_spec(self.host_port, self.count)

    @cached
    def key(self) -> str:
        return forward_key(self.proto, self.host_port, self.count, self.host_ip, self.family)

    @property
    def same_ports(self) -> bool:
        """A range whose every port goes to the same port at the destination
        (``1000-1999`` to ``IP:1000-1999``): the firewall maps it as one interval,
        translating the address and keeping the port, not one entry per port."""
        return self.count > 1 and self.host_port == self.dest_port

    def pairs(self) -> list[tuple[int, int]]:
        """(host port, destination port) for each port of the range."""
        return [(self.host_port + i, self.dest_port + i) for i in range(self.count)]

    def destination(self) -> str:
        ip = f"[{self.dest_ip}]" if self.dest_ip.version == 6 else str(self.dest_ip)
        return f"{ip}:{port_spec(self.dest_port, self.count)}"

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "kind": self.kind,
            "proto": self.proto,
            "host_port": self.host_port,
            "dest_ip": str(self.dest_ip),
            "dest_port": self.dest_port,
        }
        if self.count != 1:
            d["count"] = self.count
        if self.host_ip is not None:
            d["host_ip"] = str(self.host_ip)
        if self.owner is not None:
            d["owner"] = self.owner
        return d

    def describe(self) -> str:
        on = f"{self.host_ip}:" if self.host_ip else ""
        of = f" (for {self.owner})" if self.owner else ""
        return f"{on}{self.port_spec}/{self.proto} -> {self.destination()}{of}"


def _not_a_port(value: object, what: str) -> NoReturn:
    parse_port(value, what)  # raises for anything but a number from 1 to 65535
    raise InvalidPort(f"{what} {value!r} must be a number, not text")


def port_spec(first: int, count: int) -> str:
    return str(first) if count == 1 else f"{first}-{first + count - 1}"


def forward_key(
    proto: str, host_port: int, count: int, host_ip: IPAddress | str | None, family: int = 4
) -> str:
    """``fwd/tcp/80``; ``fwd/tcp/80/10.0.0.1`` when bound to a host address;
    ``fwd/tcp/80/ipv6`` for an unbound IPv6 forward (it lives beside the IPv4 one)."""
    key = f"fwd/{proto}/{port_spec(host_port, count)}"
    if host_ip is not None:
        return f"{key}/{host_ip}"
    return key if family == 4 else f"{key}/ipv6"


def forward_from(req: ForwardAdd) -> Forward:
    """A forward from what the user said: ``forward 8000-8009 192.168.15.2:9000-9009``."""
    lo, count = req.host_ports
    dest_ip, dlo, dhi = req.destination
    if dhi != dlo and dhi - dlo + 1 != count:
        raise InvalidPort(
            f"host ports {port_spec(lo, count)} and destination ports "
            f"{port_spec(dlo, dhi - dlo + 1)} are ranges of different lengths; give equal lengths"
        )
    if dhi == dlo and count != 1:
        raise InvalidPort(
            "a host port range needs a destination range of the same length, "
            f"e.g. {dest_ip}:{dlo}-{dlo + count - 1}"
        )
    return Forward(req.proto, lo, dest_ip, dlo, count, req.host_ip)


def _specials(state: DesiredState) -> dict[IPAddress, tuple[str, str, str]]:
    """Addresses no forward may go to, from the bridges: ip -> (bridge, what, subnet)."""
    special: dict[IPAddress, tuple[str, str, str]] = {}
    for br in state.of_kind("bridge"):
        label = state.label(br.key)
        for _ns, _seg, gw in state.kinds.of(br).addresses(br):
            net = gw.network
            special[gw.ip] = (label, "own address (the host itself)", str(net))
            if gw.version == 4 and net.prefixlen < 31:
                special[net.broadcast_address] = (label, "broadcast address", str(net))
                special[net.network_address] = (label, "network address", str(net))
    return special


def check_against_bridges(state: DesiredState, fwd: Forward) -> None:
    """A destination or host address that is a bridge's broadcast, network or own
    address cannot work: DNAT to a broadcast is dropped, to the host itself loops."""
    # asked once per forward of a 10,000-forward apply: kept while the bridges stay
    special = state.derived("forward.specials", "bridge", lambda: _specials(state))
    if not special:
        return
    hit = special.get(fwd.dest_ip)
    if hit is not None:
        bridge, what, net = hit
        raise InvalidAddress(
            f"destination {fwd.dest_ip} is {bridge}'s {what}; a forward cannot go there: "
            f"give an address of a namespace in {net}"
        )
    hit = special.get(fwd.host_ip) if fwd.host_ip is not None else None
    if hit is not None and not hit[1].startswith("own"):
        bridge, what, _net = hit
        raise InvalidAddress(
            f"--host-ip {fwd.host_ip} is {bridge}'s {what}; give an address of this host"
        )


class ForwardKind(Kind[Forward]):
    name = "forward"
    aliases = ("fwd",)
    key_prefix = "fwd"
    order = 5
    firewall = True
    plural = "forwards"
    has_steps = False

    def from_dict(self, d: Mapping[str, Any]) -> Forward:
        host_ip = d.get("host_ip")
        return Forward(
            proto=parse_proto(d.get("proto", "tcp")),
            host_port=parse_port(want(d, "host_port"), "host port"),
            dest_ip=parse_ip(want(d, "dest_ip"), "destination address"),
            dest_port=parse_port(want(d, "dest_port"), "destination port"),
            count=d.get("count", 1),
            host_ip=None if host_ip is None else parse_host_ip(host_ip),
            owner=d.get("owner"),
        )

    def key_of(self, d: Mapping[str, Any]) -> str | None:
        """The key from the raw fields: a refused destination still tells its IP
        version (``fe80::1%eth0`` is IPv6), which is part of the key."""
        host_ip = d.get("host_ip")
        family = 6 if ":" in str(d.get("dest_ip", "")) else 4
        return forward_key(
            str(d.get("proto", "tcp")),
            int(d["host_port"]),
            int(d.get("count", 1)),
            None if host_ip is None else str(host_ip),
            family,
        )

    def needs(self, intent: Forward) -> tuple[str, ...]:
        return (intent.owner,) if intent.owner is not None else ()

    def prunable(self, intent: Forward) -> bool:
        return intent.owner is None  # port mappings go with their owner

    def unmet(self, state: DesiredState, intent: Forward) -> list[str]:
        return [intent.owner] if intent.owner is not None and intent.owner not in state else []

    def index(self, intent: Forward) -> Iterable[tuple[str, Hashable]]:
        ports: list[tuple[str, Hashable]] = [
            ("port", (intent.proto, port)) for port in intent.host_ports
        ]
        # "fwd-dest": the destinations, each once (``FirewallSpec.dest_ips``)
        return [("forwarding", intent.family), ("fwd-dest", intent.dest_ip), *ports]

    def covering(self, state: DesiredState, proto: str, port: int) -> list[Forward]:
        found = [state.get(k) for k in state.lookup("port", (proto, port))]
        return sorted((f for f in found if isinstance(f, Forward)), key=lambda f: f.key)

    def add(self, state: DesiredState, req: Request) -> Forward:
        assert isinstance(req, ForwardAdd)
        fwd = forward_from(req)
        self.check(state, fwd)
        return fwd

    def check(self, state: DesiredState, fwd: Forward) -> None:
        """A new forward's destination can work and its host ports are free (the same
        rules for ``ctl forward`` and a container's port mappings)."""
        check_against_bridges(state, fwd)
        for port in fwd.host_ports:
            if not state.has_indexed("port", (fwd.proto, port)):
                continue  # nothing has it (most ports of a 10,000-forward apply)
            for other in self.covering(state, fwd.proto, port):
                if other == fwd:
                    continue
                same_scope = other.family == fwd.family and (
                    other.host_ip is None or fwd.host_ip is None or other.host_ip == fwd.host_ip
                )
                if same_scope:
                    hint = (
                        f"it is {other.owner}'s port mapping"
                        if other.owner
                        else f"`unforward {other.port_spec} --proto {other.proto}` first "
                        "to retarget it"
                    )
                    raise PortInUse(
                        f"host port {port}/{fwd.proto} is already forwarded "
                        f"({other.describe()}); {hint}",
                        conflicts_with=other.key,
                    )

    def delete(self, state: DesiredState, req: Request) -> list[str]:
        """The forward of these host ports, of both IP versions."""
        assert isinstance(req, ForwardDel)
        lo, count = req.host_ports
        keys = [
            k
            for family in (4, 6)
            if (k := forward_key(req.proto, lo, count, req.host_ip, family)) in state
        ]
        if not keys:
            covering = self.covering(state, req.proto, lo)
            hint = f" (it is part of {covering[0].describe()})" if covering else ""
            raise NotFound(f"host port {port_spec(lo, count)}/{req.proto} is not forwarded{hint}")
        for key in keys:
            fwd = state.get(key)
            if isinstance(fwd, Forward) and fwd.owner is not None:
                raise InUse(
                    f"{fwd.describe()} belongs to {fwd.owner} and goes with it (CNI DEL, "
                    "or `unplug`)",
                    users=[fwd.owner],
                )
        return keys

    def refused(self, ctx: Context, intent: Forward) -> str | None:
        """The firewall sync (earlier in the same pass) installs every forward; one the
        backend refused is reported here."""
        why = ctx.refused.get(intent.key)
        return None if why is None else f"the firewall refuses it: {why}"

    def rows(self, ctx: Context) -> list[dict[str, Any]]:
        fwds = [f for f in ctx.state.of_kind(self.name) if isinstance(f, Forward)]
        fwds.sort(key=lambda f: (f.proto, f.host_port, f.key))
        return [
            {**f.to_dict(), "key": f.key, "host_ports": f.port_spec, "destination": f.destination()}
            for f in fwds
        ]
