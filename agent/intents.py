"""The vocabulary: small frozen, validated values with a stable key.

Nothing here is backend syntax. Every constructor validates; a value that exists is valid.
Parsing functions (``parse_*``) turn user text into values and raise errors that say what
is wrong and what to do. Standard library only: the CLI imports this module.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import re
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, TypeAlias

from .errors import InvalidAddress, InvalidArgument, InvalidName, InvalidPattern, InvalidPort

IPInterface: TypeAlias = ipaddress.IPv4Interface | ipaddress.IPv6Interface
IPAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address
Proto = Literal["tcp", "udp"]
PROTOS: tuple[Proto, ...] = ("tcp", "udp")

#: the kernel's IFNAMSIZ is 16 with the terminating NUL
MAX_NAME = 15
# A conservative subset of what the kernel takes: it cannot be read as an option (no
# leading '-'), cannot break a path (/run/netns/NAME) and needs no quoting anywhere.
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*\Z")
_PATTERN_RE = re.compile(r"[A-Za-z0-9_.*?\[\]!-]+\Z")


def check_name(value: object, what: str = "name") -> str:
    if not isinstance(value, str):
        raise InvalidName(f"{what} must be a string, got {type(value).__name__}")
    if not value:
        raise InvalidName(f"{what} is empty; give a name such as 'red'")
    if len(value) > MAX_NAME:
        raise InvalidName(
            f"{what} {value!r} is {len(value)} characters; the kernel allows at most "
            f"{MAX_NAME}: choose a shorter name"
        )
    if not _NAME_RE.match(value) or value in (".", ".."):
        raise InvalidName(
            f"{what} {value!r} has characters the kernel or the tools refuse; use letters, "
            "digits, '-', '_' and '.', starting with a letter or digit"
        )
    return value


def parse_interface(value: object, what: str = "address") -> IPInterface:
    """A host address with its prefix length, e.g. ``192.168.15.1/24``."""
    if isinstance(value, (ipaddress.IPv4Interface, ipaddress.IPv6Interface)):
        return value
    if not isinstance(value, str):
        raise InvalidAddress(f"{what} must be a string like 192.168.15.1/24")
    if "/" not in value:
        raise InvalidAddress(
            f"{what} {value!r} has no prefix length; give it in CIDR form, "
            f"e.g. {value}/24 (without one the kernel makes a /32 with no on-link route)"
        )
    try:
        iface = ipaddress.ip_interface(value)
    except ValueError:
        raise InvalidAddress(
            f"{what} {value!r} is not a valid CIDR; give an address and a prefix length, "
            "e.g. 192.168.15.1/24 or fd00:15::1/64"
        ) from None
    net = iface.network
    if iface.ip.is_multicast or iface.ip.is_unspecified or iface.ip.is_loopback:
        raise InvalidAddress(f"{what} {value!r} cannot be assigned to an interface")
    if iface.version == 4 and net.prefixlen < 31:
        if iface.ip == net.network_address:
            raise InvalidAddress(
                f"{what} {value!r} is the network address of {net}; pick a host address "
                f"such as {net.network_address + 1}/{net.prefixlen}"
            )
        if iface.ip == net.broadcast_address:
            raise InvalidAddress(
                f"{what} {value!r} is the broadcast address of {net}; pick a host address"
            )
    return iface


@functools.lru_cache(maxsize=4096)
def _ip(text: str) -> IPAddress:
    return ipaddress.ip_address(text)


def parse_ip(value: object, what: str = "address") -> IPAddress:
    if isinstance(value, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        return value
    if not isinstance(value, str):
        raise InvalidAddress(f"{what} must be a string like 192.168.15.2")
    try:
        ip = _ip(value)  # cached: a 10,000-forward apply names the same few addresses
    except ValueError:
        raise InvalidAddress(
            f"{what} {value!r} is not an IP address; e.g. 192.168.15.2 or fd00:15::2"
        ) from None
    if ip.is_multicast or ip.is_unspecified:
        raise InvalidAddress(f"{what} {value!r} cannot be used here")
    return ip


def parse_port(value: object, what: str = "port") -> int:
    if isinstance(value, bool):
        raise InvalidPort(f"{what} must be a number from 1 to 65535")
    if isinstance(value, int):
        port = value
    elif isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 5:
        port = int(value)
    else:
        raise InvalidPort(f"{what} {value!r} is not a number; give a port from 1 to 65535")
    if not 1 <= port <= 65535:
        raise InvalidPort(f"{what} {port} is out of range; give a port from 1 to 65535")
    return port


def parse_port_range(value: object, what: str = "port") -> tuple[int, int]:
    """``80`` or ``8000-8009``; returns (first, last)."""
    if isinstance(value, int) and not isinstance(value, bool):
        port = parse_port(value, what)
        return port, port
    if not isinstance(value, str):
        raise InvalidPort(f"{what} must be a port like 80 or a range like 8000-8009")
    first, sep, last = value.partition("-")
    lo = parse_port(first, what)
    hi = parse_port(last, what) if sep else lo
    if hi < lo:
        raise InvalidPort(f"{what} range {value!r} runs backwards; write it low-high")
    return lo, hi


def parse_proto(value: object) -> Proto:
    if value == "tcp" or value == "udp":
        return value
    raise InvalidArgument(f"protocol {value!r} is not supported; use tcp or udp")


def parse_destination(value: object) -> tuple[IPAddress, int, int]:
    """``192.168.15.2:80``, ``192.168.15.2:9000-9009`` or ``[fd00::2]:80``."""
    if not isinstance(value, str):
        raise InvalidArgument("destination must be a string like 192.168.15.2:80")
    if value.startswith("["):
        host, sep, port = value[1:].partition("]:")
    else:
        host, sep, port = value.rpartition(":")
        if ":" in host:
            raise InvalidAddress(
                f"destination {value!r}: write an IPv6 destination in brackets, e.g. [fd00::2]:80"
            )
    if not sep or not host:
        raise InvalidArgument(
            f"destination {value!r} needs an address and a port, e.g. 192.168.15.2:80"
        )
    ip = parse_ip(host, "destination address")
    lo, hi = parse_port_range(port, "destination port")
    return ip, lo, hi


def _check_families(addresses: tuple[IPInterface, ...], what: str) -> None:
    versions = [a.version for a in addresses]
    if len(set(versions)) != len(versions):
        raise InvalidAddress(f"{what}: give at most one IPv4 and one IPv6 address")


def _interfaces(value: object, what: str) -> tuple[IPInterface, ...]:
    if value is None:
        return ()
    if isinstance(value, (str, ipaddress.IPv4Interface, ipaddress.IPv6Interface)):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise InvalidAddress(f"{what} must be a CIDR or a list of CIDRs")
    result = tuple(parse_interface(v, what) for v in value)
    _check_families(result, what)
    return result


def short_hash(text: str, length: int = 8) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:length]


@dataclass(frozen=True)
class Namespace:
    kind: ClassVar[str] = "ns"
    name: str

    def __post_init__(self) -> None:
        check_name(self.name, "namespace name")

    @property
    def key(self) -> str:
        return f"ns/{self.name}"

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": self.name}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Namespace:
        return cls(name=d.get("name"))  # type: ignore[arg-type]

    def describe(self) -> str:
        return f"namespace {self.name}"


@dataclass(frozen=True)
class Bridge:
    kind: ClassVar[str] = "br"
    name: str
    addresses: tuple[IPInterface, ...] = ()
    masquerade: bool = False

    def __post_init__(self) -> None:
        check_name(self.name, "bridge name")
        _check_families(self.addresses, f"bridge {self.name} address")
        if not isinstance(self.masquerade, bool):
            raise InvalidArgument("masquerade must be true or false")
        if self.masquerade and not self.addresses:
            raise InvalidArgument(
                f"bridge {self.name}: --masquerade needs --address, the subnet to masquerade"
            )

    @property
    def key(self) -> str:
        return f"br/{self.name}"

    def gateway(self, version: int) -> IPInterface | None:
        return next((a for a in self.addresses if a.version == version), None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "name": self.name,
            "addresses": [str(a) for a in self.addresses],
            "masquerade": self.masquerade,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Bridge:
        masq = d.get("masquerade", False)
        return cls(
            name=d.get("name"),  # type: ignore[arg-type]
            addresses=_interfaces(d.get("addresses", d.get("address")), "bridge address"),
            masquerade=masq,
        )

    def describe(self) -> str:
        addr = f" at {', '.join(map(str, self.addresses))}" if self.addresses else ""
        return f"bridge {self.name}{addr}{' (masquerade)' if self.masquerade else ''}"


@dataclass(frozen=True)
class Plug:
    """A veth pair: ``ifname`` in the namespace (addressed, up, default route via the
    bridge's address), ``host_ifname`` enslaved to the bridge."""

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
        _check_families(self.addresses, f"plug {self.ns} address")

    @property
    def key(self) -> str:
        return f"plug/{self.ns}/{self.bridge}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "ns": self.ns,
            "bridge": self.bridge,
            "addresses": [str(a) for a in self.addresses],
            "ifname": self.ifname,
            "host_ifname": self.host_ifname,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Plug:
        return cls(
            ns=d.get("ns"),  # type: ignore[arg-type]
            bridge=d.get("bridge"),  # type: ignore[arg-type]
            addresses=_interfaces(d.get("addresses", d.get("address")), "plug address"),
            ifname=d.get("ifname"),  # type: ignore[arg-type]
            host_ifname=d.get("host_ifname"),  # type: ignore[arg-type]
        )

    def describe(self) -> str:
        addrs = ", ".join(map(str, self.addresses))
        return (
            f"{self.ns}:{self.ifname} at {addrs} plugged into {self.bridge} via {self.host_ifname}"
        )


@dataclass(frozen=True)
class Wire:
    """The seed's direct veth link: ``ifname_a`` in ``ns_a``, ``ifname_b`` in ``ns_b``."""

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
        _check_families(self.addresses_a, f"wire {self.ns_a} address")
        _check_families(self.addresses_b, f"wire {self.ns_b} address")

    @property
    def key(self) -> str:
        return wire_key(self.ns_a, self.ns_b)

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

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Wire:
        return cls(
            ns_a=d.get("ns_a"),  # type: ignore[arg-type]
            addresses_a=_interfaces(d.get("addresses_a"), "address"),
            ns_b=d.get("ns_b"),  # type: ignore[arg-type]
            addresses_b=_interfaces(d.get("addresses_b"), "address"),
            ifname_a=d.get("ifname_a"),  # type: ignore[arg-type]
            ifname_b=d.get("ifname_b"),  # type: ignore[arg-type]
        )

    def describe(self) -> str:
        a = ", ".join(map(str, self.addresses_a))
        b = ", ".join(map(str, self.addresses_b))
        return f"{self.ns_a}:{self.ifname_a} ({a}) wired to {self.ns_b}:{self.ifname_b} ({b})"


def wire_key(ns_a: str, ns_b: str) -> str:
    first, second = sorted((ns_a, ns_b))
    return f"wire/{first}/{second}"


def check_pattern(value: object) -> str:
    if not isinstance(value, str) or not value:
        raise InvalidPattern("pattern must be a non-empty string such as 'veth-*-br'")
    if len(value) > 64 or not _PATTERN_RE.match(value) or value.startswith("-"):
        raise InvalidPattern(
            f"pattern {value!r} is not a shell-style interface pattern; use letters, digits, "
            "'-', '_', '.', and the wildcards *, ? and [...]"
        )
    try:
        _glob_tokens(value)
    except ValueError as exc:
        raise InvalidPattern(f"pattern {value!r}: {exc}") from None
    return value


@dataclass(frozen=True)
class AttachRule:
    kind: ClassVar[str] = "rule"
    pattern: str
    bridge: str

    def __post_init__(self) -> None:
        check_pattern(self.pattern)
        check_name(self.bridge, "bridge name")

    @property
    def key(self) -> str:
        return f"rule/{self.bridge}/{self.pattern}"

    def matches(self, ifname: str) -> bool:
        return glob_match(self.pattern, ifname)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "pattern": self.pattern, "bridge": self.bridge}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AttachRule:
        return cls(pattern=d.get("pattern"), bridge=d.get("bridge"))  # type: ignore[arg-type]

    def describe(self) -> str:
        return f"interfaces matching {self.pattern!r} attach to {self.bridge}"


