"""Bridges joined across hosts over VXLAN, coordinated through etcd (issue 12), for real:
hosts as nested sandboxes on an underlay bridge (``tests/support/cluster.py``), a
3-member etcd 3.4 on it (``tests/support/etcd.py``), one netagent daemon per host with
``--cluster-*``, namespaces on each host's ``netagent0``, real packets."""

from __future__ import annotations

import functools
import time
from collections.abc import Iterator

import pytest

from netagent.cli.sandbox import Sandbox
from tests.conftest import IN_CI
from tests.support.cluster import Cluster
from tests.support.daemon import Daemon
from tests.support.etcd import EtcdCluster, check_installed
from tests.support.net import peer_echo_server, ping, tcp_read
from tests.support.overlay import (
    cluster_status,
    daemon_on,
    guard_drops,
    peer_subnets,
    plug_workload,
    send_udp,
    vxlan_frame,
    vxlan_rx,
    wait_joined,
)
from tests.support.wait import wait_for

pytestmark = pytest.mark.e2e
TTL = 6


def _etcd(cluster: Cluster, tls: bool) -> Iterator[EtcdCluster]:
    why = check_installed()
    if why:
        if IN_CI:
            pytest.fail(f"CI=true but etcd cannot run: {why}")
        pytest.skip(why)
    nodes = [cluster.add_host(f"etcd{i}") for i in (1, 2, 3)]
    with EtcdCluster(nodes, tls=tls) as e:
        e.start()
        yield e


@pytest.fixture
def cluster(sandbox: Sandbox) -> Iterator[Cluster]:
    with Cluster(sandbox, hosts=3) as c:
        yield c


@pytest.fixture
def etcd(cluster: Cluster) -> Iterator[EtcdCluster]:
    yield from _etcd(cluster, tls=False)


@pytest.fixture
def etcd_tls(cluster: Cluster) -> Iterator[EtcdCluster]:
    yield from _etcd(cluster, tls=True)


def daemons(
    cluster: Cluster, etcd: EtcdCluster, n: int = 3, *extra: str, firewall: str = "nftables"
) -> list[Daemon]:
    ds = [daemon_on(h, etcd, TTL, *extra, firewall=firewall) for h in cluster.hosts[:n]]
    for d in ds:
        d.start()
    return ds


def etcd_is(d: Daemon, state: str) -> bool:
    return bool(cluster_status(d)["etcd"] == state)


def everyone_reaches_everyone(ds: list[Daemon], ips: list[str]) -> None:
    for i, d in enumerate(ds):
        for j, ip in enumerate(ips):
            assert ping(d, "w", ip), f"host{i + 1}'s namespace cannot ping host{j + 1}'s {ip}"
            # TCP too, and the source is the namespace's own address (routed, not NATed)
            assert tcp_read(d, "w", ip, 7000) == ips[i], f"TCP host{i + 1} -> host{j + 1}"


