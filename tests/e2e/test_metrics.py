"""``netagent run --metrics ADDR:PORT``: the real daemon scraped over HTTP from inside its
sandbox (its own loopback), after real requests, a real repair, a real attach and real
connections through a forward."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from netagent.cli.sandbox import Sandbox
from tests.support.daemon import Daemon
from tests.support.net import http_get, ping, serve_http
from tests.support.topology import build_seed
from tests.support.wait import wait_for

pytestmark = pytest.mark.e2e

ADDRESS = "127.0.0.1:9464"
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(d: Daemon, path: str = "/metrics") -> str:
    code = (
        "import sys, urllib.request, urllib.error\n"
        "try:\n"
        f"    r = urllib.request.urlopen('http://{ADDRESS}{path}', timeout=10)\n"
        "    print(r.status); sys.stdout.write(r.read().decode())\n"
        "except urllib.error.HTTPError as e:\n"
        "    print(e.code)\n"
    )
    return d.sh(sys.executable, "-c", code).stdout


def samples(d: Daemon) -> Samples:
    status, _, text = scrape(d).partition("\n")
    assert status == "200"
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


@pytest.fixture
def metered(sandbox: Sandbox, workdir: Path) -> Iterator[Daemon]:
    d = Daemon(sandbox, workdir, extra=["--metrics", ADDRESS])
    d.start()
    try:
        yield d
    finally:
        if d.running():
            d.stop()


def test_requests_repairs_attaches_lag_and_what_is(metered: Daemon) -> None:
    d = metered
    build_seed(d)
    assert d.ctl("ns", "del", "nope").returncode == 3
    got = samples(d)
    ok = (("op", "ns.add"), ("result", "ok"))
    assert got[("netagent_requests_total", ok)] == 2
    assert got[("netagent_requests_total", (("op", "ns.del"), ("result", "not-found")))] == 1
    assert got[("netagent_request_duration_seconds_count", (("op", "plug.add"),))] == 2
    assert got[("netagent_reconcile_pass_duration_seconds_count", (("trigger", "start"),))] == 1
    assert got[("netagent_intents", (("kind", "plug"), ("state", "in place")))] == 2
    assert got[("netagent_forwards", (("state", "in place"),))] == 1
    assert got[("netagent_firewall_in_place", (("backend", "nftables"),))] == 1
    assert got[("netagent_failing", ())] == 0
    assert got[("netagent_event_loop_lag_seconds_count", ())] > 0
    assert got[("netagent_info", (("firewall", "nftables"), ("version", "0.1.0")))] == 1
    # what show counts per part: every plug, the bridge and the forward, by key
    counted = {dict(k[1]).get("key") for k in got if k[0] == "netagent_packets_total"}
    assert {"plug/red/v-net-0", "plug/blue/v-net-0", "br/v-net-0", "fwd/tcp/80"} <= counted
    before = got[("netagent_packets_total", (("key", "plug/red/v-net-0"), ("kind", "plug")))]
    assert ping(d, "red", "192.168.15.2")
    # show's counters may be up to 2 s old (counters_at): wait for the pings to count
    wait_for(
        "red's pings counted on its plug",
        lambda: (
            samples(d)[("netagent_packets_total", (("key", "plug/red/v-net-0"), ("kind", "plug")))]
            > before
        ),
        timeout=10,
    )

    # a repair, counted by kind, and how long the event waited
    d.sh("ip", "link", "del", "veth-red-br")

    def repaired() -> Samples | None:
        now = samples(d)
        return now if now.get(("netagent_repairs_total", (("kind", "plug"),))) else None

    got = wait_for("the plug's repair to be counted", repaired, timeout=20)
    assert got[("netagent_event_lag_seconds_count", ())] >= 1
    assert got[("netagent_events_total", (("type", "link-removed"),))] >= 1

    # an attach
    d.ok("attach", "add", "tap*", "v-net-0")
    d.sh("ip", "tuntap", "add", "tap0", "mode", "tap")
    wait_for(
        "the attach to be counted",
        lambda: samples(d).get(("netagent_attaches_total", (("result", "attached"),))),
        timeout=20,
    )


def test_connections_cleared_when_a_forward_goes(metered: Daemon) -> None:
    d = metered
    build_seed(d)
    serve_http(d, "blue", "192.168.15.2", 80, "hello from blue")
    for _ in range(3):
        assert http_get(d, None, "http://127.0.0.1:80/") == "hello from blue"
    d.ok("unforward", "80")
    cleared = samples(d)[("netagent_connections_cleared_total", ())]
    assert cleared >= 1


def test_only_metrics_is_served(metered: Daemon) -> None:
    assert scrape(metered, "/nope").strip() == "404"
    assert scrape(metered, "/").startswith("200\nnetagent: metrics at /metrics")


def test_off_by_default(daemon: Daemon) -> None:
    code = (
        "import socket\n"
        "try:\n"
        f"    socket.create_connection(('127.0.0.1', {ADDRESS.rsplit(':', 1)[1]}), 5)\n"
        "    print('listening')\n"
        "except ConnectionRefusedError:\n"
        "    print('refused')\n"
    )
    assert daemon.sh(sys.executable, "-c", code).stdout.strip() == "refused"


def test_a_port_in_use_or_a_bad_address_stops_the_start(sandbox: Sandbox, workdir: Path) -> None:
    holder = sandbox.popen(
        [
            sys.executable,
            "-c",
            "import socket,sys; s=socket.create_server(('127.0.0.1', 9464)); print('ready', "
            "flush=True); sys.stdin.read()",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
    try:
        code, log = Daemon(sandbox, workdir, extra=["--metrics", ADDRESS]).run_to_exit()
        assert code == 6 and "cannot serve metrics on 127.0.0.1:9464" in log
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        sandbox.stop(holder)
    code, log = Daemon(sandbox, workdir, extra=["--metrics", "localhost:9464"]).run_to_exit()
    assert code == 2 and "use ADDR:PORT with an IP address" in log