@dataclass(frozen=True)
class Forward:
    """Host port(s) to a destination; ``host_ip`` None means every host address."""

    kind: ClassVar[str] = "fwd"
    proto: Proto
    host_port: int
    dest_ip: IPAddress
    dest_port: int
    count: int = 1
    host_ip: IPAddress | None = None

    def __post_init__(self) -> None:
        parse_proto(self.proto)
        parse_port(self.host_port, "host port")
        parse_port(self.dest_port, "destination port")
        if not isinstance(self.count, int) or self.count < 1:
            raise InvalidPort("a port range must hold at least one port")
        if self.host_port + self.count - 1 > 65535 or self.dest_port + self.count - 1 > 65535:
            raise InvalidPort("the port range runs past 65535")
        if self.host_ip is not None and self.host_ip.version != self.dest_ip.version:
            raise InvalidAddress(
                f"--host-ip {self.host_ip} and destination {self.dest_ip} are of different "
                "IP versions; NAT cannot translate between them"
            )

    @functools.cached_property
    def family(self) -> int:
        return self.dest_ip.version

    @property
    def host_ports(self) -> range:
        return range(self.host_port, self.host_port + self.count)

    @property
    def port_spec(self) -> str:
        return port_spec(self.host_port, self.count)

    @functools.cached_property
    def key(self) -> str:
        return forward_key(self.proto, self.host_port, self.count, self.host_ip, self.family)

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
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Forward:
        host_ip = d.get("host_ip")
        return cls(
            proto=parse_proto(d.get("proto", "tcp")),
            host_port=parse_port(d.get("host_port"), "host port"),
            dest_ip=parse_ip(d.get("dest_ip"), "destination address"),
            dest_port=parse_port(d.get("dest_port"), "destination port"),
            count=d.get("count", 1),
            host_ip=None if host_ip is None else parse_ip(host_ip, "--host-ip"),
        )

    def describe(self) -> str:
        on = f"{self.host_ip}:" if self.host_ip else ""
        return f"{on}{self.port_spec}/{self.proto} -> {self.destination()}"


