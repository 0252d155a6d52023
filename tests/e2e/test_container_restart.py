"""A namespace tracked by name whose container restarts: netagent notices the old one
is empty (it does not report it in place), and follows the name to the new one."""

from __future__ import annotations

import subprocess

import pytest

from tests.support.daemon import Daemon
from tests.support.net import ping
from tests.support.topology import show
from tests.support.wait import wait_for

pytestmark = pytest.mark.e2e


def container(d: Daemon) -> subprocess.Popen[str]:
    """A 'container': a process in a network namespace of its own, printing its pid."""
    proc = d.box.popen(
        ["unshare", "--net", "sh", "-c", "echo $$; exec sleep 600"],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    proc.stdout.readline()
    return proc


def state_of(d: Daemon, key: str) -> tuple[str, list[str]]:
    item = next(i for i in show(d)["intents"] if i["key"] == key)
    return item["state"], item["missing"]


def test_a_restarted_container_is_noticed_and_followed(daemon: Daemon) -> None:
    daemon.ok("bridge", "add", "v-net-0", "--address", "192.168.15.5/24")
    first = container(daemon)
    daemon.sh("ip", "netns", "attach", "c2", str(first.pid))
    daemon.ok("plug", "c2", "v-net-0", "--address", "192.168.15.2/24")
    assert ping(daemon, None, "192.168.15.2")
    key = "plug/c2/v-net-0"
    assert state_of(daemon, key)[0] == "in place"

    daemon.box.stop(first)  # the container stops; its bind mount keeps the namespace
    wait_for("the empty namespace noticed", lambda: state_of(daemon, key)[0] == "stale", timeout=15)
    assert "no process is left in namespace c2" in state_of(daemon, key)[1][0]
    assert key in daemon.status()["stale"]

    # the runtime starts it again under the same name: netagent follows
    daemon.sh("ip", "netns", "del", "c2")
    second = container(daemon)
    daemon.sh("ip", "netns", "attach", "c2", str(second.pid))
    wait_for(
        "plugged into the new namespace", lambda: ping(daemon, None, "192.168.15.2"), timeout=15
    )
    wait_for("in place again", lambda: state_of(daemon, key)[0] == "in place", timeout=15)
    daemon.box.stop(second)


def test_an_external_namespace_deleted_is_not_reported_in_place(daemon: Daemon) -> None:
    """`ip netns del` of a namespace someone else made (its processes still running, or
    none): what is plugged into it is no longer reported in place, within seconds, not
    at the next periodic pass."""
    daemon.ok("bridge", "add", "v-net-0", "--address", "192.168.15.5/24")
    daemon.sh("ip", "netns", "add", "ext")
    daemon.ok("plug", "ext", "v-net-0", "--address", "192.168.15.3/24")
    key = "plug/ext/v-net-0"
    assert state_of(daemon, key)[0] == "in place"
    daemon.sh("ip", "netns", "del", "ext")
    wait_for(
        "the deleted namespace noticed",
        lambda: state_of(daemon, key)[0] != "in place",
        timeout=5,
    )
    state, missing = state_of(daemon, key)
    assert state in ("failing", "pending", "drifted"), (state, missing)
    # netagent lets go of the namespace too (its sockets there): it goes, and its veth
    wait_for("the namespace gone", lambda: not ping(daemon, None, "192.168.15.3"), timeout=15)
    wait_for(
        "the veth gone with it",
        lambda: "veth-ext-br" not in daemon.sh("ip", "-o", "link").stdout,
        timeout=15,
    )
