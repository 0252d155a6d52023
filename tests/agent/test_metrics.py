"""Metrics without root: what the probe counts, what a scrape reads from ``status`` and
``show``, the address, and that nothing imports ``prometheus_client`` unless asked. The
real daemon is scraped in ``tests/e2e/test_metrics.py``."""

from __future__ import annotations

import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import anyio
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from netagent.agent.config import Config, metrics_address
from netagent.agent.errors import BackendUnavailable, InvalidArgument
from netagent.agent.kinds import default_kinds
from netagent.agent.metrics import Exporter, MetricsProbe, Snapshot
from netagent.agent.probe import Probe

from ..support.wait import until
from .world import make_world


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


def test_the_probe_counts_requests_repairs_attaches_and_cleared_connections() -> None:
    registry = CollectorRegistry()
    p = MetricsProbe(registry, default_kinds())
    p.request("fwd.add", "ok", 0.002)  # an alias counts as its op
    p.request("forward.add", "port-in-use", 0.001)
    p.request("made.up", "unknown-op", 0.0001)  # a client cannot make label values up
    p.reconcile_pass("event", 0.004)
    p.event_lag(0.003)
    p.loop_lag(0.0002)
    for event in (
        {"type": "repaired", "key": "plug/red/v-net-0"},
        {"type": "repaired", "key": "br/v-net-0"},
        {"type": "repaired", "key": "firewall"},
        {"type": "attached"},
        {"type": "attach-failed"},
        {"type": "left-alone"},
        {"type": "connections-cleared", "cleared": 3},
    ):
        p.event(event)
    got = samples(generate_latest(registry).decode())
    assert got[("netagent_requests_total", (("op", "forward.add"), ("result", "ok")))] == 1
    assert got[("netagent_requests_total", (("op", "forward.add"), ("result", "port-in-use")))]
    assert got[("netagent_requests_total", (("op", "unknown"), ("result", "unknown-op")))] == 1
    assert got[("netagent_request_duration_seconds_count", (("op", "forward.add"),))] == 2
    assert got[("netagent_reconcile_pass_duration_seconds_count", (("trigger", "event"),))] == 1
    assert got[("netagent_event_lag_seconds_count", ())] == 1
    assert got[("netagent_event_loop_lag_seconds_count", ())] == 1
    for kind in ("plug", "bridge", "firewall"):
        assert got[("netagent_repairs_total", (("kind", kind),))] == 1
    for result in ("attached", "failed", "left_alone"):
        assert got[("netagent_attaches_total", (("result", result),))] == 1
    assert got[("netagent_connections_cleared_total", ())] == 3
    assert got[("netagent_events_total", (("type", "repaired"),))] == 3


STATUS: dict[str, Any] = {
    "version": "0.1.0",
    "firewall": "nftables",
    "uptime_s": 12.5,
    "failing": {"plug/x/br0": "boom"},
    "clients": 2,
    "refused": 1,
    "timeouts": 0,
    "event_resyncs": 4,
    "loop_lag_ms": {"p99": 0.4, "max": 2.0},
}


def show(*items: dict[str, Any]) -> dict[str, Any]:
    return {
        "intents": list(items),
        "orphans": [{"describe": "x"}],
        "firewall": {"backend": "nftables", "in_place": True},
    }


def test_a_scrape_reads_what_is_and_counters_only_once_show_has_them() -> None:
    snap = Snapshot()
    registry = CollectorRegistry()
    registry.register(snap)
    snap.take(
        STATUS,
        show(
            {"key": "fwd/tcp/80", "kind": "forward", "state": "in place"},
            {"key": "fwd/tcp/81", "kind": "forward", "state": "failing"},
            {"key": "ns/red", "kind": "ns", "state": "in place"},
        ),
    )
    got = samples(generate_latest(registry).decode())
    assert got[("netagent_intents", (("kind", "forward"), ("state", "failing")))] == 1
    assert got[("netagent_intents", (("kind", "ns"), ("state", "in place")))] == 1
    assert got[("netagent_forwards", (("state", "in place"),))] == 1
    assert got[("netagent_failing", ())] == 1
    assert got[("netagent_orphans", ())] == 1
    assert got[("netagent_firewall_in_place", (("backend", "nftables"),))] == 1
    assert got[("netagent_event_resyncs_total", ())] == 4
    assert got[("netagent_event_loop_lag_max_seconds", ())] == 0.002
    assert got[("netagent_info", (("firewall", "nftables"), ("version", "0.1.0")))] == 1
    assert not any(name.startswith(("netagent_packets", "netagent_bytes")) for name, _ in got)
    # the other half of issue 11 makes show report counters: then they are exported
    snap.take(
        STATUS,
        show({"key": "fwd/tcp/80", "kind": "forward", "state": "in place", "packets": 7,
              "bytes": 420}),
    )  # fmt: skip
    got = samples(generate_latest(registry).decode())
    labels = (("key", "fwd/tcp/80"), ("kind", "forward"))
    assert got[("netagent_packets_total", labels)] == 7
    assert got[("netagent_bytes_total", labels)] == 420


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("127.0.0.1:9464", ("127.0.0.1", 9464)),
        ("[::1]:80", ("::1", 80)),
        ("0.0.0.0:1", ("0.0.0.0", 1)),
    ],
)
def test_the_address(text: str, want: tuple[str, int]) -> None:
    assert metrics_address(text) == want


