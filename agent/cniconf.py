"""CNI, the pure part: a call's network configuration and parameters parsed once into
typed values, and the result written in the configuration's version.

The CNI specification (1.1.0) and its conventions are the reference: a configuration
of cniVersion 0.4.0, 1.0.0 or 1.1.0; ``runtimeConfig`` holding the capability arguments
(``portMappings``, ``ips``, ``mac``); requested addresses also from ``args.cni.ips`` and
``CNI_ARGS`` ``IP=`` (which the conventions say to ignore when ``args`` gives them);
results with ``interfaces`` (``sandbox`` for the container's), ``ips`` (``version``
only at 0.4.0, removed in 1.0.0), ``routes`` and ``dns``; ``mtu`` in interfaces from
1.1.0 on. Every error carries the CNI code the plugin reports (``cni_code``), besides
netagent's own.

netagent's network configuration: ``{"type": "netagent", "bridge": "cni0", "subnet":
"10.88.0.0/16", "gateway": "10.88.0.1", "ipMasq": true, "mtu": 1500}`` (or ``"subnets":
[{"subnet": ..., "gateway": ...}, ...]``, one per IP version); without ``bridge`` and
subnets it is chained (after another plugin, in ``portmap``'s place) and reads
``prevResult``. ``socket`` and ``queueDir`` are the plugin's own (``netagent.cni``).
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .errors import (
    InvalidAddress,
    InvalidArgument,
    InvalidPort,
    NetagentError,
    UnsupportedVersion,
)
from .kinds.attachment import check_container_id, check_ifname, check_mac, check_mtu
from .values import IPAddress, IPInterface, Proto, check_name, parse_interface

if TYPE_CHECKING:
    from .kinds.attachment import Attachment
    from .kinds.bridge import Bridge

SUPPORTED = ("0.4.0", "1.0.0", "1.1.0")

# the CNI specification's error codes (SPEC.md, "Error")
INCOMPATIBLE_VERSION = 1
UNSUPPORTED_FIELD = 2
UNKNOWN_CONTAINER = 3
INVALID_ENVIRONMENT = 4
IO_FAILURE = 5
DECODE_FAILURE = 6
INVALID_CONFIG = 7
TRY_AGAIN_LATER = 11
NOT_AVAILABLE = 50
#: netagent's own (100 and up are the plugin's): CHECK found the attachment not as it
#: was made (the details say what)
NOT_IN_PLACE = 110


def cni_error(cls: type[NetagentError], code: int, message: str) -> NetagentError:
    """A netagent error that the plugin reports with CNI code ``code``."""
    return cls(message, cni_code=code)


def bad_config(message: str) -> NetagentError:
    return cni_error(InvalidArgument, INVALID_CONFIG, message)


IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class Subnet:
    network: IPNetwork
    #: the bridge's address: the gateway, with the subnet's prefix
    gateway: IPInterface


@dataclass(frozen=True)
class PortMapping:
    host_port: int
    container_port: int
    proto: Proto
    #: None: every host address (of the IP versions in ``families``)
    host_ip: IPAddress | None
    families: tuple[int, ...] = (4, 6)


@dataclass(frozen=True)
class NetConf:
    version: str
    name: str
    bridge: str | None = None
    subnets: tuple[Subnet, ...] = ()
    ip_masq: bool = False
    mtu: int | None = None
    dns: dict[str, Any] = field(default_factory=dict)
    port_mappings: tuple[PortMapping, ...] = ()
    #: requested addresses (``runtimeConfig.ips``, else ``args.cni.ips``)
    ips: tuple[str, ...] = ()
    mac: str | None = None
    prev_result: dict[str, Any] | None = None
    raw: Mapping[str, Any] = field(default_factory=dict)

    @property
    def chained(self) -> bool:
        return self.bridge is None


def parse_version(doc: Mapping[str, Any]) -> str:
    version = doc.get("cniVersion")
    if version not in SUPPORTED:
        raise cni_error(
            UnsupportedVersion,
            INCOMPATIBLE_VERSION,
            f"incompatible CNI versions: the configuration has cniVersion {version!r}; "
            f"netagent supports {', '.join(SUPPORTED)}",
        )
    assert isinstance(version, str)
    return version


def _network(text: object, what: str) -> IPNetwork:
    if not isinstance(text, str) or "/" not in text:
        raise bad_config(f"{what} {text!r} must be a subnet in CIDR form, e.g. 10.88.0.0/16")
    try:
        net = ipaddress.ip_network(text, strict=True)
    except ValueError as exc:
        raise bad_config(
            f"{what} {text!r} is not a subnet ({exc}); give its network address, e.g. 10.88.0.0/16"
        ) from None
    if net.num_addresses < 4:
        raise bad_config(f"{what} {text} is too small to allocate from; give a /30 or larger")
    return net


def _subnet(entry: object, where: str) -> Subnet:
    if not isinstance(entry, Mapping):
        raise bad_config(f"{where} must be an object with subnet (and gateway)")
    net = _network(entry.get("subnet"), f"{where}.subnet")
    gw_text = entry.get("gateway")
    if gw_text is None:
        gw_ip = net.network_address + 1
    else:
        try:
            gw_ip = ipaddress.ip_address(str(gw_text).split("/")[0])
        except ValueError:
            raise bad_config(f"{where}.gateway {gw_text!r} is not an IP address") from None
    if gw_ip not in net:
        raise bad_config(f"{where}.gateway {gw_ip} is outside {net}")
    try:
        gateway = parse_interface(f"{gw_ip}/{net.prefixlen}", f"{where}.gateway")
    except NetagentError as exc:
        raise bad_config(exc.message) from None
    return Subnet(net, gateway)


def _port_mappings(value: object) -> tuple[PortMapping, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise bad_config("runtimeConfig.portMappings must be a list")
    out: list[PortMapping] = []
    seen: set[tuple[int, str, object, tuple[int, ...]]] = set()
    for n, entry in enumerate(value):
        where = f"runtimeConfig.portMappings[{n}]"
        if not isinstance(entry, Mapping):
            raise bad_config(f"{where} must be an object")
        ports = []
        for name in ("hostPort", "containerPort"):
            port = entry.get(name)
            if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
                raise cni_error(
                    InvalidPort, INVALID_CONFIG, f"{where}.{name} {port!r} must be 1 to 65535"
                )
            ports.append(port)
        proto = str(entry.get("protocol") or "tcp").lower()
        if proto not in ("tcp", "udp"):
            raise cni_error(
                InvalidArgument,
                UNSUPPORTED_FIELD,
                f"unsupported field {where}.protocol: {entry.get('protocol')!r}; netagent "
                "forwards tcp and udp",
            )
        host_ip: IPAddress | None = None
        families: tuple[int, ...] = (4, 6)
        text = entry.get("hostIP") or ""
        if not isinstance(text, str):
            raise bad_config(f"{where}.hostIP must be a string")
        if text:
            try:
                ip = ipaddress.ip_address(text)
            except ValueError:
                raise cni_error(
                    InvalidAddress, INVALID_CONFIG, f"{where}.hostIP {text!r} is not an address"
                ) from None
            families = (ip.version,)
            host_ip = None if ip.is_unspecified else ip
        mapping = PortMapping(
            ports[0], ports[1], "tcp" if proto == "tcp" else "udp", host_ip, families
        )
        ident = (mapping.host_port, mapping.proto, host_ip, families)
        if ident in seen:
            raise bad_config(f"{where} maps host port {mapping.host_port}/{proto} twice")
        seen.add(ident)
        out.append(mapping)
    return tuple(out)


def _strings(value: object, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise bad_config(f"{where} must be a list of addresses")
    return tuple(value)


def parse_config(doc: Mapping[str, Any]) -> NetConf:
    """The network configuration of one call (what the plugin read on stdin)."""
    version = parse_version(doc)
    name = doc.get("name")
    try:
        check_container_id(name, "network name")
    except NetagentError as exc:
        raise bad_config(exc.message) from None
    assert isinstance(name, str)
    if "ipam" in doc:
        raise cni_error(
            InvalidArgument,
            UNSUPPORTED_FIELD,
            f"unsupported field ipam: {doc['ipam']!r}; netagent allocates addresses "
            "itself: give subnet (and gateway) instead",
        )
    bridge = doc.get("bridge")
    subnets: list[Subnet] = []
    if "subnets" in doc:
        if not isinstance(doc["subnets"], list) or not doc["subnets"]:
            raise bad_config("subnets must be a list of {subnet, gateway} objects")
        subnets = [_subnet(e, f"subnets[{n}]") for n, e in enumerate(doc["subnets"])]
    if "subnet" in doc:
        subnets.insert(
            0, _subnet({"subnet": doc["subnet"], "gateway": doc.get("gateway")}, "subnet")
        )
    elif "gateway" in doc:
        raise bad_config("gateway needs subnet")
    if len({s.network.version for s in subnets}) != len(subnets):
        raise bad_config("give at most one IPv4 and one IPv6 subnet")
    if bridge is not None:
        try:
            check_name(bridge, "bridge")
        except NetagentError as exc:
            raise bad_config(exc.message) from None
    elif subnets:
        raise bad_config('a subnet needs a bridge to be on: give bridge (e.g. "cni0")')
    ip_masq = doc.get("ipMasq", False)
    if not isinstance(ip_masq, bool):
        raise bad_config(f"ipMasq must be true or false, got {ip_masq!r}")
    mtu = doc.get("mtu")
    if mtu is not None:
        try:
            check_mtu(mtu)
        except NetagentError as exc:
            raise bad_config(exc.message) from None
    dns = doc.get("dns") or {}
    if not isinstance(dns, dict):
        raise bad_config("dns must be an object")
    rc = doc.get("runtimeConfig") or {}
    if not isinstance(rc, Mapping):
        raise bad_config("runtimeConfig must be an object")
    ips = _strings(rc.get("ips"), "runtimeConfig.ips")
    if not ips:
        args = doc.get("args")
        cni_args = args.get("cni") if isinstance(args, Mapping) else None
        if isinstance(cni_args, Mapping):
            ips = _strings(cni_args.get("ips"), "args.cni.ips")
    mac = rc.get("mac")
    if mac is not None:
        try:
            mac = check_mac(mac, "runtimeConfig.mac")
        except NetagentError as exc:
            raise bad_config(exc.message) from None
    prev = doc.get("prevResult")
    if prev is not None and not isinstance(prev, dict):
        raise bad_config("prevResult must be an object")
    return NetConf(
        version=version,
        name=name,
        bridge=bridge,
        subnets=tuple(subnets),
        ip_masq=ip_masq,
        mtu=mtu,
        dns=dns,
        port_mappings=_port_mappings(rc.get("portMappings")),
        ips=ips,
        mac=mac,
        prev_result=prev,
        raw=doc,
    )


# ---- the call's parameters ------------------------------------------------------------
def parse_cni_args(text: str | None) -> dict[str, str]:
    """``CNI_ARGS``: ``K=V;K=V`` (``IgnoreUnknown=1`` and the keys netagent does not use
    are accepted and ignored; the reference plugins refuse unknown keys)."""
    out: dict[str, str] = {}
    if not text:
        return out
    for pair in text.split(";"):
        if not pair:
            continue
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise cni_error(
                InvalidArgument,
                INVALID_ENVIRONMENT,
                f"CNI_ARGS {text!r}: {pair!r} is not KEY=VALUE",
            )
        out[key] = value
    return out


def check_attachment_env(container_id: object, ifname: object, netns: object = "") -> None:
    """The CNI_* variables an attachment is named by (code 4 names the variable)."""
    for var, value, check in (
        ("CNI_CONTAINERID", container_id, check_container_id),
        ("CNI_IFNAME", ifname, check_ifname),
    ):
        try:
            check(value, var)
        except NetagentError as exc:
            raise cni_error(InvalidArgument, INVALID_ENVIRONMENT, exc.message) from None
    if netns and (not isinstance(netns, str) or not netns.startswith("/")):
        raise cni_error(
            InvalidArgument, INVALID_ENVIRONMENT, f"CNI_NETNS {netns!r} is not an absolute path"
        )


def requested_ips(conf: NetConf, cni_args: Mapping[str, str]) -> tuple[str, ...]:
    """The addresses the runtime asks for: ``runtimeConfig.ips`` or ``args.cni.ips``,
    else ``CNI_ARGS`` ``IP=`` (comma-separated, as host-local reads it)."""
    if conf.ips:
        return conf.ips
    text = cni_args.get("IP", "")
    return tuple(t for t in text.split(",") if t)


def requested_mac(conf: NetConf, cni_args: Mapping[str, str]) -> str | None:
    if conf.mac is not None:
        return conf.mac
    text = cni_args.get("MAC")
    if not text:
        return None
    try:
        return check_mac(text, "CNI_ARGS MAC")
    except NetagentError as exc:
        raise cni_error(InvalidArgument, INVALID_ENVIRONMENT, exc.message) from None


def derived_mac(key: str) -> str:
    """A stable unicast, locally administered MAC for an attachment's inner end: the
    pair made again (a repair) keeps the address its neighbours have cached."""
    digest = hashlib.sha256(key.encode()).digest()
    return ":".join(f"{b:02x}" for b in (0x02, *digest[:5]))


# ---- results --------------------------------------------------------------------------
def _ip_entry(
    version: str, addr: IPInterface, gateway: IPInterface | None, iface: int
) -> dict[str, Any]:
    entry: dict[str, Any] = {"address": str(addr)}
    if version == "0.4.0":
        entry["version"] = str(addr.version)
    if gateway is not None:
        entry["gateway"] = str(gateway.ip)
    entry["interface"] = iface
    return entry


def add_result(
    conf: NetConf, att: Attachment, bridge: Bridge, macs: Mapping[str, str | None]
) -> dict[str, Any]:
    """The ADD result: the bridge, the host end and the container's interface (with its
    ``sandbox``), its addresses with the gateway, a default route per IP version, and
    the configuration's ``dns``."""
    assert att.host_ifname is not None and att.bridge is not None
    ifaces: list[dict[str, Any]] = []
    for name, sandbox in ((att.bridge, None), (att.host_ifname, None), (att.ifname, att.netns)):
        iface: dict[str, Any] = {"name": name}
        mac = macs.get(name)
        if mac:
            iface["mac"] = mac
        if conf.version == "1.1.0" and att.mtu is not None and name != att.bridge:
            iface["mtu"] = att.mtu
        if sandbox:
            iface["sandbox"] = sandbox
        ifaces.append(iface)
    ips = []
    routes = []
    for addr in att.addresses:
        gw = bridge.gateway(addr.version)
        ips.append(_ip_entry(conf.version, addr, gw, 2))
        if gw is not None:
            routes.append({"dst": "0.0.0.0/0" if addr.version == 4 else "::/0", "gw": str(gw.ip)})
    return {
        "cniVersion": conf.version,
        "interfaces": ifaces,
        "ips": ips,
        "routes": routes,
        "dns": dict(conf.dns),
    }