def port_spec(first: int, count: int) -> str:
    return str(first) if count == 1 else f"{first}-{first + count - 1}"


def forward_key(
    proto: str, host_port: int, count: int, host_ip: IPAddress | None, family: int = 4
) -> str:
    """``fwd/tcp/80``; ``fwd/tcp/80/10.0.0.1`` when bound to a host address;
    ``fwd/tcp/80/ipv6`` for an unbound IPv6 forward (it lives beside the IPv4 one)."""
    key = f"fwd/{proto}/{port_spec(host_port, count)}"
    if host_ip is not None:
        return f"{key}/{host_ip}"
    return key if family == 4 else f"{key}/ipv6"


def make_forward(
    host_ports: object,
    destination: object,
    proto: object = "tcp",
    host_ip: object = None,
) -> Forward:
    """Build a forward from user text: ``forward 8000-8009 192.168.15.2:9000-9009``."""
    lo, hi = parse_port_range(host_ports, "host port")
    dest_ip, dlo, dhi = parse_destination(destination)
    if dhi - dlo != hi - lo and dhi != dlo:
        raise InvalidPort(
            f"host ports {port_spec(lo, hi - lo + 1)} and destination ports "
            f"{port_spec(dlo, dhi - dlo + 1)} are ranges of different lengths; give equal lengths"
        )
    if dhi == dlo and hi != lo:
        raise InvalidPort(
            "a host port range needs a destination range of the same length, "
            f"e.g. {dest_ip}:{dlo}-{dlo + hi - lo}"
        )
    return Forward(
        proto=parse_proto(proto),
        host_port=lo,
        dest_ip=dest_ip,
        dest_port=dlo,
        count=hi - lo + 1,
        host_ip=None if host_ip is None else parse_ip(host_ip, "--host-ip"),
    )


