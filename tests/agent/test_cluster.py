"""The cluster room over the fakes: hosts (each a world: FakeNetlink, FakeFirewall, the
real state, journal, reconciler and API) sharing one FakeStore (the etcd cluster).

What the e2e tests (``tests/e2e/test_cluster.py``) show with real daemons, real etcd
and real packets is pinned here in milliseconds: the join and its intents, the peers'
entries, leaving, an underlay change, etcd unreachable and back, a lost lease, a
restart, racing joins, mismatched settings and records that cannot be used.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest

from netagent.agent import clusterapi, subnets
from netagent.agent.cluster import Cluster
from netagent.agent.config import Config
from netagent.agent.errors import InvalidArgument
from netagent.agent.subnets import Record, Settings, node_id, vtep_mac
from netagent.backends.fakeetcd import FakeStore

from ..support.wait import until
from .world import World, make_world

PREFIX = "/netagent/network/subnets/"


@dataclass
class Host:
    w: World
    cluster: Cluster
    n: int

    @property
    def subnet(self) -> ipaddress.IPv4Network:
        assert self.cluster.subnet is not None
        return self.cluster.subnet

    def peers(self) -> dict[str, Any]:
        return {p["subnet"]: p for p in self.cluster.peers()}

    def fdb(self) -> dict[str, str]:
        index = self.w.net.host_index("netagent.1")
        return dict(self.w.net.fdb.get(index or -1, {}))

    def routes(self) -> dict[str, str]:
        index = self.w.net.host_index("netagent.1")
        return dict(self.w.net.routes.get(index or -1, {}))


def settings(n: int, **over: Any) -> Settings:
    values: dict[str, Any] = {
        "cluster_endpoints": ["http://198.51.100.4:2379"],
        "underlay": f"198.51.100.{n}",
        "cluster_host": f"host{n}",
        "cluster_lease_ttl": 10,
    }
    values.update(over)
    return Settings.from_config(Config(**values))


def make_host(tmp: Path, store: FakeStore, n: int, **over: Any) -> Host:
    w = make_world(tmp)
    w.net.add_address_to_host("eth0", ipaddress.ip_interface(f"198.51.100.{n}/24"))
    (tmp / "state").mkdir(exist_ok=True)
    cluster = Cluster(
        settings(n, **over),
        store,
        w.state,
        w.net,
        w.bus,
        node_id(tmp / "state"),
        clusterapi.state_of(w.rec),
        keepalive_interval=0.02,
        retry=0.02,
        conflict_retry=0.05,
    )
    w.api.cluster = cluster
    return Host(w, cluster, n)


@contextlib.asynccontextmanager
async def running(*hosts: Host) -> AsyncIterator[None]:
    """Each host's reconciler and cluster room run while the block does."""
    async with anyio.create_task_group() as tg:
        for h in hosts:
            tg.start_soon(h.w.rec.run)
            tg.start_soon(h.cluster.run, h.w.api.mutate)
        try:
            yield
        finally:
            tg.cancel_scope.cancel()


async def joined(*hosts: Host) -> None:
    for h in hosts:
        await until(lambda h=h: h.cluster.subnet is not None, f"{h.cluster.host} joined")  # type: ignore[misc]


async def see_each_other(*hosts: Host) -> None:
    await joined(*hosts)
    for h in hosts:
        others = {str(o.subnet) for o in hosts if o is not h}

        def ok(h: Host = h, others: set[str] = others) -> bool:
            peers = h.peers()
            return set(peers) == others and all(p["in_place"] for p in peers.values())

        await until(ok, f"{h.cluster.host} has every other host in place")


