"""Issue 9, "questionable": ``nft flush ruleset`` with the iptables backend holding
65,535 forwarded ports, one rule each (ranges whose ports move: a range that keeps its
ports is one rule per block of 64, ``tests/e2e/test_forwarding.py``). The flush's
notifications overflow any socket (one per rule), so
the drift watcher counts the loss as drift, and the repair comes from that event, not
from the periodic pass (an hour away here). The repair itself is bound by the kernel:
loading 65,535 iptables-nft rules takes it ~2 s of work (docs/doctor.md), so this test
holds the event path to a deadline that a periodic pass could not meet, and prints what
it took; ``make bench SECTIONS=bigflush`` has the figures side by side."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from netagent.cli.sandbox import Sandbox
from tests.support.daemon import Daemon
from tests.support.net import http_get, serve_http
from tests.support.topology import CLIENT_HOST, add_client
from tests.support.wait import wait_for

pytestmark = pytest.mark.e2e


def test_a_flush_of_65535_iptables_rules_is_repaired_on_the_event(
    sandbox: Sandbox, workdir: Path
) -> None:
    (workdir / "netagent.toml").write_text("resync_interval = 3600\n")
    d = Daemon(
        sandbox, workdir, firewall="iptables", extra=["--config", str(workdir / "netagent.toml")]
    )
    d.start()
    try:
        d.ok("ns", "add", "blue")
        d.ok("bridge", "add", "v-net-0", "--address", "192.168.15.5/24")
        d.ok("plug", "blue", "v-net-0", "--address", "192.168.15.2/24")
        for proto in ("tcp", "udp"):
            d.ok("forward", "1-32767", "192.168.15.2:2-32768", "--proto", proto)
        d.ok("forward", "65000", "192.168.15.2:80")
        rules = d.sh("iptables-save", "-t", "nat").stdout.count("-j DNAT")
        assert rules == 65535
        add_client(d)
        serve_http(d, "blue", "192.168.15.2", 80, "up")
        assert http_get(d, "client", f"http://{CLIENT_HOST}:65000/") == "up"
        mark = len(d.event_names())
        t0 = time.monotonic()
        d.sh("nft", "flush", "ruleset")
        wait_for(
            "the firewall drift of the lost events",
            lambda: "firewall drift" in d.event_names()[mark:],
            timeout=10,
        )
        seen = time.monotonic() - t0
        wait_for(
            "all 65,535 DNAT rules back",
            lambda: d.sh("iptables-save", "-t", "nat").stdout.count("-j DNAT") == 65535,
            timeout=30,
            interval=0.2,
        )
        back = time.monotonic() - t0
        assert http_get(d, "client", f"http://{CLIENT_HOST}:65000/") == "up"
        print(f"drift seen after {seen:.2f} s, rules back after {back:.2f} s")
        drift = [e for e in d.log_events(True) if e.get("event") == "firewall drift"]
        assert any("lost events" in str(e.get("what")) for e in drift), drift
    finally:
        d.stop()
