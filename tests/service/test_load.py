"""Load: 50 clients at once, each adding and removing 100 forwards (its own ports, its
neighbour's, and ports every client fights over), end in exactly the state that the
acknowledged requests describe; in the daemon, in the kernel, and after a restart.

The daemon here runs without the ``conntrack`` tool on its PATH. Each removed forward
otherwise costs one ``conntrack -D`` process under the reconcile lock (~20 ms here), and
the 5,000 removals alone would take about two minutes; that cost is reported, not tested
here. Everything else (socket, validation, journal with fsync, compaction, nft) is real."""

from __future__ import annotations

import os
import random
import shutil
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import pytest

from netagent.cli.sandbox import Sandbox
from tests.support.daemon import Daemon
from tests.support.protocol import connect, read_line, request
from tests.support.state import nft_forwards, snapshot

pytestmark = pytest.mark.e2e

CLIENTS = 50
PER_CLIENT = 100  # adds, and as many removals
SHARED = [40000 + i for i in range(10)]  # ports every client tries to forward
TOOLS = (
    "ip",
    "nft",
    "iptables",
    "iptables-restore",
    "iptables-save",
    "ip6tables",
    "ip6tables-restore",
    "ip6tables-save",
    "sysctl",
    "nsenter",
)


def own_port(client: int, i: int) -> int:
    return 30000 + client * 100 + i


def client_plan(c: int, rng: random.Random) -> list[tuple[str, int, str | None]]:
    """(op, port, destination) x 200, interleaved: adds of 90 own ports and the shared
    ones; removals of 45 own, 45 of the next client's, and the shared ones."""
    dest = f"10.4.{c}.{{}}:80"
    adds: list[tuple[str, int, str | None]] = [
        ("fwd.add", own_port(c, i), dest.format(2 + i)) for i in range(PER_CLIENT - 10)
    ]
    adds += [("fwd.add", port, dest.format(200 + n)) for n, port in enumerate(SHARED)]
    nxt = (c + 1) % CLIENTS
    dels: list[tuple[str, int, str | None]] = [
        ("fwd.del", own_port(c, i), None) for i in rng.sample(range(PER_CLIENT - 10), 45)
    ]
    dels += [("fwd.del", own_port(nxt, i), None) for i in rng.sample(range(PER_CLIENT - 10), 45)]
    dels += [("fwd.del", port, None) for port in SHARED]
    # a removal of an own port comes after its add; the rest anywhere
    plan: list[tuple[str, int, str | None]] = list(adds)
    rng.shuffle(plan)
    for op in dels:
        port = op[1]
        first = next((n for n, a in enumerate(plan) if a[1] == port and a[0] == "fwd.add"), -1)
        plan.insert(rng.randrange(first + 1, len(plan) + 1), op)
    return plan


def test_50_clients_adding_and_removing_100_forwards_each(
    sandbox: Sandbox, workdir: Path, rng_seed: int
) -> None:
    tools = workdir / "bin"  # the usual tools, conntrack left out (see the docstring)
    tools.mkdir()
    for name in TOOLS:
        found = shutil.which(name, path="/usr/sbin:/usr/bin:/sbin:/bin")
        if found:
            os.symlink(found, tools / name)
    d = Daemon(sandbox, workdir, extra=["--client-timeout", "60"], env={"PATH": str(tools)})
    d.start()
    plans = [client_plan(c, random.Random(rng_seed + c)) for c in range(CLIENTS)]
    acked: dict[str, list[tuple[str, str | None]]] = defaultdict(list)
    errors: Counter[str] = Counter()
    unexpected: list[Any] = []
    lock = threading.Lock()
    barrier = threading.Barrier(CLIENTS)

    def client(c: int) -> None:
        with connect(d.socket, timeout=120) as sock:
            buf = bytearray()
            barrier.wait(30)
            for n, (op, port, dest) in enumerate(plans[c]):
                args: dict[str, Any] = {"host_ports": port}
                if dest:
                    args["destination"] = dest
                sock.sendall(f'{{"id":{n},"op":"{op}","args":{_json(args)}}}\n'.encode())
                reply = _loads(read_line(sock, buf))
                with lock:
                    if reply["ok"]:
                        for change in reply["result"]["changes"]:
                            acked[change["key"]].append((change["action"], dest))
                    else:
                        name = reply["error"]["name"]
                        errors[name] += 1
                        expected = "port-in-use" if op == "fwd.add" else "not-found"
                        if name != expected or (op == "fwd.add" and port not in SHARED):
                            unexpected.append((op, port, reply["error"]))

    t0 = time.monotonic()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    took = time.monotonic() - t0
    requests = sum(len(p) for p in plans)
    assert not any(t.is_alive() for t in threads)
    assert unexpected == [], unexpected[:5]

    # per key the acknowledged changes alternate, so their count says how it ended
    expected: dict[str, set[str | None]] = {}
    for key, changes in acked.items():
        adds = sum(1 for action, _ in changes if action == "added")
        removes = sum(1 for action, _ in changes if action == "removed")
        assert adds - removes in (0, 1), (key, changes)
        if adds - removes == 1:
            expected[key] = {dest for action, dest in changes if action == "added"}
    listed = {f["key"]: f["destination"] for f in request(d.socket, "fwd.list")["result"]}
    assert set(listed) == set(expected)
    assert all(listed[k] in expected[k] for k in listed)
    in_kernel = nft_forwards(d)
    assert set(in_kernel.values()) <= {1}
    assert {(f"fwd/{p}/{port}", dest) for p, port, dest in in_kernel} == set(listed.items())
    print(
        f"load: seed {rng_seed}; {CLIENTS} clients, {requests} requests in {took:.1f} s "
        f"({requests / took:.0f}/s); {len(listed)} forwards survive; "
        f"refused: {dict(errors)}"
    )
    # the journal (compacted along the way) replays to the very same state
    before = snapshot(d)
    assert d.stop() == 0
    d.start()
    assert snapshot(d) == before


def _json(args: dict[str, Any]) -> str:
    import json

    return json.dumps(args)


def _loads(raw: bytes) -> dict[str, Any]:
    import json

    assert raw, "the daemon hung up"
    reply: dict[str, Any] = json.loads(raw)
    return reply
