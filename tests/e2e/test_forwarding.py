"""Every forward feature with real packets, on each firewall backend."""

from __future__ import annotations

import json

import pytest

from tests.support.daemon import Daemon
from tests.support.net import (
    http_get,
    peer_echo_server,
    serve_http,
    tcp_read,
    udp_ask,
    udp_server,
)
from tests.support.topology import BACKENDS, CLIENT_HOST, add_client, build_seed, show

pytestmark = [pytest.mark.e2e, pytest.mark.parametrize("daemon", BACKENDS, indirect=True)]


def test_udp_ranges_and_host_ip(daemon: Daemon) -> None:
    build_seed(daemon, forward=False)
    add_client(daemon)
    # a second host address on the client link: --host-ip binds to one of them
    daemon.sh("ip", "addr", "add", "203.0.113.9/24", "dev", "to-client")
    udp_server(daemon, "blue", "192.168.15.2", 5353, "blue-udp")
    daemon.ok("forward", "53", "192.168.15.2:5353", "--proto", "udp")
    assert udp_ask(daemon, "client", CLIENT_HOST, 53, tries=3) == "blue-udp"
    # tcp 53 is another forward (none): nothing answers there
    assert tcp_read(daemon, "client", CLIENT_HOST, 53) == "ERROR"
    for port in (9000, 9001, 9002):
        serve_http(daemon, "blue", "192.168.15.2", port, f"range-{port}")
    daemon.ok("forward", "8000-8002", "192.168.15.2:9000-9002")
    for host_port, port in ((8000, 9000), (8002, 9002)):
        assert http_get(daemon, "client", f"http://{CLIENT_HOST}:{host_port}/") == f"range-{port}"
    # a range whose ports keep their numbers (one interval / one rule per block): its
    # first and last ports, both sides of a block's edge (63|64), nothing past its end
    for port in (7000, 7039, 7040, 7099):
        serve_http(daemon, "blue", "192.168.15.2", port, f"same-{port}")
    serve_http(daemon, "blue", "192.168.15.2", 7100, "past-the-end")
    daemon.ok("forward", "7000-7099", "192.168.15.2:7000-7099")
    for port in (7000, 7039, 7040, 7099):
        assert http_get(daemon, "client", f"http://{CLIENT_HOST}:{port}/") == f"same-{port}"
    assert http_get(daemon, "client", f"http://{CLIENT_HOST}:7100/").startswith("ERROR")
    # the same, bound to one host address
    serve_http(daemon, "red", "192.168.15.1", 6005, "red-6005")
    daemon.ok("forward", "6000-6009", "192.168.15.1:6000-6009", "--host-ip", "203.0.113.9")
    assert http_get(daemon, "client", "http://203.0.113.9:6005/") == "red-6005"
    assert http_get(daemon, "client", f"http://{CLIENT_HOST}:6005/").startswith("ERROR")
    serve_http(daemon, "red", "192.168.15.1", 80, "red")
    daemon.ok("forward", "8080", "192.168.15.1:80", "--host-ip", "203.0.113.9")
    assert http_get(daemon, "client", "http://203.0.113.9:8080/") == "red"
    assert http_get(daemon, "client", f"http://{CLIENT_HOST}:8080/").startswith("ERROR")
    rows = json.loads(daemon.ctl("forwards", json_out=True).stdout)["result"]
    assert {r["key"] for r in rows} == {
        "fwd/udp/53",
        "fwd/tcp/8000-8002",
        "fwd/tcp/7000-7099",
        "fwd/tcp/6000-6009/203.0.113.9",
        "fwd/tcp/8080/203.0.113.9",
    }
    # gone, the range's ports answer nothing
    daemon.ok("unforward", "7000-7099")
    assert http_get(daemon, "client", f"http://{CLIENT_HOST}:7040/").startswith("ERROR")