# ---- joining --------------------------------------------------------------------------
async def test_a_host_leases_a_subnet_and_gets_its_bridge_and_vxlan(tmp_path: Path) -> None:
    store = FakeStore()
    h = make_host(tmp_path, store, 1)
    async with running(h):
        await joined(h)
        net = h.subnet
        assert net.prefixlen == 24 and net.subnet_of(ipaddress.IPv4Network("10.244.0.0/16"))
        assert net != ipaddress.IPv4Network("10.244.0.0/24")  # the first is never leased
        record = Record.decode(store.keys[PREFIX + str(net).replace("/", "-")].value)
        assert (record.host, record.underlay, record.vtep_mac) == (
            "host1",
            "198.51.100.1",
            vtep_mac(net),
        )
        assert json.loads(store.keys["/netagent/network/config"].value) == {
            "cidr": "10.244.0.0/16",
            "subnet_len": 24,
            "vni": 1,
            "port": 4789,
        }
        await until(
            lambda: "br/netagent0" in h.w.state and "vxlan/netagent.1" in h.w.state, "intents"
        )
        bridge = h.w.state.get("br/netagent0")
        assert bridge is not None and bridge.to_dict()["addresses"] == [f"{net[1]}/24"]
        await until(lambda: h.w.net.host_index("netagent.1") is not None, "the VXLAN device")
        vx = await h.w.net.vxlan("netagent.1")
        assert vx is not None and (vx.vni, vx.port, vx.local, vx.learning) == (
            1,
            4789,
            "198.51.100.1",
            False,
        )
        assert str(ipaddress.ip_interface(f"{net.network_address}/32")) in {
            str(a) for a in h.w.net.host.addrs[vx.link.index]
        }
        st = await h.w.call("status")
        assert st["cluster"]["etcd"] == "reachable" and st["cluster"]["subnet"] == str(net)
        # the guard is there, with no peer yet
        assert "rule vxlan-guard udp/4789 drop unless a peer" in h.w.fw.dump()


async def test_a_plug_without_address_leases_from_the_hosts_subnet(tmp_path: Path) -> None:
    h = make_host(tmp_path, FakeStore(), 1)
    async with running(h):
        await joined(h)
        await until(lambda: "br/netagent0" in h.w.state, "the bridge")
        await h.w.call("ns.add", name="red")
        await h.w.call("plug.add", ns="red", bridge="netagent0")
        plug = h.w.state.get("plug/red/netagent0")
        assert plug is not None
        assert plug.to_dict()["addresses"] == [f"{h.subnet[2]}/24"]


# ---- peers ----------------------------------------------------------------------------
async def test_three_hosts_program_each_other(tmp_path: Path) -> None:
    store = FakeStore()
    hosts = [make_host(tmp_path / f"h{n}", store, n) for n in (1, 2, 3)]
    async with running(*hosts):
        await see_each_other(*hosts)
        h1, h2, h3 = hosts
        assert h1.fdb() == {
            vtep_mac(h2.subnet): "198.51.100.2",
            vtep_mac(h3.subnet): "198.51.100.3",
        }
        assert h1.routes() == {str(h.subnet): str(h.subnet.network_address) for h in (h2, h3)}
        dump = h1.w.fw.dump()
        assert "rule vxlan-peer 198.51.100.2" in dump and "rule vxlan-peer 198.51.100.3" in dump
        row = h1.peers()[str(h2.subnet)]
        assert row["underlay"] == "198.51.100.2" and row["host"] == "host2"
        assert row["lease_age"] is not None and row["lease_age"] >= 0
        assert (await h1.w.call("peers")) == h1.cluster.peers()


async def test_a_peer_that_leaves_or_expires_is_removed(tmp_path: Path) -> None:
    store = FakeStore()
    h1, h2, h3 = (make_host(tmp_path / f"h{n}", store, n) for n in (1, 2, 3))
    async with running(h1):
        async with running(h2):
            async with running(h3):
                await see_each_other(h1, h2, h3)
                gone2, gone3 = str(h2.subnet), str(h3.subnet)
                lease3 = h3.cluster.lease
                store.fail_next("revoke")  # killed with -9: nothing is revoked
            assert lease3 in store.leases and gone3 in h1.routes()
            store.expire(lease3)  # its TTL ran out
            await until(lambda: gone3 not in h1.routes(), "host3 removed from host1")
            assert gone3 not in h1.peers() and "rule vxlan-peer 198.51.100.3" not in h1.w.fw.dump()
            assert gone2 in h1.routes()
        # host2 stopped cleanly: its lease was revoked
        await until(lambda: h1.routes() == {}, "host2 removed from host1")
        assert h1.fdb() == {} and h1.peers() == {}


async def test_a_peer_whose_underlay_changes_is_updated(tmp_path: Path) -> None:
    store = FakeStore()
    h1 = make_host(tmp_path, store, 1)
    async with running(h1):
        await joined(h1)
        other = ipaddress.IPv4Network("10.244.77.0/24")
        lease = await store.grant(10)
        rec = Record("n77", "host77", "198.51.100.77", vtep_mac(other), 1, 4789)
        store.put(PREFIX + "10.244.77.0-24", rec.encode(), lease)
        await until(lambda: h1.fdb().get(vtep_mac(other)) == "198.51.100.77", "host77 programmed")
        moved = Record("n77", "host77", "198.51.100.78", vtep_mac(other), 1, 4789)
        store.put(PREFIX + "10.244.77.0-24", moved.encode(), lease)
        await until(lambda: h1.fdb().get(vtep_mac(other)) == "198.51.100.78", "host77 moved")
        assert "rule vxlan-peer 198.51.100.77" not in h1.w.fw.dump()
        assert "rule vxlan-peer 198.51.100.78" in h1.w.fw.dump()


