"""netagent daemons joined in a cluster: one per host of a :class:`~.cluster.Cluster`,
against an :class:`~.etcd.EtcdCluster`, with namespaces on each host's cluster bridge.

Shared by ``tests/e2e/test_cluster.py`` and the benchmark's ``cluster`` section.
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Sequence
from typing import Any

from .cluster import Host
from .daemon import Daemon
from .etcd import EtcdCluster
from .wait import wait_for


def cluster_args(host: Host, etcd: EtcdCluster, ttl: int = 6, *extra: str) -> list[str]:
    """``netagent run``'s cluster options for ``host`` (TLS files when etcd has them)."""
    args = [
        "--cluster-endpoints",
        ",".join(etcd.endpoints),
        "--underlay",
        host.underlay_ip,
        "--cluster-lease-ttl",
        str(ttl),
        "--cluster-host",
        host.name,
    ]
    if etcd.certs is not None:
        args += [
            "--cluster-ca",
            str(etcd.certs.ca),
            "--cluster-cert",
            str(etcd.certs.client_cert),
            "--cluster-key",
            str(etcd.certs.client_key),
        ]
    return [*args, *extra]


def daemon_on(
    host: Host, etcd: EtcdCluster, ttl: int = 6, *extra: str, firewall: str = "nftables"
) -> Daemon:
    return Daemon(
        host, host.workdir, firewall=firewall, extra=cluster_args(host, etcd, ttl, *extra)
    )


def cluster_status(d: Daemon) -> dict[str, Any]:
    status: dict[str, Any] = d.status()["cluster"]
    return status


def wait_joined(ds: Sequence[Daemon], timeout: float = 20) -> list[str]:
    """Until every daemon holds a subnet and has every other in place; their subnets."""

    def done() -> list[str] | None:
        st = [cluster_status(d) for d in ds]
        if all(s["subnet"] and s["peers_in_place"] == len(ds) - 1 == s["peers"] for s in st):
            return [s["subnet"] for s in st]
        return None

    return wait_for(
        "every host joined with every other in place",
        done,
        timeout=timeout,
        interval=0.05,
        detail=lambda: [cluster_status(d) for d in ds],
    )


def plug_workload(d: Daemon, ns: str = "w") -> str:
    """A namespace on the cluster bridge, its address leased from the host's subnet."""
    d.ok("ns", "add", ns)
    d.ok("plug", ns, "netagent0")
    for item in d.ctl_json("show")["intents"]:
        if item["key"] == f"plug/{ns}/netagent0":
            address: str = item["intent"]["addresses"][0]
            return address.split("/")[0]
    raise AssertionError(f"no plug of {ns} into netagent0")


def peer_subnets(d: Daemon) -> set[str]:
    return {p["subnet"] for p in d.ctl_json("peers")}


def vxlan_rx(host: Host, dev: str = "netagent.1") -> int:
    return int(host.run(["cat", f"/sys/class/net/{dev}/statistics/rx_packets"]).stdout)


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def vxlan_frame(vni: int, dst_mac: str, src_ip: str, dst_ip: str) -> bytes:
    """A VXLAN payload: the header with ``vni``, then an Ethernet frame to ``dst_mac``
    carrying an ICMP echo request ``src_ip -> dst_ip`` (checksums right), as a peer's
    VTEP would send it."""
    icmp = struct.pack("!BBHHH", 8, 0, 0, 0x4E41, 1) + b"netagent"
    icmp = icmp[:2] + struct.pack("!H", _checksum(icmp)) + icmp[4:]
    total = 20 + len(icmp)
    ip = struct.pack(
        "!BBHHHBBH4s4s",
        0x45,
        0,
        total,
        1,
        0,
        64,
        1,
        0,
        socket.inet_aton(src_ip),
        socket.inet_aton(dst_ip),
    )
    ip = ip[:10] + struct.pack("!H", _checksum(ip)) + ip[12:]
    eth = bytes.fromhex(dst_mac.replace(":", "")) + bytes.fromhex("0a5800000001") + b"\x08\x00"
    return struct.pack("!II", 0x08000000, vni << 8) + eth + ip + icmp


def send_udp(host: Host, dst: str, port: int, payload: bytes) -> None:
    """One datagram from ``host`` (its own underlay address) to ``dst:port``."""
    code = (
        "import socket,sys\n"
        "s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
        f"s.sendto(bytes.fromhex({payload.hex()!r}),({dst!r},{port}))\n"
    )
    import sys

    host.run([sys.executable, "-c", code], timeout=15)


def guard_drops(d: Daemon) -> int:
    """Packets the VXLAN guard rule dropped (its nft counter, or iptables' own)."""
    if d.firewall == "iptables":
        out = d.sh("iptables", "-w", "-L", "NETAGENT-VXLAN", "-v", "-x", "-n").stdout
        for line in out.splitlines():
            if "DROP" in line and "netagent:vxlan-guard" in line:
                return int(line.split()[0])
        raise AssertionError(f"no guard rule:\n{out}")
    out = d.sh("nft", "list", "chain", "inet", "netagent", "input").stdout
    for line in out.splitlines():
        if "vxlan-guard" in line and "counter packets" in line:
            return int(line.split("counter packets")[1].split()[0])
    raise AssertionError(f"no guard rule with a counter:\n{out}")


def time_until(what: str, cond: Any, timeout: float = 30, interval: float = 0.02) -> float:
    """Seconds until ``cond()`` is true (``wait_for`` with the time it took)."""
    t0 = time.monotonic()
    wait_for(what, cond, timeout=timeout, interval=interval)
    took: float = time.monotonic() - t0
    return took
