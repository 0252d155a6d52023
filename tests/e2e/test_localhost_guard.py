"""Issue 9, item 7 (CVE-2020-8558, as kube-proxy closed it): the bridges have
``route_localnet`` for the 127.0.0.1 forward path, which would let root in a plugged
namespace reach host services bound to 127.0.0.1 only. Each backend drops packets to
127.0.0.0/8 that did not come from the host itself, unless their connection was DNATed
by netagent; a real datagram and a real SYN from red prove it, and the host's own
``127.0.0.1:PORT`` forward keeps working."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest

from tests.support.daemon import Daemon
from tests.support.net import http_get, serve_http, wait_ready_line
from tests.support.topology import BACKENDS, build_seed
from tests.support.wait import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.parametrize("daemon", BACKENDS, indirect=True)]

#: a host service on 127.0.0.1 only: prints each datagram and each connection it gets
LOCAL_SERVICE = r"""
import socket, select
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(("127.0.0.1", 5454))
t = socket.socket(); t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
t.bind(("127.0.0.1", 5455)); t.listen(8)
print("ready", flush=True)
while True:
    for s in select.select([u, t], [], [])[0]:
        if s is u:
            data, peer = u.recvfrom(100); print("datagram from", peer[0], flush=True)
            u.sendto(b"host-secret", peer)
        else:
            c, peer = t.accept(); print("connection from", peer[0], flush=True); c.close()
"""

#: what root in red does to send to the host's 127.0.0.1: route 127.0.0.1 via the
#: bridge's gateway ahead of red's own local table
ATTACK_SETUP = [
    ["sysctl", "-qw", "net.ipv4.conf.all.route_localnet=1"],
    ["sysctl", "-qw", "net.ipv4.conf.veth-red.route_localnet=1"],
    ["ip", "rule", "add", "pref", "10", "to", "127.0.0.1", "lookup", "100"],
    [
        "ip",
        "route",
        "add",
        "127.0.0.1/32",
        "via",
        "192.168.15.5",
        "dev",
        "veth-red",
        "table",
        "100",
    ],
    ["ip", "rule", "del", "pref", "0"],
    ["ip", "rule", "add", "pref", "100", "lookup", "local"],
]


def guard_drops(d: Daemon) -> int:
    """Packets the guard rule dropped so far."""
    if d.firewall == "nftables":
        out = d.sh("nft", "list", "chain", "inet", "netagent", "input").stdout
        line = next(x for x in out.splitlines() if "localhost-guard" in x)
        return int(line.split("packets ")[1].split()[0])
    out = d.sh("iptables", "-L", "NETAGENT-INPUT", "-v", "-x", "-n").stdout
    return sum(int(x.split()[0]) for x in out.splitlines()[2:] if "DROP" in x)


def send_datagram(d: Daemon) -> str:
    code = (
        "import socket\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\ns.settimeout(2)\n"
        "s.sendto(b'?',('127.0.0.1',5454))\n"
        "try: print(s.recv(100).decode())\nexcept OSError as e: print('ERROR', e)\n"
    )
    return d.in_ns("red", sys.executable, "-c", code, check=False).stdout.strip()


def send_syn(d: Daemon) -> str:
    code = (
        "import socket\ntry:\n"
        "    socket.create_connection(('127.0.0.1',5455),2); print('connected')\n"
        "except OSError as e: print('ERROR', e)\n"
    )
    return d.in_ns("red", sys.executable, "-c", code, check=False).stdout.strip()


def test_a_namespace_cannot_reach_the_hosts_localhost(daemon: Daemon) -> None:
    build_seed(daemon, forward=False)
    service: subprocess.Popen[Any] = daemon.box.popen(
        [sys.executable, "-c", LOCAL_SERVICE], stdout=subprocess.PIPE, text=True
    )
    wait_ready_line(service, "the host's 127.0.0.1 service")
    for argv in ATTACK_SETUP:
        daemon.in_ns("red", *argv)
    before = guard_drops(daemon)
    # a datagram: dropped by the guard (positive evidence: its counter), not answered
    assert send_datagram(daemon).startswith("ERROR")
    wait_for("the guard to count the datagram", lambda: guard_drops(daemon) > before)
    # a SYN: dropped too, so no connection
    seen = guard_drops(daemon)
    assert send_syn(daemon).startswith("ERROR")
    assert guard_drops(daemon) > seen
    # the service saw neither: close it, and read everything it printed
    daemon.box.stop(service)
    assert service.stdout is not None
    assert service.stdout.read() == ""
    # the host's own 127.0.0.1 path to a forward works as before
    serve_http(daemon, "blue", "192.168.15.2", 80, "via localhost")
    daemon.ok("forward", "80", "192.168.15.2:80")
    assert http_get(daemon, None, "http://127.0.0.1:80/") == "via localhost"
    # and red reaching a forward through 127.0.0.1 is netagent's own DNATed traffic
    assert http_get(daemon, "red", "http://127.0.0.1:80/") == "via localhost"
