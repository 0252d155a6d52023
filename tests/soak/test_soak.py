"""``make soak``: the races and kill -9 cycles of the service tier, for minutes, with the
kernel checked against ``show`` after each cycle. Not in CI (``NETAGENT_SOAK=SECONDS``
turns it on; ``tests/conftest.py`` leaves this directory out otherwise)."""

from __future__ import annotations

import json
import os
import random
import subprocess
import threading
import time

import pytest

from netagent.cli.client import Client
from tests.service.test_orphans import marked, topology
from tests.support.daemon import Daemon, netagent_argv
from tests.support.topology import show
from tests.support.wait import wait_for

pytestmark = pytest.mark.privileged
SECONDS = float(os.environ.get("NETAGENT_SOAK", "60"))


def race(d: Daemon, rng: random.Random, seconds: float) -> int:
    ops: list[tuple[str, dict[str, object]]] = [
        ("ns.add", {"name": "z"}),
        ("ns.del", {"name": "z"}),
        ("plug.add", {"ns": "z", "bridge": "br-o"}),
        ("plug.del", {"ns": "z", "bridge": "br-o"}),
        ("forward.add", {"host_ports": "9000", "destination": "10.77.0.2:80"}),
        ("forward.del", {"host_ports": "9000"}),
    ]
    stop = threading.Event()
    answered = [0]
    seeds = [rng.randrange(1 << 30) for _ in range(4)]

    def client(seed: int) -> None:
        r = random.Random(seed)
        with Client(d.socket, timeout=15) as c:
            while not stop.is_set():
                c.raw(*r.choice(ops))  # no answer in 15 s raises: the daemon is wedged
                answered[0] += 1

    threads = [threading.Thread(target=client, args=(s,)) for s in seeds]
    for t in threads:
        t.start()
    time.sleep(seconds)  # the race's length
    stop.set()
    for t in threads:
        t.join(30)
    return answered[0]


def converged(d: Daemon) -> bool:
    s = show(d)
    desired = {i["key"] for i in s["intents"]}
    stray = {w: k for w, k in marked(d).items() if k not in desired}
    return not stray and not s["orphans"] and all(i["in_place"] for i in s["intents"])


def test_soak(daemon: Daemon, rng_seed: int) -> None:
    rng = random.Random(rng_seed)
    big, small = daemon.dir / "big.json", daemon.dir / "small.json"
    big.write_text(json.dumps(topology(10)))
    small.write_text(json.dumps(topology(3)))
    deadline = time.monotonic() + SECONDS
    cycles = 0
    while time.monotonic() < deadline:
        cycles += 1
        daemon.ok("apply", str(big))
        if rng.random() < 0.5:
            assert race(daemon, rng, rng.uniform(1, 4)) > 0
        else:
            op = ["apply", "--prune", str(small)] if rng.random() < 0.5 else ["purge", "--yes"]
            proc = subprocess.Popen(
                [*netagent_argv(), "ctl", "--socket", daemon.socket, *op],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            time.sleep(rng.uniform(0.0, 0.2))  # the kill's moment
            daemon.kill9()
            proc.wait(30)
            daemon.start()
        wait_for(f"cycle {cycles}: the kernel as show says", lambda: converged(daemon), timeout=30)
    print(f"{cycles} cycles in {SECONDS:g} s")
    daemon.ok("purge", "--yes")
    assert marked(daemon) == {}
