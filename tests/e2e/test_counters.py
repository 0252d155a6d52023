"""Counters with real packets, on each firewall backend: packets and bytes per forward
(its DNAT's counter: one first packet per connection), per plug and per bridge (their
interfaces), in ``forwards`` and ``show``; and a removed forward that never carried a
connection is removed without a walk of the conntrack table, one that did with it."""

from __future__ import annotations

from typing import Any

import pytest

from tests.support.daemon import Daemon
from tests.support.net import http_get, serve_http
from tests.support.topology import BACKENDS, CLIENT_HOST, add_client, build_seed, show
from tests.support.wait import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.parametrize("daemon", BACKENDS, indirect=True)]


def forward_row(d: Daemon, key: str) -> dict[str, Any]:
    rows: list[dict[str, Any]] = d.ctl_json("forwards")
    return next(r for r in rows if r["key"] == key)


def item(d: Daemon, key: str) -> dict[str, Any]:
    return next(i for i in show(d)["intents"] if i["key"] == key)


def test_counters_count_real_traffic(daemon: Daemon) -> None:
    build_seed(daemon)
    add_client(daemon)
    serve_http(daemon, "blue", "192.168.15.2", 80, "counted")
    assert forward_row(daemon, "fwd/tcp/80")["packets"] == 0
    for _ in range(3):
        assert http_get(daemon, "client", f"http://{CLIENT_HOST}:80/") == "counted"
    # counters answered may be up to 2 s old (docs/doctor.md): wait for the new read
    # three connections, each one first packet (a SYN: 60 bytes) through the DNAT
    row = wait_for(
        "three connections counted",
        lambda: (r := forward_row(daemon, "fwd/tcp/80"))["packets"] == 3 and r,
    )
    assert row["bytes"] >= 3 * 40, row
    blue = wait_for(
        "blue's plug to count them",
        lambda: (b := item(daemon, "plug/blue/v-net-0"))["packets"] >= 18 and b,
    )
    assert blue["rx"][0] > 0 and blue["tx"][0] > 0  # blue received requests, sent pages
    assert item(daemon, "fwd/tcp/80")["packets"] == 3
    bridge = item(daemon, "br/v-net-0")
    assert bridge["packets"] is not None and bridge["packets"] > 0
    # a range whose ports keep their numbers counts on its interval (nftables) or its
    # per-block rules (iptables): connections to two of its blocks
    for port in (7001, 7070):
        serve_http(daemon, "blue", "192.168.15.2", port, f"range-{port}")
    daemon.ok("forward", "7000-7099", "192.168.15.2:7000-7099")
    for port in (7001, 7070, 7070):
        assert http_get(daemon, "client", f"http://{CLIENT_HOST}:{port}/") == f"range-{port}"
    wait_for(
        "the range's three connections counted",
        lambda: forward_row(daemon, "fwd/tcp/7000-7099")["packets"] == 3,
    )
    # the table of `ctl forwards` has the columns
    assert "PACKETS" in daemon.ok("forwards") and "BYTES" in daemon.ok("forwards")


def test_an_idle_forward_is_removed_without_a_conntrack_walk(daemon: Daemon) -> None:
    build_seed(daemon, forward=False)
    add_client(daemon)
    serve_http(daemon, "blue", "192.168.15.2", 8080, "busy")
    daemon.ok("forward", "80", "192.168.15.2:80")  # the first: a full sync, not counted
    daemon.ok("forward", "8080", "192.168.15.2:8080")
    daemon.ok("forward", "9090", "192.168.15.2:9090")
    assert http_get(daemon, "client", f"http://{CLIENT_HOST}:8080/") == "busy"
    daemon.ok("unforward", "9090")  # never carried a connection
    assert daemon.status()["conntrack_walks_skipped"] == 1
    reply = daemon.ctl_json("unforward", "8080")  # it did: its flows are cleared
    assert daemon.status()["conntrack_walks_skipped"] == 1
    cleared = [a for acts in reply["actions"].values() for a in acts if "cleared" in a]
    assert cleared, reply
