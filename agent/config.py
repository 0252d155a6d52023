"""Daemon settings: defaults, then the config file (TOML), then command-line options."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from .errors import InvalidArgument

DEFAULT_SOCKET = "/run/netagent/netagent.sock"
DEFAULT_STATE_DIR = "/var/lib/netagent"


@dataclass
class Config:
    socket: str = DEFAULT_SOCKET
    state_dir: str = DEFAULT_STATE_DIR
    firewall: str = "nftables"
    #: members may change things through the socket (root always may)
    socket_group: str | None = "netagent"
    #: members may only look
    readonly_group: str | None = None
    #: seconds between full reconcile passes (the safety net under events)
    resync_interval: float = 30.0
    #: seconds a client may take to send a request or read a reply
    client_timeout: float = 10.0
    #: "auto" (console on a terminal, JSON otherwise), "console" or "json"
    log_format: str = "auto"
    #: ADDR:PORT to serve Prometheus metrics on (``docs/metrics.md``); off when unset
    metrics: str | None = None
    # ---- the cluster (``docs/cluster.md``); none of it applies without endpoints -------
    #: etcd client URLs (a list, or one string with commas): joins the cluster
    cluster_endpoints: list[str] | str | None = None
    cluster_cidr: str = "10.244.0.0/16"
    cluster_subnet_len: int = 24
    #: this host's address on the underlay (default: the address of the interface the
    #: default route goes through)
    underlay: str | None = None
    cluster_vni: int = 1
    cluster_port: int = 4789
    #: seconds a host's lease outlives its last keep-alive
    cluster_lease_ttl: int = 30
    cluster_bridge: str = "netagent0"
    cluster_prefix: str = "/netagent/network"
    #: PEM files for TLS to etcd (https endpoints): CA, client certificate and key
    cluster_ca: str | None = None
    cluster_cert: str | None = None
    cluster_key: str | None = None
    #: the server name checked in etcd's certificate (default: the first endpoint's host)
    cluster_tls_name: str | None = None
    #: this host's name in the cluster (default: the host name)
    cluster_host: str | None = None

    @classmethod
    def load(cls, path: str | None, overrides: dict[str, Any]) -> Config:
        values: dict[str, Any] = {}
        if path is not None:
            try:
                doc = tomllib.loads(Path(path).read_text())
            except FileNotFoundError:
                raise InvalidArgument(f"config file {path} does not exist") from None
            except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
                raise InvalidArgument(f"config file {path} is not valid TOML: {exc}") from None
            section = doc.get("netagent", doc)
            known = {f.name for f in fields(cls)}
            unknown = set(section) - known
            if unknown:
                raise InvalidArgument(
                    f"config file {path}: unknown settings {', '.join(sorted(unknown))}; "
                    f"known: {', '.join(sorted(known))}"
                )
            values.update(section)
        values.update({k: v for k, v in overrides.items() if v is not None})
        config = cls(**values)
        config.check()
        return config

    def check(self) -> None:
        if (
            self.firewall not in ("nftables", "iptables", "auto")
            and not self.firewall.isidentifier()
        ):
            raise InvalidArgument(f"firewall {self.firewall!r}: use nftables, iptables or auto")
        if self.resync_interval <= 0 or self.client_timeout <= 0:
            raise InvalidArgument("resync_interval and client_timeout must be positive")
        if self.log_format not in ("auto", "console", "json"):
            raise InvalidArgument("log_format must be auto, console or json")
        if self.metrics is not None:
            metrics_address(self.metrics)
        if self.cluster_endpoints:
            from .subnets import Settings

            Settings.from_config(self)  # refuses what cannot work, before anything starts


def metrics_address(text: object) -> tuple[str, int]:
    """``ADDR:PORT`` (``127.0.0.1:9464``, ``[::1]:9464``, ``0.0.0.0:9464``) as a host
    and a port; the address must be an IP address (no name to resolve at start)."""
    import ipaddress

    if not isinstance(text, str):
        raise InvalidArgument("metrics must be ADDR:PORT, e.g. 127.0.0.1:9464")
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        host = ""  # an IPv6 address needs its brackets
    try:
        ipaddress.ip_address(host)
        number = int(port)
    except ValueError:
        number = 0
    if not sep or not host or not 0 < number < 65536:
        raise InvalidArgument(
            f"metrics {text!r}: use ADDR:PORT with an IP address, e.g. 127.0.0.1:9464 or [::1]:9464"
        )
    return host, number
