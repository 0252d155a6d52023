"""``make bench SECTIONS="doctor bigflush"``: what the firewall half of issue 11 costs.

``doctor``: at 600 namespaces (each plugged) and 1,000 forwards, ``show``, ``status``
and ``forwards`` over the socket and through the CLI (beside ``python -c pass``),
``doctor`` and ``explain``; removing a forward
that never carried a connection (no conntrack walk) beside one that did.
``bigflush``: ``nft flush ruleset`` with each backend holding 65,535 forwarded ports,
until a connection goes through a forward again: as two ranges that keep their ports
(one interval each, or one rule per block of 64), then moved by one (one entry per port).
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from typing import TYPE_CHECKING, Any

from netagent.cli.client import Client
from netagent.cli.sandbox import outside_client_steps

if TYPE_CHECKING:
    from run import Bench

NAMESPACES = 600
FORWARDS = 1000


def _p50(values: list[float]) -> float:
    return statistics.median(values)


def _timed(call: Any, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        call()
        out.append((time.perf_counter() - t0) * 1000)
    return out


def doctor(b: Bench) -> None:
    from run import fmt

    b.start()
    print(f"\n== doctor, show and counters: {NAMESPACES} namespaces, {FORWARDS:,} forwards")
    intents: list[dict[str, Any]] = [
        {"kind": "bridge", "name": "v-net-0", "addresses": ["10.20.0.1/16"]}
    ]
    for i in range(NAMESPACES):
        ip = f"10.20.{i // 250}.{i % 250 + 2}"
        intents += [
            {"kind": "ns", "name": f"n{i}"},
            {"kind": "plug", "ns": f"n{i}", "bridge": "v-net-0", "addresses": [f"{ip}/16"]},
        ]
    for p in range(FORWARDS):
        n = p % NAMESPACES
        dest = f"10.20.{n // 250}.{n % 250 + 2}:80"
        intents.append({"kind": "forward", "host_ports": str(20000 + p), "destination": dest})
    with Client(b.socket, timeout=900) as c:
        c.call("apply", {"intents": intents})
    time.sleep(3)  # let the start-up's and apply's follow-up passes settle (not a check)
    with Client(b.socket, timeout=60) as c:
        for op in ("show", "status", "forward.list", "doctor"):
            times = _timed(lambda op=op: c.call(op), 30 if op != "doctor" else 10)
            target = "   target p50 <= 50 ms" if op in ("show", "status") else ""
            print(f"{op + ' (socket)':<24}{fmt(times)}{target}")
            b.results[f"{op}_socket_p50_ms"] = _p50(times)
        times = _timed(lambda: c.call("explain", {"port": "20005"}), 10)
        print(f"{'explain (socket)':<24}{fmt(times)}")
    base = [sys.executable, "-c", "pass"]
    ctl = [*b.cli_argv, "ctl", "--socket", b.socket]
    runs = {
        "python -c pass": base,
        "ctl status": [*ctl, "status"],
        "ctl show --json": [*ctl, "--json", "show"],
        "ctl show": [*ctl, "show"],
    }
    for name, argv in runs.items():
        times = _timed(lambda argv=argv: subprocess.run(argv, capture_output=True, check=True), 10)
        print(f"{name:<24}{fmt(times)}")
    with Client(b.socket, timeout=60) as c:
        # removals of forwards that never carried a connection: no conntrack walk
        before = c.call("status")["conntrack_walks_skipped"]
        add, rm = [], []
        for i in range(30):
            t0 = time.perf_counter()
            c.call("forward.add", {"host_ports": str(40000 + i), "destination": "10.20.0.2:80"})
            t1 = time.perf_counter()
            c.call("forward.del", {"host_ports": str(40000 + i)})
            add.append((t1 - t0) * 1000)
            rm.append((time.perf_counter() - t1) * 1000)
        skipped = c.call("status")["conntrack_walks_skipped"] - before
        lag = c.call("status")["loop_lag_ms"]
    print(f"{'forward add (socket)':<24}{fmt(add)}")
    print(f"{'idle forward del':<24}{fmt(rm)}   ({skipped} of 30 without a conntrack walk)")
    print(f"event-loop lag meanwhile: p99 {lag['p99']} ms, max {lag['max']} ms")


def bigflush(b: Bench) -> None:
    """Each backend beside the other in one run: the same 65,535 ports, the same flush."""
    for backend in ("nftables", "iptables"):
        if b.proc is not None:
            b.box.stop(b.proc)  # the same desired state, now installed by the other
        t0 = time.perf_counter()
        b.start("--firewall", backend)
        print(f"\n(daemon with --firewall {backend} ready in {time.perf_counter() - t0:.1f} s)")
        _bigflush(b, backend)


def _bigflush(b: Bench, backend: str) -> None:
    print(
        f"\n== nft flush ruleset, {backend} backend, 65,535 forwarded ports "
        "(ranges keeping their ports)"
    )
    host = "203.0.113.1"
    with Client(b.socket, timeout=600) as c:
        if not c.call("ns.list"):
            c.call("ns.add", {"name": "blue"})
            c.call("bridge.add", {"name": "v-net-0", "addresses": ["192.168.15.5/24"]})
            c.call(
                "plug.add", {"ns": "blue", "bridge": "v-net-0", "addresses": ["192.168.15.2/24"]}
            )
            for argv in outside_client_steps():
                b.box.run(argv)
        t0 = time.perf_counter()
        for proto in ("tcp", "udp"):
            c.call(
                "forward.add",
                {"host_ports": "1-32767", "destination": "192.168.15.2:1-32767", "proto": proto},
            )
        c.call("forward.add", {"host_ports": "65000", "destination": "192.168.15.2:80"})
        print(f"installing them: {(time.perf_counter() - t0) * 1000:.0f} ms")
    from run import INSIDE

    server = b.box.popen(
        ["ip", "netns", "exec", "blue", sys.executable, INSIDE, "serve", "192.168.15.2", "80"],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert server.stdout is not None and server.stdout.readline().strip() == "ready"
    backs = []
    for _ in range(3):
        r = b.inside("drift", host, "65000", "--timeout", "60", "nft", "flush", "ruleset")
        backs.append(float(r["back_ms"]))
        time.sleep(1)
    print(
        f"`nft flush ruleset` -> traffic through a forward again: median "
        f"{statistics.median(backs):.0f} ms, max {max(backs):.0f} ms (3 runs)   target <= 500 ms"
    )
    # the same 65,535 ports moved by one (1-32767 -> :2-32768): no interval can say that,
    # so one map element (nftables) or one rule (iptables) per port
    t0 = time.perf_counter()
    _ranges_to(b, "192.168.15.2:2-32768")
    ms = (time.perf_counter() - t0) * 1000
    print(f"the same ports moved by one, one entry per port: {ms:.0f} ms")
    # (iptables: restoring 65,535 rules takes iptables-restore ~4 s alone here)
    r = b.inside("drift", host, "65000", "--timeout", "60", "nft", "flush", "ruleset")
    print(
        "`nft flush ruleset` -> traffic again, one entry per port: "
        f"{float(r['back_ms']):.0f} ms (1 run)"
    )
    _ranges_to(b, "192.168.15.2:1-32767")  # back as it was, for the other backend
    b.box.stop(server)


def _ranges_to(b: Bench, destination: str) -> None:
    """Host ports 1-32767 (tcp and udp) forwarded to ``destination`` instead."""
    with Client(b.socket, timeout=600) as c:
        for proto in ("tcp", "udp"):
            c.call("forward.del", {"host_ports": "1-32767", "proto": proto})
            c.call(
                "forward.add",
                {"host_ports": "1-32767", "destination": destination, "proto": proto},
            )
