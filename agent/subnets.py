"""The cluster's settings and what it writes in etcd (pure), and the two things
``main.py`` builds the cluster room from: this host's node id and the real store.

Keys under the prefix (``--cluster-prefix``, default ``/netagent/network``), after
flannel's ``/coreos.com/network``:

``<prefix>/config``
    the cluster range, subnet length, VNI and port, written once by the first host
    (create-if-absent) and compared by every other: hosts that disagree would route
    each other's traffic into the void, so a host whose flags differ refuses to join.
``<prefix>/subnets/10.244.1.0-24``
    one per host, under the host's TTL lease: who holds the subnet and how to reach it
    (:class:`Record`). Its lease expiring or being revoked deletes it.
"""

from __future__ import annotations

import ipaddress
import json
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import InvalidArgument
from .kinds.vxlan import check_ipv4, check_mac, device_name

if TYPE_CHECKING:
    from netagent.backends.etcd import ClusterStore

    from .config import Config

#: the record's format version (a host reading a newer one skips it and says so)
VERSION = 1


@dataclass(frozen=True)
class Settings:
    """``--cluster-*``, checked once."""

    endpoints: tuple[str, ...]
    cidr: ipaddress.IPv4Network
    subnet_len: int
    underlay: str | None
    vni: int
    port: int
    lease_ttl: int
    bridge: str
    prefix: str
    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    tls_name: str | None = None
    host: str | None = None

    @classmethod
    def from_config(cls, c: Config) -> Settings:
        endpoints = c.cluster_endpoints
        if isinstance(endpoints, str):
            endpoints = [e for e in endpoints.split(",") if e.strip()]
        try:
            cidr = ipaddress.IPv4Network(c.cluster_cidr)
        except ValueError:
            raise InvalidArgument(
                f"--cluster-cidr {c.cluster_cidr!r} is not an IPv4 network like 10.244.0.0/16"
            ) from None
        if not cidr.prefixlen < c.cluster_subnet_len <= 30:
            raise InvalidArgument(
                f"--cluster-subnet-len {c.cluster_subnet_len} must be longer than "
                f"{cidr}'s /{cidr.prefixlen} and at most 30"
            )
        if c.cluster_subnet_len - cidr.prefixlen > 16:
            raise InvalidArgument("the cluster range holds more than 65,536 subnets; use fewer")
        if not 0 < c.cluster_vni < 1 << 24:
            raise InvalidArgument("--cluster-vni must be 1 to 16777215")
        if not 0 < c.cluster_port < 65536:
            raise InvalidArgument("--cluster-port must be 1 to 65535")
        if not 2 <= c.cluster_lease_ttl <= 86400:
            raise InvalidArgument("--cluster-lease-ttl must be 2 to 86400 seconds")
        if c.underlay is not None:
            check_ipv4(c.underlay, "--underlay")
        prefix = "/" + c.cluster_prefix.strip("/")
        if (c.cluster_cert is None) != (c.cluster_key is None):
            raise InvalidArgument("--cluster-cert and --cluster-key go together")
        return cls(
            endpoints=tuple(e.strip() for e in endpoints or ()),
            cidr=cidr,
            subnet_len=c.cluster_subnet_len,
            underlay=c.underlay,
            vni=c.cluster_vni,
            port=c.cluster_port,
            lease_ttl=c.cluster_lease_ttl,
            bridge=c.cluster_bridge,
            prefix=prefix,
            ca=c.cluster_ca,
            cert=c.cluster_cert,
            key=c.cluster_key,
            tls_name=c.cluster_tls_name,
            host=c.cluster_host,
        )

    @property
    def device(self) -> str:
        return device_name(self.vni)

    @property
    def config_key(self) -> str:
        return f"{self.prefix}/config"

    @property
    def subnets_prefix(self) -> str:
        return f"{self.prefix}/subnets/"

    def subnet_key(self, subnet: ipaddress.IPv4Network) -> str:
        return self.subnets_prefix + str(subnet).replace("/", "-")

    def subnet_of(self, key: str) -> ipaddress.IPv4Network | None:
        """The subnet a key names, if it is one of the cluster's."""
        text = key.removeprefix(self.subnets_prefix).replace("-", "/")
        try:
            net = ipaddress.IPv4Network(text)
        except ValueError:
            return None
        if net.prefixlen != self.subnet_len or not net.subnet_of(self.cidr):
            return None
        return net

    def shared(self) -> dict[str, Any]:
        """What every host of the cluster must agree on (``<prefix>/config``)."""
        return {
            "cidr": str(self.cidr),
            "subnet_len": self.subnet_len,
            "vni": self.vni,
            "port": self.port,
        }

    def candidates(self) -> list[ipaddress.IPv4Network]:
        """The subnets a host may lease: all of the range but the first (flannel's
        default SubnetMin: its network address is the range's own)."""
        subnets = list(self.cidr.subnets(new_prefix=self.subnet_len))
        return subnets[1:] if len(subnets) > 1 else subnets


