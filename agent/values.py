"""Validated values from user text: names, addresses, ports, protocols, destinations.

Every parser takes what arrived (a string from the CLI, any JSON value from the socket)
and returns a typed value, or raises an error whose message says what is wrong and what
to do. One parser per kind of value, so one mistake always gets one error code.
Standard library only.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import re
from collections.abc import Callable
from typing import Any, Literal, TypeAlias

from .errors import InvalidAddress, InvalidArgument, InvalidName, InvalidPort
from .glob import MAX_NAME

IPInterface: TypeAlias = ipaddress.IPv4Interface | ipaddress.IPv6Interface
IPAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address
Proto = Literal["tcp", "udp"]
PROTOS: tuple[Proto, ...] = ("tcp", "udp")

# A conservative subset of what the kernel takes: it cannot be read as an option (no
# leading '-'), cannot break a path (/run/netns/NAME) and needs no quoting anywhere.
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*\Z")
RESERVED_NAMES = frozenset({"all", "default"})
_PREFIX_RE = re.compile(r"[0-9]{1,3}\Z")
#: 0.0.0.0/8 ("this network"), 240.0.0.0/4 (reserved, not routed by Linux) and the
#: limited broadcast: no packet can be sent to them
_NOWHERE4 = (
    ipaddress.ip_network("0.0.0.0/8"),
    ipaddress.ip_network("240.0.0.0/4"),
)


@functools.lru_cache(maxsize=4096)
def _unusable(ip: IPAddress) -> str | None:
    """Why an address cannot be an interface's, a destination or a host address."""
    if ip.is_multicast:
        return "is a multicast address"
    if ip.is_unspecified:
        return "is the unspecified address"
    if ip.version == 4 and any(ip in net for net in _NOWHERE4):
        return "is not a usable address (0.0.0.0/8, 240.0.0.0/4 and 255.255.255.255 are not)"
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return f"is an IPv4-mapped IPv6 address; write it as {ip.ipv4_mapped}"
        if ip.is_link_local:
            return "is link-local (fe80::/10): it means nothing without an interface"
    return None


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
    if value in RESERVED_NAMES:
        # /proc/sys/net/ipv*/conf/{all,default} are not interfaces (the kernel refuses
        # them as names, EINVAL), and `ip netns del all` deletes every namespace
        raise InvalidName(f"{what} {value!r} is reserved by the kernel and the tools; pick another")
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
    text, _, prefix = value.partition("/")
    if "%" in text:
        raise InvalidAddress(f"{what} {value!r} carries a scope (%...); give the address alone")
    if not _PREFIX_RE.match(prefix):
        raise InvalidAddress(
            f"{what} {value!r}: give the prefix length as a number (CIDR), e.g. {text}/24"
        )
    try:
        iface = ipaddress.ip_interface(value)
    except ValueError:
        raise InvalidAddress(
            f"{what} {value!r} is not a valid CIDR; give an address and a prefix length, "
            "e.g. 192.168.15.1/24 or fd00:15::1/64"
        ) from None
    net = iface.network
    why = _unusable(iface.ip)
    if why is None and iface.ip.is_loopback:
        why = "is a loopback address"
    if why is not None:
        raise InvalidAddress(f"{what} {value!r} cannot be assigned to an interface: it {why}")
    if net.prefixlen == 0:
        raise InvalidAddress(
            f"{what} {value!r}: a /0 would take in every address there is; give the subnet's "
            "real prefix length"
        )
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
def _not_a_destination(ip: IPAddress) -> str | None:
    """Why an address cannot be anything but the host's own (its loopback too)."""
    if ip.is_loopback:
        return (
            "is the host itself; netagent forwards to namespaces and other hosts (a "
            "service on the host listens on the port itself)"
        )
    return _unusable(ip)


def parse_host_ip(value: object, what: str = "--host-ip") -> IPAddress:
    """An address of this host a forward is bound to (its loopback addresses too)."""
    return parse_ip(value, what, loopback=True)


