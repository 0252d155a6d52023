"""The multi-host harness checks itself: hosts as nested sandboxes on an underlay bridge,
a 3-member etcd on it, VXLAN between two hosts' bridges, one netagent daemon per host,
and nothing left behind."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator

import pytest

from netagent.cli.sandbox import Sandbox
from tests.conftest import IN_CI
from tests.support.cluster import Cluster, Host, pids_in_netns
from tests.support.daemon import Daemon
from tests.support.etcd import EtcdCluster, check_installed
from tests.support.wait import wait_for

pytestmark = pytest.mark.e2e


@pytest.fixture
def cluster(sandbox: Sandbox) -> Iterator[Cluster]:
    with Cluster(sandbox, hosts=3) as c:
        yield c


@pytest.fixture
def etcd(cluster: Cluster) -> Iterator[EtcdCluster]:
    why = check_installed()
    if why:
        if IN_CI:
            pytest.fail(f"CI=true but etcd cannot run: {why}")
        pytest.skip(why)
    nodes = [cluster.add_host(f"etcd{i}") for i in (1, 2, 3)]
    with EtcdCluster(nodes) as e:
        e.start()
        yield e


def ping(host: Host, addr: str, ns: str | None = None, wait: int = 2) -> bool:
    argv = ["ping", "-c", "1", "-W", str(wait), addr]
    if ns:
        argv = ["ip", "netns", "exec", ns, *argv]
    return host.run(argv, check=False, timeout=10).returncode == 0


def links(box: Sandbox) -> list[str]:
    out = box.run(["ip", "-o", "link", "show"], timeout=10).stdout
    return [line.split(":")[1].strip().split("@")[0] for line in out.splitlines()]


def test_hosts_etcd_and_cleanup(sandbox: Sandbox, cluster: Cluster, etcd: EtcdCluster) -> None:
    t0 = time.monotonic()
    root_netns_before = subprocess.run(
        ["ip", "netns", "list"], capture_output=True, text=True, timeout=10
    ).stdout
    h1, h2, h3 = cluster.hosts[:3]
    # hosts reach each other over the underlay
    assert ping(h1, h2.underlay_ip)
    assert ping(h1, h3.underlay_ip)
    assert ping(h3, h2.underlay_ip)
    # each host has its own namespaces: ip netns add in one is invisible elsewhere
    h1.run(["ip", "netns", "add", "only-in-h1"], timeout=10)
    assert "only-in-h1" in h1.run(["ip", "netns", "list"], timeout=10).stdout
    assert "only-in-h1" not in h2.run(["ip", "netns", "list"], timeout=10).stdout
    assert "only-in-h1" not in sandbox.run(["ip", "netns", "list"], timeout=10).stdout
    assert links(h2) == ["lo", "eth0"]

    # etcd: a key written through one member is read through another
    assert len(etcd.member_list()) == 3
    etcd.put("/harness/a", "1", member=0)
    assert etcd.get("/harness/a", member=2) == "1"
    # one member down (SIGTERM, by PID): the other two still serve reads and writes.
    # etcd shuts down gracefully, then re-raises the signal: its status is -SIGTERM.
    assert etcd.stop_member(0) == -signal.SIGTERM
    assert "received signal; shutting down" in etcd.members[0].log()
    etcd.put("/harness/b", "2", member=1)
    assert etcd.get("/harness/b", member=2) == "2"
    etcd.wait_healthy([1, 2], timeout=10)
    assert not etcd.healthy(0, timeout=3)
    # it rejoins with its data dir and catches up on what it missed
    etcd.start_member(0)
    assert etcd.get("/harness/b", member=0) == "2"
    # the hosts reach etcd as the daemon will: from their own namespace
    r = h2.run(
        ["etcdctl", f"--endpoints={etcd.client_url(2)}", "--command-timeout=5s",
         "get", "/harness/a", "--print-value-only"],
        timeout=15,
    )  # fmt: skip
    assert r.stdout.strip() == "1"

    # cleanup: every member, host and link goes; no process is left in any host
    members = [m.proc for m in etcd.members]
    hosts = list(cluster.hosts)
    netns = [h.netns for h in hosts]
    workdirs = [h.workdir for h in hosts]
    etcd.close()
    assert all(p is not None and p.poll() is not None for p in members)
    assert not etcd.dir.exists()
    cluster.close()
    assert all(not h.alive() for h in hosts)
    assert all(pids_in_netns(ns) == [] for ns in netns)
    assert not any(d.exists() for d in workdirs)
    wait_for("the outer sandbox to hold only lo", lambda: links(sandbox) == ["lo"], timeout=10)
    root_netns_after = subprocess.run(
        ["ip", "netns", "list"], capture_output=True, text=True, timeout=10
    ).stdout
    assert root_netns_after == root_netns_before
    print(f"harness self-check: {time.monotonic() - t0:.2f} s after etcd was up")


def test_remove_host_and_partition(cluster: Cluster) -> None:
    h1, h2, h3 = cluster.hosts
    h2.cut()
    assert not ping(h1, h2.underlay_ip, wait=1)
    h2.reconnect()
    wait_for("host2 back on the underlay", lambda: ping(h1, h2.underlay_ip), timeout=10)
    ns = h3.netns
    cluster.remove_host(h3)
    assert h3 not in cluster.hosts
    assert pids_in_netns(ns) == []
    assert "u-host3" not in links(cluster.box)
    assert len(cluster) == 2


def _sh(host: Host, *lines: str) -> None:
    for line in lines:
        host.run(line.split(), timeout=10)


def test_vxlan_carries_traffic_between_bridges(cluster: Cluster) -> None:
    """What netagent will program, flannel's way (L3): per host a bridge with its own
    /24 and a namespace on it; a VXLAN device with a fixed MAC and the host's .0 address;
    per peer a route via the peer's .0 (onlink), a permanent neighbour entry for it and
    an FDB entry that sends that MAC to the peer's underlay address. Then an L2 variant:
    a VXLAN device enslaved to a bridge with an all-zero FDB entry (flood to the peer)."""
    a, b = cluster.hosts[0], cluster.hosts[1]
    mac = {a.name: "02:00:00:00:01:00", b.name: "02:00:00:00:02:00"}
    for n, h in ((1, a), (2, b)):
        _sh(
            h,
            "ip link add br0 type bridge",
            f"ip addr add 198.18.{n}.1/24 dev br0",
            "ip link set br0 up",
            "ip netns add w",
            "ip link add w0 type veth peer name eth0 netns w",
            "ip link set w0 master br0 up",
            f"ip -n w addr add 198.18.{n}.2/24 dev eth0",
            "ip -n w link set eth0 up",
            f"ip -n w route add default via 198.18.{n}.1",
            "sysctl -qw net.ipv4.ip_forward=1",
            f"ip link add vx0 address {mac[h.name]} type vxlan id 1 dstport 4789"
            f" local {h.underlay_ip} dev eth0 nolearning",
            f"ip addr add 198.18.{n}.0/32 dev vx0",
            "ip link set vx0 up",
        )
    for h, peer, pn in ((a, b, 2), (b, a, 1)):
        _sh(
            h,
            f"ip route add 198.18.{pn}.0/24 via 198.18.{pn}.0 dev vx0 onlink",
            f"ip neigh add 198.18.{pn}.0 lladdr {mac[peer.name]} dev vx0 nud permanent",
            f"bridge fdb append {mac[peer.name]} dev vx0 dst {peer.underlay_ip}",
        )

    def vx_packets(h: Host, dev: str, way: str) -> int:
        return int(h.run(["cat", f"/sys/class/net/{dev}/statistics/{way}_packets"]).stdout)

    before = vx_packets(b, "vx0", "rx")
    assert ping(a, "198.18.2.2", ns="w")  # namespace on a's bridge -> namespace on b's
    assert vx_packets(b, "vx0", "rx") > before  # and it really went through the tunnel
    # the VXLAN device takes its MTU from eth0 (1500 - 50): full-size packets pass
    r = a.run(
        ["ip", "netns", "exec", "w", "ping", "-c", "1", "-W", "2", "-M", "do", "-s", "1422",
         "198.18.2.2"], check=False, timeout=10,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr

    for n, h, peer in ((1, a, b), (2, b, a)):
        _sh(
            h,
            "ip link add br1 type bridge",
            f"ip addr add 198.18.100.{n}/24 dev br1",
            "ip link set br1 up",
            f"ip link add vx1 type vxlan id 2 dstport 4789 local {h.underlay_ip}"
            " dev eth0 nolearning",
            "ip link set vx1 master br1 up",
            f"bridge fdb append 00:00:00:00:00:00 dev vx1 dst {peer.underlay_ip}",
        )
    before = vx_packets(b, "vx1", "rx")
    assert ping(a, "198.18.100.2")
    assert vx_packets(b, "vx1", "rx") > before


def test_one_daemon_per_host(cluster: Cluster) -> None:
    """Each host runs its own netagent daemon (own state dir and socket) and sees only
    its own host."""
    d1 = Daemon(cluster.hosts[0], cluster.hosts[0].workdir)
    d2 = Daemon(cluster.hosts[1], cluster.hosts[1].workdir)
    d1.start()
    d2.start()
    assert os.path.dirname(d1.socket) != os.path.dirname(d2.socket)
    d1.ok("ns", "add", "red")
    d1.ok("bridge", "add", "v-net-0", "--address", "192.168.15.5/24")
    assert "red" in d1.sh("ip", "netns", "list").stdout
    assert "red" not in d2.sh("ip", "netns", "list").stdout
    assert "red" not in d2.ok("ns", "list")
    assert d2.sh("ip", "link", "show", "v-net-0", check=False).returncode != 0
    # so is the firewall: a forward on host1 is in host1's ruleset only
    d1.ok("forward", "8080", "192.168.15.2:80")
    assert "8080" in d1.sh("nft", "list", "ruleset").stdout
    assert "8080" not in d2.sh("nft", "list", "ruleset").stdout
    d1.ok("purge", "--yes")
    assert d1.stop() == 0
    assert d2.stop() == 0
