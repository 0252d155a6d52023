"""Auto-attach and self-repair: the real daemon reacting to the kernel, in a sandbox."""

from __future__ import annotations

import json
import queue
import subprocess
import threading
import time
from collections.abc import Callable

import pytest

from tests.conftest import Daemon, netagent_argv
from tests.e2e.helpers import build_seed, ping, show

pytestmark = pytest.mark.e2e


def wait_for(pred: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def master_of(d: Daemon, ifname: str) -> str | None:
    out = d.sh("ip", "-o", "link", "show", ifname, check=False).stdout
    if " master " not in out:
        return None
    return out.split(" master ")[1].split()[0]


def veth(d: Daemon, name: str, peer: str) -> None:
    d.sh("ip", "link", "add", name, "type", "veth", "peer", "name", peer)


class Events:
    """``netagent ctl events --json`` running as a real CLI process, read by a thread."""

    def __init__(self, d: Daemon) -> None:
        self.proc = subprocess.Popen(
            [*netagent_argv(), "ctl", "--socket", d.socket, "events", "--json"],
            stdout=subprocess.PIPE,
            text=True,
        )
        self.queue: queue.Queue[dict[str, object]] = queue.Queue()
        self.seen: list[dict[str, object]] = []
        threading.Thread(target=self._read, daemon=True).start()
        self.until(lambda e: e.get("type") == "watching")  # subscribed

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.queue.put(json.loads(line))

    def until(
        self, pred: Callable[[dict[str, object]], bool], timeout: float = 10
    ) -> dict[str, object]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                event = self.queue.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                break
            self.seen.append(event)
            if pred(event):
                return event
        raise AssertionError(f"event not seen; got {[e.get('type') for e in self.seen]}")

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(5)


def test_attach_rules_new_and_existing(daemon: Daemon) -> None:
    daemon.ok("bridge", "add", "v-net-0", "--address", "192.168.15.5/24")
    veth(daemon, "veth-old-br", "old-peer")  # exists before the rule
    events = Events(daemon)
    try:
        daemon.ok("attach", "add", "veth-*-br", "v-net-0")
        assert master_of(daemon, "veth-old-br") == "v-net-0"
        veth(daemon, "veth-new-br", "new-peer")
        wait_for(lambda: master_of(daemon, "veth-new-br") == "v-net-0", what="new veth attached")
        flags = daemon.sh("ip", "-o", "link", "show", "veth-new-br").stdout.split("<")[1]
        assert "UP" in flags.split(">")[0].split(",")  # set up (admin), as the rule says
        assert master_of(daemon, "new-peer") is None  # the peer does not match
        ev = events.until(
            lambda e: e.get("type") == "attached" and e.get("ifname") == "veth-new-br"
        )
        assert ev["bridge"] == "v-net-0"
    finally:
        events.close()
    assert "veth-*-br" in daemon.ok("attach", "list")
    # a rule that could claim the same names for another bridge is refused
    daemon.ok("bridge", "add", "br1")
    r = daemon.ctl("attach", "add", "veth-*", "br1")
    assert r.returncode == 4 and "same interfaces" in r.stderr
    # rules are desired state: they survive a restart and still act
    daemon.restart()
    assert "veth-*-br" in daemon.ok("attach", "list")
    assert any(i["key"] == "rule/v-net-0/veth-*-br" for i in show(daemon)["intents"])
    veth(daemon, "veth-late-br", "late-peer")
    wait_for(lambda: master_of(daemon, "veth-late-br") == "v-net-0", what="attach after restart")


def test_foreign_bridge_is_never_stolen(daemon: Daemon) -> None:
    daemon.ok("bridge", "add", "v-net-0")
    daemon.sh("ip", "link", "add", "theirs", "type", "bridge")
    veth(daemon, "veth-x-br", "x-peer")
    daemon.sh("ip", "link", "set", "veth-x-br", "master", "theirs")
    events = Events(daemon)
    try:
        daemon.ok("attach", "add", "veth-*-br", "v-net-0")
        ev = events.until(lambda e: e.get("type") == "left-alone")
        assert ev["ifname"] == "veth-x-br" and ev["master"] == "theirs"
        veth(daemon, "veth-y-br", "y-peer")
        daemon.sh("ip", "link", "set", "veth-y-br", "master", "theirs")
        time.sleep(0.3)
    finally:
        events.close()
    assert master_of(daemon, "veth-x-br") == "theirs"
    assert master_of(daemon, "veth-y-br") == "theirs"


def test_burst_of_1000_all_attached(daemon: Daemon) -> None:
    daemon.ok("bridge", "add", "br-burst")
    daemon.ok("attach", "add", "bst*", "br-burst")
    batch = daemon.dir / "burst.batch"
    batch.write_text("".join(f"link add bst{i} type veth peer name pbst{i}\n" for i in range(1000)))
    daemon.sh("ip", "-batch", str(batch), timeout=120)

    def attached() -> int:
        out = daemon.sh("ip", "-o", "link", "show", "master", "br-burst").stdout
        return sum(1 for line in out.splitlines() if ": bst" in line)

    wait_for(lambda: attached() == 1000, timeout=30, what="1000 attached")


def test_self_repair(daemon: Daemon) -> None:
    build_seed(daemon, forward=False)
    daemon.ok("attach", "add", "tap*", "v-net-0")
    veth(daemon, "tap0", "p-tap0")
    wait_for(lambda: master_of(daemon, "tap0") == "v-net-0", what="tap0 attached")
    events = Events(daemon)
    try:
        # the bridge deleted: back with its address, plugged ports and attached interfaces
        daemon.sh("ip", "link", "del", "v-net-0")
        wait_for(
            lambda: (
                master_of(daemon, "veth-red-br") == "v-net-0"
                and master_of(daemon, "veth-blue-br") == "v-net-0"
                and master_of(daemon, "tap0") == "v-net-0"
                and "192.168.15.5/24" in daemon.sh("ip", "addr", "show", "v-net-0").stdout
            ),
            what="bridge repaired",
        )
        events.until(lambda e: e.get("type") == "repaired" and e.get("key") == "br/v-net-0")
        wait_for(lambda: ping(daemon, "red", "192.168.15.2"), what="red reaches blue again")
        # a plugged namespace's veth deleted
        daemon.sh("ip", "link", "del", "veth-blue-br")
        wait_for(lambda: ping(daemon, "blue", "192.168.15.1"), what="blue re-plugged")
        # a namespace netagent made, deleted
        daemon.sh("ip", "netns", "del", "red")
        wait_for(
            lambda: (
                daemon.sh(
                    "ip", "netns", "exec", "red", "ping", "-c1", "-W1", "192.168.15.2", check=False
                ).returncode
                == 0
            ),
            what="red recreated and re-plugged",
        )
        # an address and a route it set, removed
        daemon.sh("ip", "-n", "blue", "addr", "flush", "dev", "veth-blue")
        wait_for(
            lambda: "192.168.15.2/24" in daemon.sh("ip", "-n", "blue", "addr").stdout,
            what="address back",
        )
        daemon.sh("ip", "-n", "blue", "route", "del", "default")
        wait_for(
            lambda: "default via 192.168.15.5" in daemon.sh("ip", "-n", "blue", "route").stdout,
            what="route back",
        )
        daemon.sh("ip", "addr", "flush", "dev", "v-net-0")
        wait_for(
            lambda: "192.168.15.5/24" in daemon.sh("ip", "addr", "show", "v-net-0").stdout,
            what="bridge address back",
        )
        events.until(lambda e: e.get("type") == "repaired" and "plug/blue" in str(e.get("key")))
    finally:
        events.close()
    result = show(daemon)
    assert all(i["in_place"] for i in result["intents"]), result


def test_nothing_foreign_is_taken_over(daemon: Daemon) -> None:
    """Names that exist and are not netagent's are refused, and left exactly as they are:
    a namespace, a bridge, an interface inside a namespace netagent does not own."""
    daemon.sh("ip", "netns", "add", "theirs")
    daemon.sh("ip", "link", "add", "user-br", "type", "bridge")
    daemon.sh("ip", "netns", "add", "ctr")
    daemon.sh(
        "ip", "link", "add", "ctr-host", "type", "veth", "peer", "name", "eth0", "netns", "ctr"
    )
    before = (
        daemon.sh("ip", "-d", "link").stdout,
        daemon.sh("ip", "-n", "ctr", "-d", "link", "show", "eth0").stdout,
        daemon.sh("ip", "-n", "theirs", "-d", "link").stdout,
    )
    r = daemon.ctl("ns", "add", "theirs")
    assert r.returncode == 4 and "not made by netagent" in r.stderr
    r = daemon.ctl("bridge", "add", "user-br")
    assert r.returncode == 4 and "not made by netagent" in r.stderr
    daemon.ok("bridge", "add", "v-net-0", "--address", "192.168.15.5/24")
    r = daemon.ctl("plug", "ctr", "v-net-0", "--address", "192.168.15.9/24", "--ifname", "eth0")
    assert r.returncode == 4 and "ctr:eth0 exists" in r.stderr
    # an outside namespace can be plugged under a free name (plugging sets its lo up),
    # and unplugging keeps the namespace
    daemon.ok("plug", "ctr", "v-net-0", "--address", "192.168.15.9/24", "--ifname", "eth1")
    daemon.ok("unplug", "ctr", "v-net-0")
    daemon.ok("bridge", "del", "v-net-0")
    after = (
        daemon.sh("ip", "-d", "link").stdout,
        daemon.sh("ip", "-n", "ctr", "-d", "link", "show", "eth0").stdout,
        daemon.sh("ip", "-n", "theirs", "-d", "link").stdout,
    )
    assert after == before
    assert "ctr" in daemon.sh("ip", "netns", "list").stdout


def test_nothing_foreign_is_touched(daemon: Daemon) -> None:
    build_seed(daemon, forward=False)
    daemon.sh("ip", "link", "add", "user-br", "type", "bridge")
    daemon.sh("ip", "addr", "add", "10.77.0.1/24", "dev", "user-br")
    daemon.sh("ip", "netns", "add", "theirs")
    before = daemon.sh("ip", "-d", "addr", "show", "user-br").stdout
    daemon.ctl("purge", "--yes", check=True)
    assert daemon.sh("ip", "-d", "addr", "show", "user-br").stdout == before
    names = [ln.split()[0] for ln in daemon.sh("ip", "netns", "list").stdout.splitlines()]
    assert names == ["theirs"]
    assert daemon.sh("ip", "link", "show", "v-net-0", check=False).returncode != 0


def test_failing_repair_backs_off(daemon: Daemon) -> None:
    daemon.ok("bridge", "add", "v-net-0", "--address", "192.168.15.5/24")
    # while the daemon is down (it would win the race otherwise), someone takes the
    # bridge's name with an interface that is not a bridge
    daemon.stop()
    daemon.sh("ip", "link", "del", "v-net-0")
    daemon.sh("ip", "link", "add", "v-net-0", "type", "veth", "peer", "name", "squat-peer")
    daemon.start()
    wait_for(
        lambda: bool(json.loads(daemon.ctl("status", json_out=True).stdout)["result"]["failing"]),
        what="failure reported",
    )
    time.sleep(3)
    passes = [
        e for e in daemon.log_events() if e.get("event") == "reconcile pass" and e.get("errors")
    ]
    # exponential backoff from 0.5 s: a handful of attempts in ~3 s, not hundreds
    assert 1 <= len(passes) <= 6, len(passes)
    status = json.loads(daemon.ctl("status", json_out=True).stdout)["result"]
    assert "not a bridge" in status["failing"]["br/v-net-0"]
    # the squatter is left alone
    assert "veth" in daemon.sh("ip", "-d", "link", "show", "v-net-0").stdout


def test_both_ends_of_a_veth_never_on_one_bridge(daemon: Daemon) -> None:
    """A rule matching both ends of a veth pair would make a layer-2 loop: the second end
    is left alone, whether the pair existed before the rule or appears after it."""
    daemon.ok("bridge", "add", "v-net-0")
    veth(daemon, "loopa", "loopb")
    daemon.ok("attach", "add", "loop*", "v-net-0")
    assert [master_of(daemon, "loopa"), master_of(daemon, "loopb")].count("v-net-0") == 1
    veth(daemon, "loopc", "loopd")
    wait_for(
        lambda: "v-net-0" in (master_of(daemon, "loopc"), master_of(daemon, "loopd")),
        what="one end attached",
    )
    time.sleep(0.3)
    assert [master_of(daemon, "loopc"), master_of(daemon, "loopd")].count("v-net-0") == 1


def test_lost_events_lose_no_interface(sandbox: object, workdir: object) -> None:
    """With a receive buffer far too small for a burst, the kernel drops events
    (ENOBUFS); the daemon resubscribes, dumps, resyncs, and every interface ends up
    attached. Two watchers see it all; one that never reads stalls nothing."""
    import os
    import socket
    from pathlib import Path

    from netagent.cli.sandbox import Sandbox

    assert isinstance(sandbox, Sandbox) and isinstance(workdir, Path)
    os.environ["NETAGENT_EVENT_RCVBUF"] = "4096"
    try:
        d = Daemon(sandbox, workdir)
        d.start()
    finally:
        del os.environ["NETAGENT_EVENT_RCVBUF"]
    try:
        d.ok("bridge", "add", "br-burst")
        d.ok("attach", "add", "bst*", "br-burst")
        watchers = [Events(d), Events(d)]
        # a watcher that subscribes and then never reads a byte
        stuck = socket.socket(socket.AF_UNIX)
        stuck.connect(d.socket)
        stuck.sendall(b'{"v":1,"op":"events"}\n')
        batch = d.dir / "burst.batch"
        batch.write_text(
            "".join(f"link add bst{i} type veth peer name pbst{i}\n" for i in range(300))
        )
        d.sh("ip", "-batch", str(batch), timeout=120)

        def attached() -> int:
            out = d.sh("ip", "-o", "link", "show", "master", "br-burst").stdout
            return sum(1 for line in out.splitlines() if ": bst" in line)

        wait_for(lambda: attached() == 300, timeout=30, what="300 attached")
        status = json.loads(d.ctl("status", json_out=True).stdout)["result"]
        assert status["event_resyncs"] >= 1
        for w in watchers:
            w.until(lambda e: e.get("type") == "resync")
            w.until(lambda e: e.get("type") == "attached")
            w.close()
        t0 = time.monotonic()
        d.call("status")
        assert time.monotonic() - t0 < 1.0  # the silent watcher holds nothing up
        stuck.close()
    finally:
        d.stop()