def _order(h: Host, subnet: str, ip: str) -> list[str]:
    """The host's kernel and firewall calls about one peer, in order."""
    out = []
    for call in h.w.net.calls:
        if call[0] in ("set_peer_entries", "del_peer_entries") and call[1] == subnet:
            out.append(call[0])
        elif call[0] == "fw.apply" and any(ip in str(step) for step in call[2]):
            out.append("fw")
    return out


async def test_the_guard_follows_a_peers_entries_coming_moving_and_going(
    tmp_path: Path,
) -> None:
    """In a pass of peers alone the VXLAN guard's element follows the peer's route and
    entries (its nft commit is not in the way of the route), whether the peer comes,
    moves to another underlay address or goes."""
    store = FakeStore()
    h1 = make_host(tmp_path, store, 1)
    async with running(h1):
        await joined(h1)
        other = "10.244.77.0/24"
        lease = await store.grant(10)
        rec = Record(
            "n77", "host77", "198.51.100.77", vtep_mac(ipaddress.IPv4Network(other)), 1, 4789
        )
        store.put(PREFIX + "10.244.77.0-24", rec.encode(), lease)
        await until(lambda: "rule vxlan-peer 198.51.100.77" in h1.w.fw.dump(), "host77 let in")
        assert _order(h1, other, "198.51.100.77") == ["set_peer_entries", "fw"]
        h1.w.net.calls.clear()
        moved = Record("n77", "host77", "198.51.100.78", rec.vtep_mac, 1, 4789)
        store.put(PREFIX + "10.244.77.0-24", moved.encode(), lease)
        await until(lambda: "rule vxlan-peer 198.51.100.78" in h1.w.fw.dump(), "host77 moved")
        assert _order(h1, other, "198.51.100.7") == ["set_peer_entries", "fw"]
        h1.w.net.calls.clear()
        store.delete(PREFIX + "10.244.77.0-24")
        await until(lambda: other not in h1.routes(), "host77 removed")
        await until(lambda: "vxlan-peer 198.51.100.78" not in h1.w.fw.dump(), "shut out")
        assert _order(h1, other, "198.51.100.78") == ["del_peer_entries", "fw"]


