"""Races between clients, and with other tools: never wedged, never another's."""

from __future__ import annotations

import random
import subprocess
import threading
import time
from pathlib import Path

import pytest

from netagent.cli.client import Client
from tests.support.daemon import Daemon

pytestmark = pytest.mark.privileged

#: seconds any one request may take before the test calls the daemon wedged
ANSWER_WITHIN = 15.0


def test_clients_racing_add_del_plug_unplug_of_one_namespace_never_wedge_it(
    daemon: Daemon, rng_seed: int
) -> None:
    daemon.ok("bridge", "add", "br-race", "--address", "10.66.0.1/24")
    ops: list[tuple[str, dict[str, object]]] = [
        ("ns.add", {"name": "z"}),
        ("ns.del", {"name": "z"}),
        ("plug.add", {"ns": "z", "bridge": "br-race", "addresses": ["10.66.0.2/24"]}),
        ("plug.del", {"ns": "z", "bridge": "br-race"}),
    ]
    stop = threading.Event()
    slow: list[str] = []
    answered = [0]

    def client(n: int) -> None:
        rng = random.Random(rng_seed + n)
        with Client(daemon.socket, timeout=ANSWER_WITHIN) as c:
            while not stop.is_set():
                op, args = rng.choice(ops)
                t0 = time.monotonic()
                try:
                    c.raw(op, args)  # an error reply is fine; no reply is not
                except TimeoutError:
                    slow.append(f"{op} got no answer within {ANSWER_WITHIN:g} s")
                    return
                answered[0] += 1
                if time.monotonic() - t0 > ANSWER_WITHIN:
                    slow.append(f"{op} took {time.monotonic() - t0:.1f} s")

    threads = [threading.Thread(target=client, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    time.sleep(4.0)  # the race's length, not a wait for something to happen
    stop.set()
    for t in threads:
        t.join(ANSWER_WITHIN + 5)
    assert not slow, slow
    assert answered[0] > 40
    # and afterwards every kind of change still goes through at once
    with Client(daemon.socket, timeout=ANSWER_WITHIN) as c:
        c.raw("plug.del", {"ns": "z", "bridge": "br-race"})
        c.raw("ns.del", {"name": "z"})
        c.call("ns.add", {"name": "after"})
        c.call("plug.add", {"ns": "after", "bridge": "br-race", "addresses": ["10.66.0.9/24"]})
    assert daemon.status()["failing"] == {}


def test_ns_add_racing_someone_elses_ip_netns_add_never_takes_theirs(
    daemon: Daemon, workdir: Path
) -> None:
    """Each round: netagent's ``ns add zN`` and someone's ``ip netns add zN`` at once.
    Whoever made it, netagent marks only its own, and no claim is left behind."""
    taken = 0
    for n in range(40):
        name = f"z{n}"
        theirs = daemon.box.popen(["ip", "netns", "add", name], stderr=subprocess.DEVNULL)
        ours = daemon.ctl("ns", "add", name)
        theirs.wait(10)
        lo = daemon.sh("ip", "-n", name, "-o", "link", "show", "lo", check=False).stdout
        marked = "netagent:ns/" + name in lo
        if ours.returncode == 0:
            assert marked, f"round {n}: netagent says it made {name} but did not mark it"
        else:
            taken += 1
            assert ours.returncode == 4 and "not made by netagent" in ours.stderr, ours.stderr
            assert not marked, f"round {n}: someone else's {name} was marked as netagent's"
    claims = daemon.state_dir / "claims"
    assert not claims.exists() or list(claims.iterdir()) == []
    # the ones netagent refused are not in its desired state, and stay theirs
    listed = {i["key"] for i in daemon.ctl_json("show")["intents"]}
    assert len([k for k in listed if k.startswith("ns/z")]) == 40 - taken
