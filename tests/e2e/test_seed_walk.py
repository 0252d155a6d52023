"""The seed's walk through the real daemon and CLI, with real packets."""

from __future__ import annotations

import json
import re

import pytest

from tests.support.daemon import Daemon
from tests.support.net import http_get, ping, serve_http
from tests.support.topology import BACKENDS, CLIENT_HOST, add_client, build_seed, show

pytestmark = pytest.mark.e2e
#: forward 80's map element as nft lists it (with its counter)
ELEMENT_80 = re.compile(r"\b80 (?:counter packets \d+ bytes \d+ )?: 192\.168\.15\.2 \. 80\b")


def test_wire_ping_and_arp(daemon: Daemon) -> None:
    daemon.ok("ns", "add", "red")
    daemon.ok("ns", "add", "blue")
    out = daemon.ok("wire", "red", "192.168.15.1/24", "blue", "192.168.15.2/24")
    assert "added" in out
    assert ping(daemon, "red", "192.168.15.2")
    blue = daemon.sh("ip", "-n", "blue", "-o", "link", "show", "veth-blue").stdout
    mac = re.search(r"link/ether (\S+)", blue)
    assert mac is not None
    neigh = daemon.ok("neigh", "--ns", "red")
    assert "192.168.15.2" in neigh and mac.group(1) in neigh
    daemon.ok("unwire", "red", "blue")
    assert daemon.sh("ip", "-n", "red", "link", "show", "veth-red", check=False).returncode != 0


@pytest.mark.parametrize("daemon", BACKENDS, indirect=True)
def test_bridge_forward_from_outside_host_and_localhost(daemon: Daemon) -> None:
    build_seed(daemon)
    assert ping(daemon, "red", "192.168.15.2")
    assert ping(daemon, "blue", "192.168.15.1")
    assert ping(daemon, None, "192.168.15.1")
    routes = daemon.ok("routes", "--ns", "red")
    assert re.search(r"default\s+192\.168\.15\.5\s+veth-red", routes)
    links = daemon.ok("links", "--ns", "red")
    assert "192.168.15.1/24" in links and "plug/red/v-net-0" in links
    # the host end is enslaved to the bridge
    host = daemon.sh("ip", "-o", "link", "show", "veth-red-br").stdout
    assert "master v-net-0" in host and "state UP" in host
    add_client(daemon)
    serve_http(daemon, "blue", "192.168.15.2", 80, "hello from blue")
    assert http_get(daemon, "client", f"http://{CLIENT_HOST}:80/") == "hello from blue"
    assert http_get(daemon, None, f"http://{CLIENT_HOST}:80/") == "hello from blue"
    assert http_get(daemon, None, "http://127.0.0.1:80/") == "hello from blue"
    assert daemon.sh("sysctl", "-n", "net.ipv4.ip_forward").stdout.strip() == "1"
    if daemon.firewall == "nftables":
        # the forward is exactly one map element in netagent's own table
        table = daemon.sh("nft", "list", "table", "inet", "netagent").stdout
        assert len(ELEMENT_80.findall(table)) == 1
    else:
        rules = daemon.sh("iptables-save", "-t", "nat").stdout
        assert (
            rules.count("--to-destination 192.168.15.2:80") == 1
        )  # one rule, both hooks jump to it
    result = show(daemon)
    assert all(i["in_place"] for i in result["intents"]), result
    assert result["firewall"]["in_place"] is True


@pytest.mark.parametrize("daemon", BACKENDS, indirect=True)
def test_transit_traffic_is_not_translated(daemon: Daemon) -> None:
    """Only traffic addressed to the host is DNATed (CNI portmap GHSA-jv3w-x3r3-g6rm):
    a packet to port 80 of red, passing through the host, must reach red, not blue."""
    build_seed(daemon)
    add_client(daemon)
    serve_http(daemon, "blue", "192.168.15.2", 80, "blue")
    serve_http(daemon, "red", "192.168.15.1", 80, "red")
    daemon.sh("ip", "-n", "client", "route", "add", "192.168.15.0/24", "via", CLIENT_HOST)
    daemon.sh("ip", "-n", "red", "route", "add", "203.0.113.0/24", "via", "192.168.15.5")
    assert http_get(daemon, "client", "http://192.168.15.1:80/") == "red"
    assert http_get(daemon, "client", f"http://{CLIENT_HOST}:80/") == "blue"


@pytest.mark.parametrize("daemon", BACKENDS, indirect=True)
def test_restart_keeps_state_and_data_plane(daemon: Daemon) -> None:
    build_seed(daemon)
    add_client(daemon)
    serve_http(daemon, "blue", "192.168.15.2", 80, "up")
    before = show(daemon)
    assert daemon.stop() == 0
    # the daemon is down: forwards keep forwarding
    assert http_get(daemon, "client", f"http://{CLIENT_HOST}:80/") == "up"
    daemon.start()
    after = show(daemon)
    assert [i["intent"] for i in after["intents"]] == [i["intent"] for i in before["intents"]]
    assert all(i["in_place"] for i in after["intents"])
    # nothing duplicated: one veth per plug, one element per forward
    links = daemon.sh("ip", "-o", "link").stdout
    assert links.count("veth-red-br") == 1 and links.count("veth-blue-br") == 1
    if daemon.firewall == "nftables":
        ruleset = daemon.sh("nft", "list", "ruleset").stdout
        assert len(ELEMENT_80.findall(ruleset)) == 1
    else:
        saved = daemon.sh("iptables-save", "-t", "nat").stdout
        assert saved.count("-j NETAGENT-PREROUTING") == 1
        assert saved.count("--to-destination 192.168.15.2:80") == 1
    assert http_get(daemon, "client", f"http://{CLIENT_HOST}:80/") == "up"
    # the restarted daemon's own log (not the first run's) says it reconciled the
    # loaded state before it said it was ready
    events = daemon.event_names(since_start=True)
    assert events.count("state loaded and reconciled") == 1, events
    assert events.count("netagent ready") == 1, events
    assert events.index("state loaded and reconciled") < events.index("netagent ready")
    [loaded] = [
        e
        for e in daemon.log_events(since_start=True)
        if e.get("event") == "state loaded and reconciled"
    ]
    assert loaded["intents"] == len(before["intents"])


def test_repeat_reports_nothing_changed(daemon: Daemon) -> None:
    build_seed(daemon)
    for args in (
        ("ns", "add", "red"),
        ("bridge", "add", "v-net-0", "--address", "192.168.15.5/24"),
        ("plug", "red", "v-net-0", "--address", "192.168.15.1/24"),
        ("forward", "80", "192.168.15.2:80"),
    ):
        r = daemon.ctl(*args)
        assert r.returncode == 0, r.stderr
        assert "nothing changed" in r.stdout
    reply = json.loads(daemon.ctl("ns", "add", "red", json_out=True).stdout)
    assert reply["ok"] is True and reply["result"]["changed"] is False


def test_status_and_lists(daemon: Daemon) -> None:
    build_seed(daemon)
    status = daemon.status()
    assert status["firewall"] == "nftables" and status["intents"] == 6
    assert "2 namespaces" in status["summary"]
    assert "v-net-0" in daemon.ok("bridge", "list")
    assert "192.168.15.2:80" in daemon.ok("forwards")
    ns = daemon.ok("ns", "list")
    assert "red" in ns and "blue" in ns
    daemon.ok("unforward", "80")
    assert "no forwards" in daemon.ok("forwards")
    assert "192.168.15.2 . 80" not in daemon.sh("nft", "list", "ruleset").stdout