def parse_ip(value: object, what: str = "address", loopback: bool = False) -> IPAddress:
    if type(value) is not str:
        if isinstance(value, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
            return value
        raise InvalidAddress(f"{what} must be a string like 192.168.15.2")
    if "%" in value:
        # fe80::1%eth0: the scope is text the firewall cannot take (and could hold a
        # line break); a scoped address cannot be forwarded to anyway
        raise InvalidAddress(f"{what} {value!r} carries a scope (%...); give the address alone")
    ip, why = _read_ip(value, loopback)
    if ip is None:
        raise InvalidAddress(
            f"{what} {value!r} is not an IP address; e.g. 192.168.15.2 or fd00:15::2"
        )
    if why is not None:
        raise InvalidAddress(f"{what} {value!r} cannot be used: it {why}")
    return ip


@functools.lru_cache(maxsize=4096)
def _read_ip(text: str, loopback: bool) -> tuple[IPAddress | None, str | None]:
    """(the address, why it cannot be used) of a text, or (None, None) when it is no
    address; cached by the text (a 10,000-forward apply names the same few addresses,
    and a text hashes in C where an address hashes in Python)."""
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None, None
    return ip, (_unusable(ip) if loopback else _not_a_destination(ip))


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


def _one_port(value: object) -> int:
    """The port a text of digits names, or 0 for anything else (which the parsers then
    read the long way, to say what is wrong): the short path of each item of a
    10,000-forward apply."""
    if type(value) is str and value.isdigit() and value.isascii() and len(value) <= 5:
        port = int(value)
        if port <= 65535:
            return port
    return 0


def parse_port_range(value: object, what: str = "port") -> tuple[int, int]:
    """``80`` or ``8000-8009``; returns (first, last)."""
    port = _one_port(value)
    if port:
        return port, port
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


def parse_destination(value: object, what: str = "destination") -> tuple[IPAddress, int, int]:
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
    lo = _one_port(port)
    if lo:
        return ip, lo, lo
    lo, hi = parse_port_range(port, "destination port")
    return ip, lo, hi


def check_families(addresses: tuple[IPInterface, ...], what: str) -> None:
    versions = [a.version for a in addresses]
    if len(set(versions)) != len(versions):
        raise InvalidAddress(f"{what}: give at most one IPv4 and one IPv6 address")


def parse_interfaces(value: object, what: str) -> tuple[IPInterface, ...]:
    if value is None:
        return ()
    if isinstance(value, (str, ipaddress.IPv4Interface, ipaddress.IPv6Interface)):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise InvalidAddress(f"{what} must be a CIDR or a list of CIDRs")
    result = tuple(parse_interface(v, what) for v in value)
    check_families(result, what)
    return result


def short_hash(text: str, length: int = 8) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def parse_host_ports(value: object, what: str = "host port") -> tuple[int, int]:
    """``80`` or ``8000-8009`` (or a number) -> (first port, count)."""
    port = _one_port(value)
    if port:
        return port, 1
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise InvalidPort(f"{what} must be a port like 80 or a range like 8000-8009")
    lo, hi = parse_port_range(value, what)
    return lo, hi - lo + 1


def parse_bool(value: object, what: str) -> bool:
    if not isinstance(value, bool):
        raise InvalidArgument(f"{what} must be true or false, got {type(value).__name__}")
    return value


def parse_list(value: object, what: str) -> list[object]:
    if not isinstance(value, list):
        raise InvalidArgument(f"{what} must be a list, got {type(value).__name__}")
    return value


def parse_text(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise InvalidArgument(f"{what} must be a string, got {type(value).__name__}")
    return value


def parse_object(value: object, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidArgument(f"{what} must be a JSON object, got {type(value).__name__}")
    return value


def parse_number(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidArgument(f"{what} must be a number, got {type(value).__name__}")
    return float(value)


def parse_pid(value: object, what: str = "pid") -> int:
    """A process ID (``--pid 1234``), from the CLI's text or a JSON number."""
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 10:
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value < 1 << 22:
        raise InvalidArgument(f"{what} {value!r} is not a process ID; give a number such as 1234")
    return value


def parse_netns_path(value: object, what: str = "--netns") -> str:
    """A network namespace file by absolute path (``/proc/PID/ns/net``,
    ``/run/netns/NAME``, a runtime's bind mount)."""
    if not isinstance(value, str) or not value.startswith("/"):
        raise InvalidArgument(
            f"{what} {value!r} must be an absolute path to a network namespace, "
            "e.g. /proc/1234/ns/net or /run/netns/NAME"
        )
    if "\0" in value or len(value) > 4096 or any(c in value for c in "\n\r"):
        raise InvalidArgument(f"{what} {value!r} is not a usable path")
    return value


def _parse_pattern(value: object, what: str) -> str:
    from .glob import check_pattern

    return check_pattern(value)


def _parse_proto(value: object, what: str) -> Proto:
    return parse_proto(value)


#: Value name (``agent/schema.py``) -> parser(raw value, label) -> typed value
PARSERS: dict[str, Callable[[object, str], Any]] = {
    "name": check_name,
    "cidrs": parse_interfaces,
    "ip": parse_ip,
    "host_ip": parse_host_ip,
    "ports": parse_host_ports,
    "destination": parse_destination,
    "proto": _parse_proto,
    "pattern": _parse_pattern,
    "bool": parse_bool,
    "list": parse_list,
    "text": parse_text,
    "object": parse_object,
    "number": parse_number,
    "pid": parse_pid,
    "netns": parse_netns_path,
}
