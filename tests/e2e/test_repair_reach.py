"""A repaired plug is reachable at once: its veth comes back with the MAC its neighbours
know (derived from the intent), and announces itself when it comes up."""

from __future__ import annotations

import json

import pytest

from tests.support.daemon import Daemon
from tests.support.net import ping
from tests.support.topology import build_seed
from tests.support.wait import wait_for

pytestmark = pytest.mark.e2e


def mac(d: Daemon, ns: str | None, name: str) -> str:
    argv = (
        ["ip", "-j", "link", "show", name]
        if ns is None
        else ["ip", "-n", ns, "-j", "link", "show", name]
    )
    return str(json.loads(d.sh(*argv).stdout)[0]["address"])


def test_a_deleted_plug_comes_back_with_its_macs_and_is_reachable_at_once(daemon: Daemon) -> None:
    build_seed(daemon, forward=False)
    assert ping(daemon, "blue", "192.168.15.1")  # blue has red's MAC in its neighbour table
    inner, host, bridge = (
        mac(daemon, "red", "veth-red"),
        mac(daemon, None, "veth-red-br"),
        mac(daemon, None, "v-net-0"),
    )
    daemon.sh("ip", "link", "del", "veth-red-br")
    wait_for(
        "red's veth back",
        lambda: (
            daemon.sh("ip", "-n", "red", "link", "show", "veth-red", check=False).returncode == 0
        ),
    )
    assert mac(daemon, "red", "veth-red") == inner
    assert mac(daemon, None, "veth-red-br") == host
    assert mac(daemon, None, "v-net-0") == bridge
    # reachable within a second or two, not after blue's stale neighbour entry ages out
    wait_for("blue reaches red again", lambda: ping(daemon, "blue", "192.168.15.1"), timeout=4)
    announce = daemon.sh(
        "ip", "netns", "exec", "red", "sysctl", "-n", "net.ipv4.conf.veth-red.arp_notify"
    ).stdout.strip()
    assert announce == "1"
