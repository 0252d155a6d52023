"""Auto-attach and self-repair: the real daemon reacting to the kernel, in a sandbox.

Checks that the daemon did *not* do something (steal an interface, close a loop) first
wait for the daemon's own report that it looked at that interface (``left-alone`` on the
event stream) or for a later interface to be attached, and only then look."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from netagent.cli.sandbox import Sandbox
from tests.support.daemon import Daemon
from tests.support.events import Event, EventStream
from tests.support.net import ping
from tests.support.state import not_in_place
from tests.support.topology import build_seed, show
from tests.support.wait import wait_for

pytestmark = pytest.mark.e2e

#: the first retry delay of a failing repair (README: "0.5 s doubling to 60 s")
BACKOFF_MIN = 0.5


def master_of(d: Daemon, ifname: str) -> str | None:
    out = d.sh("ip", "-o", "link", "show", ifname, check=False).stdout
    if " master " not in out:
        return None
    return out.split(" master ")[1].split()[0]


def veth(d: Daemon, name: str, peer: str) -> None:
    d.sh("ip", "link", "add", name, "type", "veth", "peer", "name", peer)


def is_event(kind: str, ifname: str | None = None, **fields: Any) -> Callable[[Event], bool]:
    """A predicate on events: of type ``kind``, for ``ifname``, with ``fields``."""

    def pred(e: Event) -> bool:
        return (
            e.get("type") == kind
            and (ifname is None or e.get("ifname") == ifname)
            and all(e.get(k) == v for k, v in fields.items())
        )

    return pred


def attached_count(d: Daemon, bridge: str, prefix: str) -> int:
    out = d.sh("ip", "-o", "link", "show", "master", bridge).stdout
    return sum(1 for line in out.splitlines() if f": {prefix}" in line)


def test_attach_rules_new_and_existing(daemon: Daemon) -> None:
    daemon.ok("bridge", "add", "v-net-0", "--address", "192.168.15.5/24")
    veth(daemon, "veth-old-br", "old-peer")  # exists before the rule
    with EventStream(daemon) as events:
        daemon.ok("attach", "add", "veth-*-br", "v-net-0")
        assert master_of(daemon, "veth-old-br") == "v-net-0"
        veth(daemon, "veth-new-br", "new-peer")
        wait_for("veth-new-br on v-net-0", lambda: master_of(daemon, "veth-new-br") == "v-net-0")
        flags = daemon.sh("ip", "-o", "link", "show", "veth-new-br").stdout.split("<")[1]
        assert "UP" in flags.split(">")[0].split(",")  # set up (admin), as the rule says
        assert master_of(daemon, "new-peer") is None  # the peer does not match
        ev = events.until("veth-new-br attached", is_event("attached", "veth-new-br"))
        assert ev["bridge"] == "v-net-0"
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
    wait_for(
        "veth-late-br attached after the restart",
        lambda: master_of(daemon, "veth-late-br") == "v-net-0",
    )


def test_foreign_bridge_is_never_stolen(daemon: Daemon) -> None:
    daemon.ok("bridge", "add", "v-net-0")
    daemon.sh("ip", "link", "add", "theirs", "type", "bridge")
    veth(daemon, "veth-x-br", "x-peer")
    daemon.sh("ip", "link", "set", "veth-x-br", "master", "theirs")
    with EventStream(daemon) as events:
        daemon.ok("attach", "add", "veth-*-br", "v-net-0")
        ev = events.until("veth-x-br left alone", is_event("left-alone", "veth-x-br"))
        assert ev["master"] == "theirs"
        # an interface that appears under a matching name already on another bridge: made
        # under another name, enslaved, then renamed, so it never matches while free
        veth(daemon, "y-tmp", "y-peer")
        daemon.sh("ip", "link", "set", "y-tmp", "master", "theirs")
        daemon.sh("ip", "link", "set", "y-tmp", "name", "veth-y-br")
        ev = events.until("veth-y-br left alone", is_event("left-alone", "veth-y-br"))
        assert ev["master"] == "theirs"
        # and the daemon has handled every event up to a later, free interface
        veth(daemon, "veth-z-br", "z-peer")
        events.until("veth-z-br attached", is_event("attached", "veth-z-br", bridge="v-net-0"))
    assert master_of(daemon, "veth-x-br") == "theirs"
    assert master_of(daemon, "veth-y-br") == "theirs"
    assert master_of(daemon, "veth-z-br") == "v-net-0"


def test_burst_of_1000_all_attached(daemon: Daemon) -> None:
    daemon.ok("bridge", "add", "br-burst")
    daemon.ok("attach", "add", "bst*", "br-burst")
    batch = daemon.dir / "burst.batch"
    batch.write_text("".join(f"link add bst{i} type veth peer name pbst{i}\n" for i in range(1000)))
    daemon.sh("ip", "-batch", str(batch), timeout=120)
    wait_for(
        "1000 interfaces on br-burst",
        lambda: attached_count(daemon, "br-burst", "bst") == 1000,
        timeout=30,
        interval=0.2,
    )


def test_self_repair(daemon: Daemon) -> None:
    build_seed(daemon, forward=False)
    daemon.ok("attach", "add", "tap*", "v-net-0")
    veth(daemon, "tap0", "p-tap0")
    wait_for("tap0 attached", lambda: master_of(daemon, "tap0") == "v-net-0")
    with EventStream(daemon) as events:
        # the bridge deleted: back with its address, plugged ports and attached interfaces
        daemon.sh("ip", "link", "del", "v-net-0")
        wait_for(
            "v-net-0 back with its address, plugs and tap0",
            lambda: (
                master_of(daemon, "veth-red-br") == "v-net-0"
                and master_of(daemon, "veth-blue-br") == "v-net-0"
                and master_of(daemon, "tap0") == "v-net-0"
                and "192.168.15.5/24" in daemon.sh("ip", "addr", "show", "v-net-0").stdout
            ),
        )
        events.until("br/v-net-0 repaired", is_event("repaired", key="br/v-net-0"))
        wait_for("red reaching blue again", lambda: ping(daemon, "red", "192.168.15.2"))
        # a plugged namespace's veth deleted
        daemon.sh("ip", "link", "del", "veth-blue-br")
        wait_for("blue re-plugged", lambda: ping(daemon, "blue", "192.168.15.1"))
        # a namespace netagent made, deleted
        daemon.sh("ip", "netns", "del", "red")
        wait_for(
            "red recreated and re-plugged",
            lambda: ping(daemon, "red", "192.168.15.2"),
        )
        # an address and a route it set, removed
        daemon.sh("ip", "-n", "blue", "addr", "flush", "dev", "veth-blue")
        wait_for(
            "blue's address back",
            lambda: "192.168.15.2/24" in daemon.sh("ip", "-n", "blue", "addr").stdout,
        )
        daemon.sh("ip", "-n", "blue", "route", "del", "default")
        wait_for(
            "blue's default route back",
            lambda: "default via 192.168.15.5" in daemon.sh("ip", "-n", "blue", "route").stdout,
        )
        daemon.sh("ip", "addr", "flush", "dev", "v-net-0")
        wait_for(
            "v-net-0's address back",
            lambda: "192.168.15.5/24" in daemon.sh("ip", "addr", "show", "v-net-0").stdout,
        )
        events.until(
            "plug/blue repaired",
            lambda e: e.get("type") == "repaired" and "plug/blue" in str(e.get("key")),
        )
    assert not_in_place(daemon) == []


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


def failed_attempts(d: Daemon, key: str) -> list[tuple[float, str]]:
    """(seconds, trigger) of each of this run's reconcile passes that failed on ``key``,
    from the log."""
    return [
        (datetime.fromisoformat(e["timestamp"]).timestamp(), str(e.get("trigger")))
        for e in d.log_events(since_start=True)
        if e.get("event") == "reconcile pass" and key in (e.get("errors") or {})
    ]


def test_failing_repair_backs_off(daemon: Daemon) -> None:
    daemon.ok("bridge", "add", "v-net-0", "--address", "192.168.15.5/24")
    # while the daemon is down (it would win the race otherwise), someone takes the
    # bridge's name with an interface that is not a bridge
    daemon.stop()
    daemon.sh("ip", "link", "del", "v-net-0")
    daemon.sh("ip", "link", "add", "v-net-0", "type", "veth", "peer", "name", "squat-peer")
    daemon.start()
    wait_for("the failure reported in status", lambda: daemon.status()["failing"])

    # Retries back off: after n failures the next retry waits 0.5 * 2**(n-1) s or more
    # (a busy machine only makes it later); retrying at once would make hundreds. Full
    # passes (start-up, resync, periodic) try every key whatever its backoff.
    def two_retries() -> list[tuple[float, str]] | None:
        attempts = failed_attempts(daemon, "br/v-net-0")
        return attempts if [t for _, t in attempts].count("retry") >= 2 else None

    attempts = wait_for("two failed retries of br/v-net-0", two_retries, timeout=30)
    print(
        f"failed attempts (s since the first, trigger): "
        f"{[(round(t - attempts[0][0], 3), why) for t, why in attempts]}"
    )
    assert attempts[0][1] == "start"
    for n in range(1, len(attempts)):
        if attempts[n][1] == "retry":
            waited = attempts[n][0] - attempts[n - 1][0]
            assert waited >= 0.9 * BACKOFF_MIN * 2 ** (n - 1), (n, waited, attempts)
    status = daemon.status()
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
    with EventStream(daemon) as events:
        veth(daemon, "loopc", "loopd")

        def one_attached_other_left_alone() -> tuple[str, str] | None:
            # in either order: the second end may be judged while the first is attaching
            attached = events.any_seen(
                lambda e: e.get("type") == "attached" and e.get("ifname") in ("loopc", "loopd")
            )
            if attached is None:
                return None
            other = "loopd" if attached["ifname"] == "loopc" else "loopc"
            return (
                (attached["ifname"], other)
                if events.any_seen(is_event("left-alone", other))
                else None
            )

        first, other = wait_for(
            "one end of loopc/loopd attached and the other reported left alone",
            one_attached_other_left_alone,
        )
    assert master_of(daemon, first) == "v-net-0"
    assert master_of(daemon, other) is None


def saw_both(w: EventStream) -> bool:
    return bool(w.any_seen(is_event("resync")) and w.any_seen(is_event("attached")))


def test_lost_events_lose_no_interface(sandbox: Sandbox, workdir: Path) -> None:
    """With a receive buffer far too small for a burst, the kernel drops events
    (ENOBUFS); the daemon resubscribes, dumps, resyncs, and every interface ends up
    attached. Two watchers see it all; one that never reads stalls nothing."""
    d = Daemon(sandbox, workdir, env={"NETAGENT_EVENT_RCVBUF": "4096"})
    d.start()
    watchers: list[EventStream] = []
    try:
        d.ok("bridge", "add", "br-burst")
        d.ok("attach", "add", "bst*", "br-burst")
        watchers = [EventStream(d), EventStream(d)]
        # a watcher that subscribes and then never reads a byte
        with socket.socket(socket.AF_UNIX) as stuck:
            stuck.settimeout(10)
            stuck.connect(d.socket)
            stuck.sendall(b'{"v":1,"op":"events"}\n')
            batch = d.dir / "burst.batch"
            batch.write_text(
                "".join(f"link add bst{i} type veth peer name pbst{i}\n" for i in range(300))
            )
            d.sh("ip", "-batch", str(batch), timeout=120)
            wait_for(
                "300 interfaces on br-burst",
                lambda: attached_count(d, "br-burst", "bst") == 300,
                timeout=30,
                interval=0.2,
            )
            assert d.status()["event_resyncs"] >= 1
            for n, w in enumerate(watchers):
                wait_for(f"a resync and an attach on watcher {n}'s stream", partial(saw_both, w))
            t0 = time.monotonic()
            d.call("status")
            assert time.monotonic() - t0 < 1.0  # the silent watcher holds nothing up
    finally:
        for w in watchers:
            w.close()
        d.stop()