def chained_result(conf: NetConf) -> dict[str, Any]:
    """Chained: ``prevResult``, passed on unchanged (in the configuration's version)."""
    result = dict(conf.prev_result or {})
    result["cniVersion"] = conf.version
    return result


def prev_addresses(conf: NetConf, netns: str) -> tuple[tuple[IPInterface, ...], str | None]:
    """The container's addresses in ``prevResult`` (those on an interface in a sandbox,
    the one at ``CNI_NETNS`` first), and the first host interface it lists (the other
    plugin's bridge, which routes to the container)."""
    prev = conf.prev_result or {}
    listed = prev.get("interfaces")
    ifaces: list[Any] = listed if isinstance(listed, list) else []
    host_bridge = None
    for iface in ifaces:
        if isinstance(iface, Mapping) and not iface.get("sandbox") and iface.get("name"):
            try:
                host_bridge = check_name(iface["name"], "bridge")
            except NetagentError:
                host_bridge = None
            break
    found: dict[int, IPInterface] = {}
    given = prev.get("ips")
    entries: list[Any] = given if isinstance(given, list) else []
    for n, entry in enumerate(entries):
        if not isinstance(entry, Mapping):
            raise bad_config(f"prevResult.ips[{n}] must be an object")
        index = entry.get("interface")
        if isinstance(index, int) and 0 <= index < len(ifaces):
            iface = ifaces[index]
            sandbox = iface.get("sandbox") if isinstance(iface, Mapping) else None
            if not sandbox or (netns and sandbox != netns):
                continue
        try:
            addr = parse_interface(entry.get("address"), f"prevResult.ips[{n}].address")
        except NetagentError as exc:
            raise bad_config(exc.message) from None
        found.setdefault(addr.version, addr)
    return tuple(found[v] for v in sorted(found)), host_bridge