def test_hairpin_and_masquerade(daemon: Daemon) -> None:
    daemon.ok("ns", "add", "red")
    daemon.ok("ns", "add", "blue")
    daemon.ok("bridge", "add", "v-net-0", "--address", "192.168.15.5/24", "--masquerade")
    daemon.ok("plug", "red", "v-net-0", "--address", "192.168.15.1/24")
    daemon.ok("plug", "blue", "v-net-0", "--address", "192.168.15.2/24")
    add_client(daemon)
    serve_http(daemon, "blue", "192.168.15.2", 80, "blue")
    daemon.ok("forward", "80", "192.168.15.2:80")
    # hairpin: a namespace on the bridge reaching the forward through the host's address
    # (the forward's own target reaching itself this way is not supported: the kernel
    # drops a routed packet whose translated destination is its own source)
    assert http_get(daemon, "red", f"http://{CLIENT_HOST}:80/") == "blue"
    # masquerade: red reaches beyond the host and is seen as the host
    peer_echo_server(daemon, "client", "203.0.113.2", 7000)
    assert tcp_read(daemon, "red", "203.0.113.2", 7000) == CLIENT_HOST
    # without it, the client sees red's own address
    daemon.ok("bridge", "add", "v-net-0", "--address", "192.168.15.5/24")
    daemon.sh("conntrack", "-F", check=False)
    assert tcp_read(daemon, "red", "203.0.113.2", 7000) == "192.168.15.1"


def test_retarget_clears_conntrack(daemon: Daemon) -> None:
    build_seed(daemon, forward=False)
    add_client(daemon)
    udp_server(daemon, "blue", "192.168.15.2", 5000, "blue")
    udp_server(daemon, "red", "192.168.15.1", 5000, "red")
    daemon.ok("forward", "5000", "192.168.15.2:5000", "--proto", "udp")
    assert udp_ask(daemon, "client", CLIENT_HOST, 5000, sport=40000, tries=3) == "blue"
    daemon.ok("unforward", "5000", "--proto", "udp")
    daemon.ok("forward", "5000", "192.168.15.1:5000", "--proto", "udp")
    # the same flow (same source port) must now reach the new target, not the old one
    assert udp_ask(daemon, "client", CLIENT_HOST, 5000, sport=40000, tries=3) == "red"


def test_ipv6(daemon: Daemon) -> None:
    daemon.ok("ns", "add", "blue")
    daemon.ok(
        "bridge", "add", "v-net-0", "--address", "192.168.15.5/24", "--address", "fd00:15::5/64"
    )
    daemon.ok(
        "plug", "blue", "v-net-0", "--address", "192.168.15.2/24", "--address", "fd00:15::2/64"
    )
    add_client(daemon)
    daemon.sh("ip", "addr", "add", "fd00:99::1/64", "dev", "to-client", "nodad")
    daemon.sh("ip", "-n", "client", "addr", "add", "fd00:99::2/64", "dev", "eth0", "nodad")
    daemon.sh("ip", "-n", "client", "route", "add", "default", "via", "fd00:99::1")
    serve_http(daemon, "blue", "::", 80, "blue6")
    assert "default via fd00:15::5" in daemon.sh("ip", "-6", "-n", "blue", "route").stdout
    # the bridge's ports carry IPv6 frames with IPv6 off on themselves (PORT_IPV6)
    daemon.ok("ns", "add", "red")
    daemon.ok("plug", "red", "v-net-0", "--address", "fd00:15::3/64")
    ports = [
        lk["ifname"]
        for lk in json.loads(daemon.sh("ip", "-j", "link", "show", "master", "v-net-0").stdout)
    ]
    assert len(ports) == 2
    for port in ports:
        assert (
            daemon.sh("cat", f"/proc/sys/net/ipv6/conf/{port}/disable_ipv6").stdout.strip() == "1"
        )
    daemon.sh("ip", "netns", "exec", "red", "ping", "-6", "-c", "1", "-W", "5", "fd00:15::2")
    daemon.ok("forward", "80", "[fd00:15::2]:80")
    assert http_get(daemon, "client", "http://[fd00:99::1]:80/") == "blue6"
    # the IPv4 forward of the same port lives beside it
    daemon.ok("forward", "80", "192.168.15.2:80")
    assert http_get(daemon, "client", f"http://{CLIENT_HOST}:80/") == "blue6"
    assert all(i["in_place"] for i in show(daemon)["intents"])
