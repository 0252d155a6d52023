"""Plugs made at once (``agent/waves.py``) each land in their own namespace, addressed,
routed and reachable, and a bridge deleted under them brings them all back.

(`make bench scale`, 600 plugs in one apply, found one plug whose namespace file pyroute2
had closed before its creation was sent: it keeps a file it opened for a request until an
answer of that sequence number comes on any of its sockets. ``add_veth`` opens and closes
the files itself now; the collision needs hundreds of sockets, so this test does not
reproduce it, the benchmark's section does.)"""

from __future__ import annotations

import json

import pytest

from tests.support.daemon import Daemon
from tests.support.net import ping
from tests.support.wait import wait_for

pytestmark = pytest.mark.e2e

N = 24  # more than one wave (16)


def inner_links(d: Daemon, ns: str) -> list[str]:
    out = json.loads(d.sh("ip", "-n", ns, "-j", "link", "show").stdout)
    return sorted(link["ifname"] for link in out if link["ifname"] != "lo")


def test_plugs_made_at_once_each_land_in_their_own_namespace(daemon: Daemon) -> None:
    intents: list[dict[str, object]] = [
        {"kind": "bridge", "name": "v-wave", "addresses": ["10.77.0.1/24"]}
    ]
    for i in range(N):
        intents.append({"kind": "ns", "name": f"w{i}"})
        intents.append(
            {
                "kind": "plug",
                "ns": f"w{i}",
                "bridge": "v-wave",
                "addresses": [f"10.77.0.{i + 2}/24"],
            }
        )
    daemon.call("apply", {"intents": intents})
    for i in range(N):
        assert inner_links(daemon, f"w{i}") == [f"veth-w{i}"], f"w{i}"
        route = daemon.sh("ip", "-n", f"w{i}", "route", "show", "default").stdout
        assert "via 10.77.0.1" in route, f"w{i}: {route}"
    assert ping(daemon, "w0", f"10.77.0.{N + 1}")
    # the bridge deleted under them: all come back, each in its own namespace
    daemon.sh("ip", "link", "del", "v-wave")
    wait_for(
        "every port back on the bridge",
        lambda: (
            len(
                json.loads(
                    daemon.sh("ip", "-j", "link", "show", "master", "v-wave", check=False).stdout
                    or "[]"
                )
            )
            == N
        ),
    )
    for i in range(N):
        assert inner_links(daemon, f"w{i}") == [f"veth-w{i}"], f"w{i}"
    wait_for("w0 reaches the last again", lambda: ping(daemon, "w0", f"10.77.0.{N + 1}"))