Intent: TypeAlias = Namespace | Bridge | Plug | Wire | AttachRule | Forward
INTENT_TYPES: dict[str, type[Intent]] = {
    c.kind: c for c in (Namespace, Bridge, Plug, Wire, AttachRule, Forward)
}
#: the order in which intents are realized (and the reverse in which they are removed)
KIND_ORDER = ("ns", "br", "rule", "plug", "wire", "fwd")


def intent_from_dict(d: object) -> Intent:
    if not isinstance(d, dict):
        raise InvalidArgument("an intent must be a JSON object")
    kind = d.get("kind")
    cls = INTENT_TYPES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise InvalidArgument(f"unknown intent kind {kind!r}; known: {', '.join(INTENT_TYPES)}")
    try:
        return cls.from_dict(d)
    except TypeError as exc:
        raise InvalidArgument(f"{kind}: {exc}") from None


# ---- shell-style patterns -------------------------------------------------------------
# fnmatch semantics over interface names, plus a test of whether two patterns can match
# the same name (two attach rules claiming one interface for different bridges).

_ALPHABET = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")
_Token = tuple[str, frozenset[str]]  # ("*", ALPHABET) or ("c", allowed chars)


@functools.lru_cache(maxsize=256)
def _glob_tokens(pattern: str) -> tuple[_Token, ...]:
    """Parsed once per pattern: every link event is matched against every rule."""
    return tuple(_parse_glob(pattern))