def vtep_mac(subnet: ipaddress.IPv4Network) -> str:
    """A VTEP MAC derived from the subnet (locally administered ``0a:58`` + the subnet's
    address, as OVN derives MACs from IPs): unique while subnets are, and the same after
    a restart, so peers' neighbour and FDB entries stay right."""
    return "0a:58:" + ":".join(f"{b:02x}" for b in subnet.network_address.packed)


def gateway(subnet: ipaddress.IPv4Network) -> ipaddress.IPv4Interface:
    """The cluster bridge's address: the subnet's first host address."""
    return ipaddress.IPv4Interface(f"{subnet.network_address + 1}/{subnet.prefixlen}")


@dataclass(frozen=True)
class Record:
    """A host's lease record: ``<prefix>/subnets/<subnet>``'s value."""

    node: str
    host: str
    underlay: str
    vtep_mac: str
    vni: int
    port: int

    def encode(self) -> bytes:
        return json.dumps(
            {
                "version": VERSION,
                "node": self.node,
                "host": self.host,
                "underlay": self.underlay,
                "vtep_mac": self.vtep_mac,
                "vni": self.vni,
                "port": self.port,
            },
            sort_keys=True,
        ).encode()

    @classmethod
    def decode(cls, raw: bytes) -> Record:
        """Strict: a record that does not parse is reported, never half used."""
        try:
            d = json.loads(raw)
        except ValueError:
            raise InvalidArgument("not JSON") from None
        if not isinstance(d, dict):
            raise InvalidArgument("not a JSON object")
        if d.get("version") != VERSION:
            raise InvalidArgument(f"record version {d.get('version')!r}, this host reads {VERSION}")
        try:
            rec = cls(
                node=str(d["node"]),
                host=str(d.get("host", "")),
                underlay=check_ipv4(d["underlay"], "underlay address"),
                vtep_mac=check_mac(d["vtep_mac"], "VTEP MAC"),
                vni=int(d["vni"]),
                port=int(d["port"]),
            )
        except KeyError as exc:
            raise InvalidArgument(f"missing {exc.args[0]!r}") from None
        except (TypeError, ValueError) as exc:
            raise InvalidArgument(str(exc)) from None
        return rec


def pick(free: Iterable[ipaddress.IPv4Network]) -> ipaddress.IPv4Network | None:
    """A free subnet at random (flannel's way): hosts starting together rarely race for
    the same one; the create-if-absent transaction settles it when they do."""
    choices = list(free)
    return secrets.choice(choices) if choices else None


def node_id(state_dir: Path) -> str:
    """This host's id in the cluster, kept in the state dir: what makes a record this
    host's own across restarts (its underlay address may change)."""
    path = state_dir / "cluster-node"
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        value = secrets.token_hex(8)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(value + "\n")
        tmp.replace(path)
        return value


def open_store(settings: Settings) -> ClusterStore:
    """The real store (etcd3aio is imported here, in the daemon only)."""
    from netagent.backends.etcd import Etcd3Store, parse_endpoints

    return Etcd3Store(
        parse_endpoints(settings.endpoints),
        ca=settings.ca,
        cert=settings.cert,
        key=settings.key,
        server_name=settings.tls_name,
    )
