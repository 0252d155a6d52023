"""Attach rules with the real kernel: what ``*`` never takes, a detach put back on the
event, and ``show`` saying per rule what was attached and what was left alone."""

from __future__ import annotations

import pytest

from tests.support.daemon import Daemon
from tests.support.events import EventStream
from tests.support.topology import show
from tests.support.wait import wait_for

pytestmark = pytest.mark.e2e


def master_of(d: Daemon, name: str) -> str | None:
    out = d.sh("ip", "-o", "link", "show", name).stdout
    words = out.split()
    return words[words.index("master") + 1] if "master" in words else None


def test_star_takes_a_free_tap_and_leaves_the_uplink_and_a_foreign_bridges_veth(
    daemon: Daemon,
) -> None:
    # the host's "uplink": a veth carrying the host's address and default route
    daemon.sh("ip", "link", "add", "uplink0", "type", "veth", "peer", "name", "uplink0-p")
    daemon.sh("ip", "addr", "add", "203.0.113.1/24", "dev", "uplink0")
    daemon.sh("ip", "link", "set", "uplink0", "up")
    daemon.sh("ip", "route", "add", "default", "via", "203.0.113.254", "dev", "uplink0")
    # someone else's bridge with a veth on it, whose other end is free
    daemon.sh("ip", "link", "add", "theirs", "type", "bridge")
    daemon.sh("ip", "link", "add", "in-theirs", "type", "veth", "peer", "name", "out-theirs")
    daemon.sh("ip", "link", "set", "in-theirs", "master", "theirs")
    daemon.ok("bridge", "add", "v-net-0")
    events = EventStream(daemon)
    try:
        daemon.ok("attach", "add", "*", "v-net-0")
        daemon.sh("ip", "tuntap", "add", "tap0", "mode", "tap")
        events.until(
            "tap0 attached", lambda e: e.get("type") == "attached" and e.get("ifname") == "tap0"
        )
    finally:
        events.close()
    assert master_of(daemon, "tap0") == "v-net-0"
    # the proof that the others were looked at and refused is in show, with the reason
    rule = next(i for i in show(daemon)["intents"] if i["kind"] == "attach")
    assert "tap0" in rule["attached"]
    why = {left["ifname"]: left["why"] for left in rule["left_alone"]}
    assert "carries addresses of the host" in why["uplink0"]
    assert "would join theirs to v-net-0" in why["out-theirs"]
    assert master_of(daemon, "uplink0") is None
    assert master_of(daemon, "out-theirs") is None
    assert master_of(daemon, "in-theirs") == "theirs"
    assert "default via 203.0.113.254 dev uplink0" in daemon.sh("ip", "route").stdout


def test_a_detached_interface_is_put_back_on_the_event(daemon: Daemon) -> None:
    daemon.ok("bridge", "add", "v-net-0")
    daemon.ok("attach", "add", "tap*", "v-net-0")
    daemon.sh("ip", "tuntap", "add", "tap0", "mode", "tap")
    wait_for("tap0 attached", lambda: master_of(daemon, "tap0") == "v-net-0")
    passes = daemon.status()["passes"]
    daemon.sh("ip", "link", "set", "tap0", "nomaster")
    # within a second, long before the 30 s periodic pass
    wait_for("tap0 put back", lambda: master_of(daemon, "tap0") == "v-net-0", timeout=1.0)
    assert daemon.status()["last_pass"]["trigger"] != "periodic"
    assert daemon.status()["passes"] > passes