def test_three_hosts_over_vxlan_through_etcd_with_tls(
    cluster: Cluster, etcd_tls: EtcdCluster
) -> None:
    etcd = etcd_tls
    h1, h2, h3 = cluster.hosts[:3]
    ds = daemons(cluster, etcd)
    subnets = wait_joined(ds)
    assert len(set(subnets)) == 3
    ips = [plug_workload(d) for d in ds]  # leased from each host's own subnet
    for d, ip, net in zip(ds, ips, subnets, strict=True):
        assert ip.rsplit(".", 1)[0] == net.rsplit(".", 1)[0]
        peer_echo_server(d, "w", ip, 7000)
    everyone_reaches_everyone(ds, ips)

    # ctl peers --json: subnet, underlay, lease_age, in_place for each other host
    peers = ds[0].ctl_json("peers")  # ctl --json peers
    assert {p["subnet"] for p in peers} == {subnets[1], subnets[2]}
    for p in peers:
        assert p["in_place"] is True and p["lease_age"] >= 0
        assert p["underlay"] in (h2.underlay_ip, h3.underlay_ip)
    assert "etcd reachable" in ds[0].ok("status")
    # the kernel has flannel's three entries per peer on netagent.1
    routes = ds[0].sh("ip", "route", "show", "dev", "netagent.1").stdout
    assert f"{subnets[1]} via {subnets[1].split('/')[0]} proto 201 onlink" in routes
    fdb = ds[0].sh("bridge", "fdb", "show", "dev", "netagent.1").stdout
    assert f"dst {h2.underlay_ip} self permanent" in fdb
    # the picture draws the other hosts beyond the VXLAN device
    dot = ds[0].ok("show", "--graph", "--format", "dot")
    for net, host in ((subnets[1], h2), (subnets[2], h3)):
        assert f'"vxlan/netagent.1" -> "peer/{net}"' in dot
        assert f"underlay {host.underlay_ip}" in dot

    # a forward on host1 to a namespace on host2's subnet, reached from host3
    ds[0].ok("forward", "8080", f"{ips[1]}:7000")
    vtep1 = subnets[0].split("/")[0]
    assert tcp_read(ds[2], None, h1.underlay_ip, 8080) == vtep1  # masqueraded into the tunnel

    # one etcd member down changes nothing
    etcd.stop_member(0)
    ds[0].ok("ns", "add", "x")
    everyone_reaches_everyone(ds, ips)
    wait_for("host1 keeps etcd reachable", lambda: cluster_status(ds[0])["etcd"] == "reachable")
    assert all(peer_subnets(d) == set(subnets) - {subnets[i]} for i, d in enumerate(ds))
    etcd.start_member(0)

    # all members down: traffic flows, local requests are served, status says so
    for i in range(3):
        etcd.stop_member(i)
    for d in ds:
        wait_for("etcd unreachable said", functools.partial(etcd_is, d, "unreachable"))
    assert "etcd UNREACHABLE" in ds[1].ok("status")
    doctor = ds[1].ctl("doctor")
    assert doctor.returncode == 1 and "problem: etcd is unreachable" in doctor.stdout
    everyone_reaches_everyone(ds, ips)
    ds[1].ok("ns", "add", "y")
    assert all(p["in_place"] for p in ds[1].ctl_json("peers"))
    # back: a full resync, no peer lost or duplicated
    etcd.start_all()
    for d in ds:
        wait_for("etcd reachable again", functools.partial(etcd_is, d, "reachable"))
    wait_joined(ds)
    for i, d in enumerate(ds):
        rows = d.ctl_json("peers")
        assert sorted(r["subnet"] for r in rows) == sorted(set(subnets) - {subnets[i]})
    everyone_reaches_everyone(ds, ips)

    # a restarted host keeps its subnet (and the others keep reaching it)
    ds[1].restart()
    assert wait_joined(ds)[1] == subnets[1]
    everyone_reaches_everyone(ds, ips)

    # host3 powered off (kill -9 of everything in it): gone from the others within the TTL
    t0 = time.monotonic()
    cluster.remove_host(h3)
    alive = ds[:2]
    wait_for(
        "host3 gone from host1 and host2",
        lambda: all(subnets[2] not in peer_subnets(d) for d in alive),
        timeout=TTL + 10,
    )
    gone_after = time.monotonic() - t0
    assert gone_after <= TTL + 2, f"host3 was removed {gone_after:.1f} s after it died (TTL {TTL})"
    for d in alive:
        assert subnets[2] not in d.sh("ip", "route", "show", "dev", "netagent.1").stdout
    print(f"host3 gone from the others {gone_after:.2f} s after it died (TTL {TTL} s)")
    for d in alive:
        assert d.stop() == 0


@pytest.mark.parametrize("firewall", ["nftables", "iptables"])
def test_vxlan_from_a_non_peer_is_dropped(
    cluster: Cluster, etcd: EtcdCluster, firewall: str
) -> None:
    h1, h2 = cluster.hosts[:2]
    ds = daemons(cluster, etcd, 2, firewall=firewall)
    subnets = wait_joined(ds)
    ip2 = plug_workload(ds[1])
    mac2 = next(p["vtep_mac"] for p in ds[0].ctl_json("peers") if p["subnet"] == subnets[1])
    frame = vxlan_frame(1, mac2, subnets[0].split("/")[0], ip2)
    intruder = cluster.add_host("intruder")  # on the underlay, not in the cluster
    rx, drops = vxlan_rx(h2), guard_drops(ds[1])
    send_udp(intruder, h2.underlay_ip, 4789, frame)
    wait_for("the guard dropped it", lambda: guard_drops(ds[1]) == drops + 1)
    # the same frame from a peer's address goes in: the frame itself was fine
    send_udp(h1, h2.underlay_ip, 4789, frame)
    wait_for("host2's VXLAN device got the peer's frame", lambda: vxlan_rx(h2) > rx)
    assert vxlan_rx(h2) == rx + 1 and guard_drops(ds[1]) == drops + 1
    # and traffic between the two hosts' namespaces flows with this backend's guard
    ip1 = plug_workload(ds[0])
    assert ping(ds[0], "w", ip2) and ping(ds[1], "w", ip1)


def test_hosts_starting_together_never_share_a_subnet(cluster: Cluster, etcd: EtcdCluster) -> None:
    """Three hosts, three free subnets (a /22 of /24s, the first never leased): the
    random picks collide often; the create-if-absent transaction settles it."""
    ds = [daemon_on(h, etcd, TTL, "--cluster-cidr", "10.244.0.0/22") for h in cluster.hosts[:3]]
    for d in ds:
        d.start(wait=False)
    for d in ds:
        d.wait_ready()
    subnets = wait_joined(ds)
    assert sorted(subnets) == ["10.244.1.0/24", "10.244.2.0/24", "10.244.3.0/24"]
    keys = etcd.etcdctl("get", "/netagent/network/subnets/", "--prefix", "--keys-only").stdout
    assert len([k for k in keys.split() if k]) == 3