def _parse_glob(pattern: str) -> list[_Token]:
    tokens: list[_Token] = []
    i = 0
    while i < len(pattern):
        ch = pattern[i]
        if ch == "*":
            if not tokens or tokens[-1][0] != "*":
                tokens.append(("*", _ALPHABET))
            i += 1
        elif ch == "?":
            tokens.append(("c", _ALPHABET))
            i += 1
        elif ch == "[":
            end = pattern.find("]", i + 2)
            if end < 0:
                raise ValueError("'[' without a closing ']'")
            body = pattern[i + 1 : end]
            negate = body.startswith("!")
            if negate:
                body = body[1:]
            chars: set[str] = set()
            j = 0
            while j < len(body):
                if j + 2 < len(body) and body[j + 1] == "-":
                    lo, hi = body[j], body[j + 2]
                    if lo > hi:
                        raise ValueError(f"range {lo}-{hi} runs backwards")
                    chars.update(c for c in _ALPHABET if lo <= c <= hi)
                    j += 3
                else:
                    chars.add(body[j])
                    j += 1
            allowed = _ALPHABET - chars if negate else _ALPHABET & chars
            tokens.append(("c", frozenset(allowed)))
            i = end + 1
        elif ch == "]" or ch == "!":
            raise ValueError(f"{ch!r} outside a [...] class")
        else:
            tokens.append(("c", frozenset(ch)))
            i += 1
    return tokens


def glob_match(pattern: str, name: str) -> bool:
    tokens = _glob_tokens(pattern)
    # classic two-pointer wildcard match with backtracking to the last star
    ti = ni = 0
    star_t = star_n = -1
    while ni < len(name):
        if ti < len(tokens) and tokens[ti][0] == "c" and name[ni] in tokens[ti][1]:
            ti += 1
            ni += 1
        elif ti < len(tokens) and tokens[ti][0] == "*":
            star_t, star_n = ti, ni
            ti += 1
        elif star_t >= 0:
            star_n += 1
            ti, ni = star_t + 1, star_n
        else:
            return False
    while ti < len(tokens) and tokens[ti][0] == "*":
        ti += 1
    return ti == len(tokens)


def patterns_overlap(p1: str, p2: str) -> bool:
    """True when some interface name (≤ 15 characters) matches both patterns."""
    t1, t2 = _glob_tokens(p1), _glob_tokens(p2)
    seen: set[tuple[int, int, int]] = set()
    stack = [(0, 0, 0)]
    while stack:
        state = stack.pop()
        if state in seen:
            continue
        seen.add(state)
        i, j, n = state
        if i == len(t1) and j == len(t2):
            return n >= 1
        if i < len(t1) and t1[i][0] == "*":
            stack.append((i + 1, j, n))
        if j < len(t2) and t2[j][0] == "*":
            stack.append((i, j + 1, n))
        if i < len(t1) and j < len(t2) and n < MAX_NAME and t1[i][1] & t2[j][1]:
            star1, star2 = t1[i][0] == "*", t2[j][0] == "*"
            stack.append((i if star1 else i + 1, j if star2 else j + 1, n + 1))
    return False