async def test_a_peer_is_journaled_without_a_disk_flush_and_a_failed_write_holds_it_not_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Peers mirror etcd: their journal lines skip fdatasync (etcd keeps them durable),
    a restart still finds them, and a write the disk refuses leaves the peer programmed
    and has the next change write a whole snapshot."""
    import os

    store = FakeStore()
    h1 = make_host(tmp_path / "h1", store, 1)
    async with running(h1):
        await joined(h1)
        await until(lambda: bool(h1.w.state.of_kind("vxlan")), "its own bridge and device")
        syncs: list[int] = []
        real_sync = os.fdatasync

        def counted(fd: int) -> None:
            syncs.append(fd)
            real_sync(fd)

        monkeypatch.setattr(os, "fdatasync", counted)
        lease = await store.grant(10)
        for n, fail in ((77, False), (78, True)):
            net = ipaddress.IPv4Network(f"10.244.{n}.0/24")
            rec = Record(f"n{n}", f"host{n}", f"198.51.100.{n}", vtep_mac(net), 1, 4789)
            if fail:  # the disk is full: neither a line nor a snapshot can be written

                def refuse(*args: Any, **kw: Any) -> None:
                    raise OSError(28, "No space left on device")

                monkeypatch.setattr(h1.w.store, "write", refuse)
                monkeypatch.setattr(h1.w.store, "compact", refuse)
            store.put(PREFIX + f"10.244.{n}.0-24", rec.encode(), lease)
            await until(lambda net=net: str(net) in h1.routes(), f"host{n} programmed")  # type: ignore[misc]
            if not fail:
                assert syncs == [], "the peer's line was not flushed"
        assert h1.w.store.behind, "the refused line is owed to the journal"
        monkeypatch.undo()
        await h1.w.call("bridge.add", name="br-after", addresses=["10.99.0.1/24"])
        assert not h1.w.store.behind, "the next change wrote a whole snapshot"
    again = make_host(tmp_path / "h1", store, 1)  # the same state dir
    assert {str(p.subnet) for p in again.w.state.of_kind("peer")} == {
        "10.244.77.0/24",
        "10.244.78.0/24",
    }


async def test_records_that_cannot_be_used_are_shown_not_programmed(tmp_path: Path) -> None:
    store = FakeStore()
    h1 = make_host(tmp_path, store, 1)
    async with running(h1):
        await joined(h1)
        store.put(PREFIX + "10.244.50.0-24", b"{not json")
        other_vni = Record(
            "n51",
            "host51",
            "198.51.100.51",
            vtep_mac(ipaddress.IPv4Network("10.244.51.0/24")),
            2,
            4789,
        )
        store.put(PREFIX + "10.244.51.0-24", other_vni.encode())
        store.put(PREFIX + "10.99.0.0-24", b"{}")  # outside the range: not the cluster's
        await until(lambda: len(h1.peers()) == 2, "both shown")
        rows = h1.peers()
        assert (
            rows["10.244.50.0/24"]["state"] == "refused"
            and "not valid" in rows["10.244.50.0/24"]["error"]
        )
        assert "VNI 2" in rows["10.244.51.0/24"]["error"]
        assert h1.w.state.of_kind("peer") == () and h1.routes() == {}


# ---- etcd out of reach ----------------------------------------------------------------
async def test_etcd_unreachable_keeps_everything_and_a_resync_catches_up(tmp_path: Path) -> None:
    store = FakeStore()
    h1, h2 = make_host(tmp_path / "h1", store, 1), make_host(tmp_path / "h2", store, 2)
    async with running(h1):
        async with running(h2):
            await see_each_other(h1, h2)
            before = (h1.routes(), h1.fdb(), h1.w.fw.dump())
            store.set_down(True)
            await until(lambda: h1.cluster.reachable is False, "host1 notices")
        # host2 is stopped too (its revoke failed: etcd is unreachable)
        assert h2.cluster.lease is None
        st = await h1.w.call("status")
        assert st["cluster"]["etcd"] == "unreachable" and st["cluster"]["error"]
        # local requests are served, and nothing of the data plane moved
        await h1.w.call("ns.add", name="red")
        assert (h1.routes(), h1.fdb(), h1.w.fw.dump()) == before
        # meanwhile (seen by etcd, not by host1): host2's lease ran out, host9 came
        store.down = False
        for lease in list(store.leases):
            if lease != h1.cluster.lease:
                store.expire(lease)
        net9 = ipaddress.IPv4Network("10.244.99.0/24")
        rec9 = Record("n9", "host9", "198.51.100.9", vtep_mac(net9), 1, 4789)
        store.put(PREFIX + "10.244.99.0-24", rec9.encode())
        store.set_down(True)  # what host1 may have opened meanwhile ends too
        store.set_down(False)
        await until(lambda: set(h1.peers()) == {str(net9)}, "host1 resynced")
        assert h1.cluster.reachable is True
        want = {str(net9): str(net9.network_address)}
        await until(lambda: h1.routes() == want, "host1's routes follow")
        assert "rule vxlan-peer 198.51.100.2" not in h1.w.fw.dump()


async def test_a_daemon_restarted_while_etcd_is_unreachable_keeps_its_peers(tmp_path: Path) -> None:
    store = FakeStore()
    h1, h2 = make_host(tmp_path / "h1", store, 1), make_host(tmp_path / "h2", store, 2)
    async with running(h1, h2):
        await see_each_other(h1, h2)
    store.set_down(True)
    again = make_host(tmp_path / "h1", store, 1)  # the same state dir: the journal
    assert [p.key for p in again.w.state.of_kind("peer")] == [
        f"peer/{h2.subnet}".replace("/24", "-24")
    ]
    async with running(again):
        await until(lambda: again.cluster.reachable is False, "it tried etcd")
        await again.w.rec.run_until_idle("start")
        assert again.w.state.of_kind("peer") and str(h2.subnet) in again.peers()


# ---- the lease ------------------------------------------------------------------------
async def test_a_lost_lease_is_taken_again_with_the_same_subnet(tmp_path: Path) -> None:
    store = FakeStore()
    h1 = make_host(tmp_path, store, 1)
    async with running(h1):
        await joined(h1)
        net, lease = h1.subnet, h1.cluster.lease
        assert lease is not None
        store.expire(lease)  # expired while out of reach
        await until(lambda: h1.cluster.lease not in (None, lease), "a new lease")
        assert h1.subnet == net
        assert store.keys[PREFIX + str(net).replace("/", "-")].lease == h1.cluster.lease


async def test_a_restarted_host_keeps_its_subnet(tmp_path: Path) -> None:
    store = FakeStore()
    h1 = make_host(tmp_path, store, 1)
    async with running(h1):
        await joined(h1)
        net, old = h1.subnet, h1.cluster.lease
    # killed (-9): its lease is still alive and holds the key; a clean stop revoked it
    assert old is not None and old not in store.leases  # this one was a clean stop
    again = make_host(tmp_path, store, 1)
    async with running(again):
        await joined(again)
        assert again.subnet == net
    # after kill -9 the old lease still holds the key: it is taken over, not lost
    killed = make_host(tmp_path, store, 1)
    lease = await store.grant(10)
    key = PREFIX + str(net).replace("/", "-")
    store.put(
        key, store.keys[key].value if key in store.keys else again.cluster._record(net), lease
    )
    async with running(killed):
        await joined(killed)
        assert killed.subnet == net and store.keys[key].lease == killed.cluster.lease


async def test_hosts_joining_at_the_same_moment_never_share_a_subnet(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every host picks the same subnet (the worst case of the random pick): the
    create-if-absent transaction lets one have it; the others look again."""
    monkeypatch.setattr(subnets, "pick", lambda free: next(iter(free), None))
    monkeypatch.setattr("netagent.agent.cluster.pick", lambda free: next(iter(free), None))
    store = FakeStore()
    hosts = [
        make_host(tmp_path / f"h{n}", store, n, cluster_cidr="10.244.0.0/22") for n in (1, 2, 3)
    ]
    async with running(*hosts):
        await joined(*hosts)
        held = [h.subnet for h in hosts]
        assert len(set(held)) == 3
        assert len([k for k in store.keys if k.startswith(PREFIX)]) == 3