@pytest.mark.parametrize("text", ["9464", "localhost:9464", "::1:9464", "1.2.3.4:0", "1.2.3.4:x"])
def test_a_bad_address_is_refused_at_start(text: str) -> None:
    with pytest.raises(InvalidArgument, match="ADDR:PORT"):
        metrics_address(text)
    with pytest.raises(InvalidArgument):
        Config.load(None, {"metrics": text})


def test_the_config_file_key(tmp_path: Path) -> None:
    path = tmp_path / "netagent.toml"
    path.write_text('[netagent]\nmetrics = "127.0.0.1:9464"\n')
    assert Config.load(str(path), {}).metrics == "127.0.0.1:9464"
    assert Config.load(None, {}).metrics is None  # off by default


def test_nothing_imports_prometheus_client_unless_metrics_are_on() -> None:
    code = (
        "import sys\n"
        "import netagent.agent.main, netagent.cli.app, netagent.agent.transport\n"
        "print('prometheus_client' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    ).stdout.strip()
    assert out == "False"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Recording(Probe):
    def __init__(self) -> None:
        self.lags: list[float] = []
        self.passes: list[str] = []

    def event_lag(self, seconds: float) -> None:
        self.lags.append(seconds)

    def reconcile_pass(self, trigger: str, seconds: float) -> None:
        self.passes.append(trigger)


async def test_the_reconciler_reports_how_long_an_event_waited(tmp_path: Path) -> None:
    probe = Recording()
    w = make_world(tmp_path, probe=probe)
    async with w.running():
        await w.call("bridge.add", name="v-net-0")
        await w.call("attach.add", pattern="tap*", bridge="v-net-0")
        assert probe.lags == []  # requests are not events
        tap0 = w.net.make_foreign_link("tap0")
        w.rec.mark_links([tap0.index])
        await until(lambda: probe.lags, "an event lag reported")
        assert len(probe.lags) == 1 and 0 <= probe.lags[0] < 5
        assert "request" in probe.passes and "event" in probe.passes


async def test_the_endpoint_answers_over_http(tmp_path: Path) -> None:
    """The exporter on loopback, over the API of the fake world."""
    w = make_world(tmp_path)
    address = f"127.0.0.1:{free_port()}"
    exporter = Exporter(address, w.state.kinds)
    with pytest.raises(BackendUnavailable, match="cannot serve metrics on"):
        Exporter(address, w.state.kinds)  # the port is taken: the start stops

    def get(path: str) -> tuple[int, str, str]:
        try:
            with urllib.request.urlopen(f"http://{address}{path}", timeout=10) as r:
                return r.status, r.headers["Content-Type"], r.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, "", ""

    try:
        async with w.running(), anyio.create_task_group() as tg:
            tg.start_soon(exporter.serve, w.api)
            await w.call("ns.add", name="red")
            status, ctype, body = await anyio.to_thread.run_sync(get, "/metrics")
            assert status == 200 and ctype.startswith("text/plain; version=")
            got = samples(body)
            assert got[("netagent_intents", (("kind", "ns"), ("state", "in place")))] == 1
            assert ("process_open_fds", ()) in got
            assert (await anyio.to_thread.run_sync(get, "/nope"))[0] == 404
            tg.cancel_scope.cancel()
    finally:
        exporter.close()
