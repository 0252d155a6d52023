"""``make bench`` section ``floor``: every ``netagent ctl`` command beside ``python -c
pass`` of the same environment, and a container's cost through the CLI beside one CNI
ADD of the reference plugins.

Measured as the user meets them: the wall time of the whole process (the console
script, the CNI plugin binaries), start-up included, one after the other in rounds, so
the machine's noise falls on every figure of a round alike. The target of each ``ctl``
command is a p50 at most 2x that of ``python -c pass`` (issue 11).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

import cni_reference  # noqa: E402
from run import fmt, pct  # noqa: E402

from netagent.cli.client import Client  # noqa: E402
from netagent.cli.sandbox import Sandbox  # noqa: E402

if TYPE_CHECKING:
    from run import Bench

#: the commands of a round, in order: (label, argv after ``ctl --socket S``, of round i)
COMMANDS: tuple[tuple[str, Callable[[int], list[str]]], ...] = (
    ("status", lambda i: ["status"]),
    ("show", lambda i: ["show"]),
    ("forwards", lambda i: ["forwards"]),
    ("ns add", lambda i: ["ns", "add", f"f{i}"]),
    ("plug", lambda i: ["plug", f"f{i}", "br-floor"]),
    ("forward", lambda i: ["forward", str(20000 + i), f"{_addr(i)}:80"]),
    ("unforward", lambda i: ["unforward", str(20000 + i)]),
)


#: the environment of a user's shell: Python writes and reads its bytecode caches and
#: buffers its output (a harness that sets these would time compiling every module of
#: every command, and a write per line)
ENV = {
    k: v for k, v in os.environ.items() if k not in ("PYTHONDONTWRITEBYTECODE", "PYTHONUNBUFFERED")
}


def _addr(i: int) -> str:
    """The address ``plug`` leases for the i-th namespace (the bridge is .1)."""
    n = i + 2
    return f"10.77.{n // 256}.{n % 256}"


def _wall(argv: list[str]) -> float:
    t0 = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, timeout=60, check=False, env=ENV)
    ms = (time.perf_counter() - t0) * 1000
    if done.returncode != 0:
        raise SystemExit(
            f"bench floor: {' '.join(argv)} failed ({done.returncode}): "
            f"{done.stderr.decode(errors='replace').strip()}"
        )
    return ms


def floor(b: Bench, n: int = 40) -> None:
    print(
        f"\n== the CLI at the floor: each command's whole process beside `python -c pass` "
        f"(n={n} rounds, the commands of a round one after the other; a user's environment: "
        "bytecode caches on, output buffered)"
    )
    with Client(b.socket) as c:
        c.call("bridge.add", {"name": "br-floor", "addresses": ["10.77.0.1/16"]})
    ctl = [*b.cli_argv, "ctl", "--socket", b.socket]
    bare = [sys.executable, "-c", "pass"]
    times: dict[str, list[float]] = {"python -c pass": []}
    times.update({label: [] for label, _ in COMMANDS})
    _wall([*ctl, "status"])  # once untimed: the bytecode caches are written
    _wall([*ctl, "show", "--help"])
    for i in range(n):
        times["python -c pass"].append(_wall(bare))
        for label, words in COMMANDS:
            times[label].append(_wall([*ctl, *words(i)]))
    base = pct(times["python -c pass"], 0.5)
    for label, values in times.items():
        ratio = "" if label == "python -c pass" else f"   {pct(values, 0.5) / base:4.2f}x"
        print(f"{label:<16} {fmt(values)}{ratio}")
    worst = max(pct(v, 0.5) for k, v in times.items() if k != "python -c pass")
    print(f"slowest ctl command / python -c pass, p50: {worst / base:.2f}x   target <= 2x")
    b.results["floor_worst_ratio"] = worst / base
    per_container(b, n)


def per_container(b: Bench, n: int) -> None:
    """``ctl plug`` + ``ctl forward`` (two processes) beside one CNI ADD of Debian's
    reference plugins (bridge + host-local + portmap, through libcni), asked in turn."""
    print(
        f"\n== a container through the CLI (plug + forward, two commands) beside one CNI ADD "
        f"of the reference plugins (bridge + host-local + portmap), in turn, n={n}"
    )
    with Client(b.socket) as c:
        c.call("bridge.add", {"name": "br-pc", "addresses": ["10.78.0.1/16"]})
        for i in range(n):
            c.call("ns.add", {"name": f"pc{i}"})
    ctl = [*b.cli_argv, "ctl", "--socket", b.socket]
    box = Sandbox()
    worker = box.popen(
        [sys.executable, cni_reference.__file__, "--worker", "reference", str(n)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    cli: list[float] = []
    cni: list[float] = []
    try:
        if cni_reference._answer(worker) != "ready":
            raise SystemExit("bench floor: the CNI reference worker did not start")
        assert worker.stdin is not None
        for i in range(n):
            t0 = time.perf_counter()
            _wall([*ctl, "plug", f"pc{i}", "br-pc"])
            _wall([*ctl, "forward", str(30000 + i), f"10.78.{(i + 2) // 256}.{(i + 2) % 256}:80"])
            cli.append((time.perf_counter() - t0) * 1000)
            worker.stdin.write(f"add {i}\n")
            worker.stdin.flush()
            cni.append(float(cni_reference._answer(worker)))
    finally:
        if worker.stdin is not None:
            worker.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            worker.wait(30)
        box.stop(worker)
        box.close()
    print(f"netagent ctl plug + ctl forward      {fmt(cli)}")
    print(f"reference plugins, one CNI ADD       {fmt(cni)}")
    ratio = pct(cli, 0.5) / pct(cni, 0.5)
    print(f"plug + forward / CNI ADD, p50: {ratio:.2f}x   target < 1x")
    b.results["per_container_ratio"] = ratio