async def test_a_full_range_is_refused_and_said(tmp_path: Path) -> None:
    store = FakeStore()
    hosts = [make_host(tmp_path / f"h{n}", store, n, cluster_cidr="10.244.0.0/23") for n in (1, 2)]
    async with running(*hosts):
        await until(lambda: sum(h.cluster.subnet is not None for h in hosts) == 1, "one joined")
        left = next(h for h in hosts if h.cluster.subnet is None)
        await until(lambda: bool(left.cluster.error), "the other says why")
        assert "every subnet of 10.244.0.0/23 is leased" in (left.cluster.error or "")


async def test_hosts_that_disagree_on_the_settings_do_not_join(tmp_path: Path) -> None:
    store = FakeStore()
    h1 = make_host(tmp_path / "h1", store, 1)
    h2 = make_host(tmp_path / "h2", store, 2, cluster_vni=7)
    async with running(h1, h2):
        await joined(h1)
        await until(lambda: bool(h2.cluster.error), "host2 refused")
        assert "differ from this host's" in (h2.cluster.error or "") and h2.cluster.subnet is None


def test_settings_refuse_what_cannot_work() -> None:
    for bad in (
        {"cluster_cidr": "10.244.0.0/24", "cluster_subnet_len": 24},
        {"cluster_cidr": "nonsense"},
        {"cluster_vni": 0},
        {"cluster_port": 70000},
        {"underlay": "fe80::1"},
        {"cluster_cert": "/x.pem"},
        {"cluster_lease_ttl": 1},
    ):
        with pytest.raises(InvalidArgument):
            Config(cluster_endpoints=["http://198.51.100.4:2379"], **bad).check()
    s = settings(1)
    assert s.subnet_of(PREFIX + "10.244.3.0-24") == ipaddress.IPv4Network("10.244.3.0/24")
    assert s.subnet_of(PREFIX + "10.244.3.0-25") is None
    assert vtep_mac(ipaddress.IPv4Network("10.244.1.0/24")) == "0a:58:0a:f4:01:00"


async def test_a_purge_is_followed_by_the_cluster_putting_its_own_back(tmp_path: Path) -> None:
    store = FakeStore()
    h1, h2 = make_host(tmp_path / "h1", store, 1), make_host(tmp_path / "h2", store, 2)
    async with running(h1, h2):
        await see_each_other(h1, h2)
        await h1.w.call("purge")
        await until(
            lambda: "vxlan/netagent.1" in h1.w.state and str(h2.subnet) in h1.routes(),
            "the bridge, the device and the peer back",
        )
        assert "br/netagent0" in h1.w.state
