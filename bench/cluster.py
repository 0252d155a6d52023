"""``make bench SECTIONS=cluster``: hosts joined over VXLAN through etcd, measured.

In one outer sandbox: an underlay bridge, a 3-member etcd 3.4 (each member a host of its
own), two netagent hosts joined, then:

* **join**: a new host's daemon started (the process the user runs) -> its subnet's
  gateway answers ping from both other hosts; p50 over several joins (a fresh host
  each time, so each is a real first join);
* **leave**: that daemon stopped (SIGTERM: its lease revoked) -> its route gone on both
  other hosts;
* **scale**: 1,000 simulated hosts' leases written into etcd -> host1 has all of them in
  place (its daemon's memory then); one more lease put / deleted at that size -> the
  kernel's route event on host1 (a raw netlink listener there), and the daemon's own
  figure (watch event -> the pass done).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
INSIDE = str(REPO / "bench" / "cluster_inside.py")
CIDR = "10.128.0.0/12"
TTL = 10
JOINS = 5
PEERS = 1000


def _pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(len(s) * p))]


def _status(socket: str) -> dict[str, Any] | None:
    from netagent.cli.client import Client

    try:
        with Client(socket, timeout=5) as c:
            result: dict[str, Any] = c.call("status")
            return result
    except Exception:
        return None


def _until(cond: Any, timeout: float, what: str, interval: float = 0.005) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise SystemExit(f"bench cluster: timed out waiting for {what}")
        time.sleep(interval)


def _pings(host: Any, addr: str) -> bool:
    argv = ["ping", "-c1", "-W", "0.3", addr]
    return bool(host.run(argv, check=False, timeout=10).returncode == 0)


def _routed(host: Any, subnet: str) -> bool:
    out = host.run(["ip", "route", "show", "dev", "netagent.1"], check=False, timeout=10).stdout
    return subnet in out


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def run() -> None:
    from netagent.cli.sandbox import Sandbox
    from tests.support.cluster import Cluster
    from tests.support.etcd import EtcdCluster, check_installed
    from tests.support.overlay import daemon_on, wait_joined

    print("\n== cluster: hosts over VXLAN through a 3-member etcd")
    why = check_installed()
    if why:
        print(f"skipped: {why}")
        return
    extra = ("--cluster-cidr", CIDR)
    box = Sandbox()
    try:
        with Cluster(box, hosts=2) as cl:
            nodes = [cl.add_host(f"etcd{i}") for i in (1, 2, 3)]
            with EtcdCluster(nodes) as etcd:
                etcd.start()
                ds = [daemon_on(h, etcd, TTL, *extra) for h in cl.hosts[:2]]
                for d in ds:
                    d.start()
                wait_joined(ds)
                others = cl.hosts[:2]
                joins, leaves = [], []
                for i in range(JOINS):
                    h = cl.add_host(f"join{i}")
                    d = daemon_on(h, etcd, TTL, *extra)
                    t0 = time.monotonic()
                    d.start(wait=False)
                    holder: list[str] = []

                    def subnet(d: Any = d, holder: list[str] = holder) -> bool:
                        st = _status(d.socket)
                        if st and st["cluster"] and st["cluster"]["subnet"]:
                            holder.append(st["cluster"]["subnet"])
                            return True
                        return False

                    _until(subnet, 30, "the new host's subnet")
                    net = holder[0]
                    gw = net.rsplit(".", 1)[0] + ".1"
                    done: list[float] = []

                    def reach(
                        o: Any, gw: str = gw, t0: float = t0, done: list[float] = done
                    ) -> None:
                        _until(lambda: _pings(o, gw), 30, f"{gw} from {o.name}", 0.0)
                        done.append(time.monotonic() - t0)

                    threads = [threading.Thread(target=reach, args=(o,)) for o in others]
                    for t in threads:
                        t.start()
                    for t in threads:
                        t.join()
                    joins.append(max(done))
                    t1 = time.monotonic()
                    d.stop()
                    _until(lambda net=net: not any(_routed(o, net) for o in others), 30, "leave")
                    leaves.append(time.monotonic() - t1)
                    cl.remove_host(h)
                print(
                    f"join: daemon start -> its subnet reachable from both other hosts: "
                    f"p50 {_pct(joins, 0.5):.2f} s, max {max(joins):.2f} s (n={len(joins)})"
                    "   target p50 <= 2 s"
                )
                print(
                    f"leave: SIGTERM (lease revoked) -> its route gone on both others: "
                    f"p50 {_pct(leaves, 0.5) * 1000:.0f} ms, max {max(leaves) * 1000:.0f} ms "
                    f"(n={len(leaves)})"
                )
                held = []
                for d in ds:
                    st = _status(d.socket)
                    assert st is not None and st["cluster"]["subnet"]
                    held.append(st["cluster"]["subnet"])
                _scale(box, cl.hosts[0], ds[0], etcd, held)
                for d in ds:
                    d.stop()
    finally:
        from tests.support.sandbox import stop_everything_in

        stop_everything_in(box)
        box.close()


def _free_block(held: list[str], count: int) -> str:
    """The first /24 of ``count`` consecutive ones in CIDR that no real host holds (the
    hosts pick theirs at random: a simulated lease on a real host's subnet would
    overwrite its record and never count as a peer)."""
    import ipaddress

    cidr = ipaddress.IPv4Network(CIDR)
    taken = {int(ipaddress.IPv4Network(h).network_address) for h in held}
    base = int(cidr.network_address) + 256  # the range's first subnet is never leased
    end = int(cidr.broadcast_address) + 1
    start = base
    while start + count * 256 <= end:
        clash = [t for t in taken if start <= t < start + count * 256]
        if not clash:
            return str(ipaddress.IPv4Network((start, 24)))
        start = max(clash) + 256
    raise SystemExit(f"bench cluster: no {count} free subnets in {CIDR} beside {held}")


def _scale(box: Any, host: Any, d: Any, etcd: Any, held: list[str]) -> None:
    prefix = "/netagent/network/subnets/"
    first = _free_block(held, PEERS + 10)  # the simulated hosts, and ten more one by one
    writer = box.popen(
        [sys.executable, INSIDE, "write", ",".join(f"{ip}:{p}" for ip, p in etcd.hostports),
         prefix, first, str(PEERS), "300"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert writer.stdout is not None and writer.stdin is not None
    before = _status(d.socket)
    assert before is not None
    want = before["cluster"]["peers"] + PEERS
    wrote = json.loads(writer.stdout.readline())

    def all_in_place() -> bool:
        st = _status(d.socket)
        return bool(st and st["cluster"]["peers_in_place"] >= want)

    try:
        _until(all_in_place, 60, f"{PEERS} peers in place", 0.01)
    except SystemExit:
        st = _status(d.socket)
        print(json.dumps(st, indent=1)[:3000])
        print(d.log()[-5000:])
        raise
    done_at = time.time()
    t_all = done_at - wrote["begin"]
    routes = host.run(["ip", "route", "show", "dev", "netagent.1"], timeout=30).stdout
    count = len(routes.splitlines())
    st = _status(d.socket)
    assert st is not None
    rss = _rss_mb(int(st["pid"]))
    print(
        f"scale: {PEERS:,} leases written in {wrote['end'] - wrote['begin']:.2f} s (transactions "
        f"of 100); all in place on host1 {t_all:.2f} s after the first write, "
        f"{done_at - wrote['end']:.2f} s after the last ({count} routes on netagent.1); "
        f"daemon RSS {rss:.0f} MB   targets <= 2 s, <= 150 MB"
    )
    adds: list[float] = []
    dels: list[float] = []
    own_add: list[float] = []
    own_del: list[float] = []
    for n in range(PEERS, PEERS + 10):
        for verb, out, own in (("put", adds, own_add), ("delete", dels, own_del)):
            import ipaddress

            net = ipaddress.IPv4Network(first)
            subnet = str(ipaddress.IPv4Network((int(net.network_address) + n * 256, 24)))
            lis = host.popen(
                [sys.executable, INSIDE, "route", subnet, "new" if verb == "put" else "del"],
                stdout=subprocess.PIPE, text=True,
            )  # fmt: skip
            assert lis.stdout is not None and lis.stdout.readline().strip() == "ready"
            writer.stdin.write(f"{verb} {n}\n")
            writer.stdin.flush()
            at = json.loads(writer.stdout.readline())["at"]
            seen = json.loads(lis.stdout.readline())["at"]
            lis.wait(10)
            out.append((seen - at) * 1000)
            st = _status(d.socket)
            if st and st["cluster"]["last_sync"]:
                own.append(float(st["cluster"]["last_sync"]["ms"]))
    print(
        f"one peer at {PEERS:,}: etcd put -> route in host1's kernel p50 {_pct(adds, 0.5):.1f} ms "
        f"(max {max(adds):.1f}); delete -> route gone p50 {_pct(dels, 0.5):.1f} ms "
        f"(max {max(dels):.1f}); the daemon's own part (watch event -> pass done) p50 "
        f"{statistics.median(own_add or [0]):.1f} / {statistics.median(own_del or [0]):.1f} ms"
        "   target <= 10 ms"
    )
    t0 = time.time()
    writer.stdin.write("revoke\n")
    writer.stdin.flush()
    writer.stdout.readline()

    def gone() -> bool:
        s = _status(d.socket)
        return bool(s and s["cluster"]["peers"] <= before["cluster"]["peers"])

    _until(gone, 120, "the simulated peers gone", 0.01)
    writer.wait(30)
    print(f"scale: {PEERS:,} leases revoked at once -> all removed from host1 in "
          f"{time.time() - t0:.2f} s")  # fmt: skip
