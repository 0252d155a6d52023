"""Crash safety: what was acknowledged survives ``kill -9`` at any moment, exactly once,
and a damaged state file stops the start with a clear error instead of a silent reset."""

from __future__ import annotations

import json
import random
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from netagent.cli.sandbox import Sandbox
from tests.support.daemon import Daemon
from tests.support.protocol import request
from tests.support.sandbox import processes_in
from tests.support.state import all_in_place, nft_forwards, not_in_place, snapshot
from tests.support.wait import wait_for

pytestmark = pytest.mark.e2e

WORKERS = 4
KILLS = 6
BRIDGE = "br0"
RETRY_FOR = 60.0  # seconds a worker retries one op across kills and restarts


@dataclass
class Op:
    key: str
    op: str
    args: dict[str, Any]
    adds: bool  # True: the key is present afterwards; False: absent


@dataclass
class Ledger:
    """What each worker was told, per key, in order."""

    present: dict[str, bool] = field(default_factory=dict)
    acked: dict[str, list[str]] = field(default_factory=dict)  # key -> acknowledged actions
    destinations: dict[str, str] = field(default_factory=dict)
    requests: int = 0
    in_flight: int = 0  # requests whose reply a kill swallowed
    found_applied: int = 0  # ... and that the retry showed had been applied
    found_not_applied: int = 0
    unexpected: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def worker_ops(w: int, rng: random.Random) -> Op:
    """A random op on keys only worker ``w`` touches."""
    kind = rng.choice(["fwd", "fwd", "plug", "rule"])
    adds = rng.random() < 0.6
    if kind == "fwd":
        i = rng.randrange(10)
        port = 20000 + w * 100 + i
        if adds:
            dest = f"10.5.{w}.{10 + i}:{8000 + i}"
            return Op(f"fwd/tcp/{port}", "fwd.add", {"host_ports": port, "destination": dest}, True)
        return Op(f"fwd/tcp/{port}", "fwd.del", {"host_ports": port}, False)
    if kind == "plug":
        j = rng.randrange(2)
        ns = f"c{2 * w + j}"
        if adds:
            return Op(
                f"plug/{ns}/{BRIDGE}",
                "plug.add",
                {"ns": ns, "bridge": BRIDGE, "addresses": [f"10.5.{w}.{2 + j}/16"]},
                True,
            )
        return Op(f"plug/{ns}/{BRIDGE}", "plug.del", {"ns": ns, "bridge": BRIDGE}, False)
    pattern = f"w{w}r{rng.randrange(5)}-*"
    if adds:
        return Op(
            f"rule/{BRIDGE}/{pattern}", "rule.add", {"pattern": pattern, "bridge": BRIDGE}, True
        )
    return Op(f"rule/{BRIDGE}/{pattern}", "rule.del", {"pattern": pattern, "bridge": BRIDGE}, False)


def run_worker(w: int, path: str, ledger: Ledger, stop: threading.Event, seed: int) -> None:
    rng = random.Random(seed)
    while not stop.is_set():
        op = worker_ops(w, rng)
        lost = False
        give_up = time.monotonic() + RETRY_FOR
        while True:  # until the daemon answers this op (retrying across kills)
            try:
                reply = request(path, op.op, op.args, timeout=30)
                break
            except (OSError, ValueError) as exc:
                lost = True
                if time.monotonic() > give_up:
                    with ledger.lock:
                        ledger.unexpected.append(
                            f"{op.op} {op.args}: no answer in {RETRY_FOR} s: {exc}"
                        )
                    return
                time.sleep(0.02)
        with ledger.lock:
            ledger.requests += 1
            before = ledger.present.get(op.key, False)
            if reply["ok"]:
                changed = reply["result"]["changed"]
                for change in reply["result"]["changes"]:
                    ledger.acked.setdefault(change["key"], []).append(change["action"])
            else:
                name = reply["error"]["name"]
                if not (name == "not-found" and not op.adds):
                    ledger.unexpected.append(f"{op.op} {op.args}: {reply['error']}")
                changed = False
            # the key is this worker's alone, so what the daemon did is known exactly
            if before == op.adds and changed:
                ledger.unexpected.append(
                    f"{op.op} {op.args} changed {op.key}, which was "
                    f"{'present' if before else 'absent'} already: "
                    "a lost or duplicated change"
                )
            if before != op.adds and not changed:
                if lost:
                    ledger.found_applied += 1  # the attempt the kill cut short had done it
                else:
                    ledger.unexpected.append(
                        f"{op.op} {op.args} did nothing, but {op.key} "
                        f"was {'present' if before else 'absent'}"
                    )
            if before != op.adds and changed and lost:
                ledger.found_not_applied += 1
            if lost:
                ledger.in_flight += 1
            ledger.present[op.key] = op.adds
            if op.adds and op.op == "fwd.add":
                ledger.destinations[op.key] = op.args["destination"]


def owned_aliases(d: Daemon, namespaces: list[str]) -> Counter[str]:
    """netagent's link marks (``alias netagent:KEY``) on the host and in each namespace."""
    found: Counter[str] = Counter()
    for where in [None, *namespaces]:
        argv = (
            ["ip", "-o", "link", "show"]
            if where is None
            else ["ip", "-n", where, "-o", "link", "show"]
        )
        out = d.sh(*argv, check=False).stdout
        for m in re.finditer(r"alias (netagent:\S+)", out):
            found[m.group(1)] += 1
    return found


def test_kill_9_at_random_points_loses_and_duplicates_nothing(
    sandbox: Sandbox, workdir: Path, rng_seed: int
) -> None:
    """The seed fixes each worker's ops and the kill times; what a kill interrupts also
    depends on timing, so a replay repeats the run's plan, not its exact interleaving."""
    d = Daemon(sandbox, workdir)
    d.start()
    namespaces = [f"c{n}" for n in range(2 * WORKERS)]
    for ns in namespaces:
        d.ok("ns", "add", ns)
    d.ok("bridge", "add", BRIDGE, "--address", "10.5.255.1/16")
    ledger = Ledger()
    stop = threading.Event()
    seed = rng_seed
    threads = [
        threading.Thread(target=run_worker, args=(w, d.socket, ledger, stop, seed + w), daemon=True)
        for w in range(WORKERS)
    ]
    for t in threads:
        t.start()
    rng = random.Random(seed)
    kills = []
    t0 = time.monotonic()
    startup_kills = 0
    for n in range(KILLS):
        time.sleep(rng.uniform(0.05, 0.45))
        with ledger.lock:
            kills.append(ledger.requests)
        d.kill9()
        if n % 3 == 2:  # and now and then while it starts: loading, reconciling
            d.start(wait=False)
            time.sleep(rng.uniform(0.0, 0.5))
            d.kill9()
            startup_kills += 1
        d.start()
    # the last daemon serves the workers for a while before they stop
    with ledger.lock:
        served_before = ledger.requests
    wait_for(
        "20 more requests answered by the last daemon",
        lambda: ledger.requests >= served_before + 20,
        timeout=30,
    )
    stop.set()
    for t in threads:
        t.join(60)
    took = time.monotonic() - t0
    print(
        f"crash: seed {seed}; {ledger.requests} requests, {len(kills) + startup_kills} "
        f"kill -9 ({len(kills)} while serving, after requests #{kills}; {startup_kills} "
        f"during start-up); {ledger.in_flight} requests cut by a kill: "
        f"{ledger.found_applied} had been applied before it, {ledger.found_not_applied} "
        f"were applied on retry, the rest changed nothing either way; {took:.1f} s"
    )
    # every reply agreed with the exact model of each key: nothing acknowledged was lost,
    # nothing applied twice
    assert ledger.unexpected == []
    assert not any(t.is_alive() for t in threads)

    # the desired state is what the acknowledged requests made it
    expected = {k for k, present in ledger.present.items() if present}
    expected |= {f"ns/{ns}" for ns in namespaces} | {f"br/{BRIDGE}"}
    desired = {i["key"]: i for i in request(d.socket, "show")["result"]["intents"]}
    assert set(desired) == expected

    # the kernel converges: everything in place, each forward once, nothing orphaned
    wait_for(
        "every intent in place", lambda: all_in_place(d), timeout=20, detail=lambda: not_in_place(d)
    )
    forwards = nft_forwards(d)
    assert set(forwards.values()) <= {1}, forwards
    assert {(f"fwd/{p}/{port}", dest) for p, port, dest in forwards} == {
        (k, ledger.destinations[k]) for k in expected if k.startswith("fwd/")
    }
    aliases = owned_aliases(d, namespaces)
    plugs = {k for k in expected if k.startswith("plug/")}
    assert {a.removeprefix("netagent:") for a in aliases} == plugs | {
        f"ns/{ns}" for ns in namespaces if f"netagent:ns/{ns}" in aliases
    } | {f"br/{BRIDGE}"}
    assert all(n == 2 for a, n in aliases.items() if a.startswith("netagent:plug/")), aliases

    # and a clean restart replays to the very same state
    before = snapshot(d)
    assert d.stop() == 0
    d.start()
    assert snapshot(d) == before
    # no process the killed daemons started is left behind
    assert d.stop() == 0
    wait_for("no process left in the sandbox", lambda: not processes_in(sandbox), timeout=5)


# ---- damaged state files -------------------------------------------------------------
def write_state(state_dir: Path, forwards: int) -> None:
    """State files as the daemon leaves them after some history: a snapshot, the one
    before it (the last good copy) and a journal line after it. Written with the daemon's
    own store, without running it (seconds saved per case)."""
    from netagent.agent import intents as I
    from netagent.agent.kinds import default_kinds
    from netagent.agent.state import Change
    from netagent.agent.store import StateStore

    store = StateStore(state_dir, default_kinds())
    store.load()
    live: dict[str, dict[str, Any]] = {}
    for i in range(forwards + 2):
        fwd = I.make_forward(9000 + i, f"10.6.0.{2 + i}:80")
        store.append([Change(fwd.key, None, fwd)])
        live[fwd.key] = fwd.to_dict()
        if i >= forwards:  # two compactions: state.json and state.json.prev
            store.compact(list(live.values()))
    last = I.make_forward(9100, "10.6.0.99:80")
    store.append([Change(last.key, None, last)])
    store.close()


@pytest.mark.parametrize(
    "damage",
    ["truncated snapshot", "garbage snapshot", "bad journal line", "snapshot of another format"],
)
def test_damaged_state_stops_the_start_and_names_the_files(
    sandbox: Sandbox, workdir: Path, damage: str
) -> None:
    d = Daemon(sandbox, workdir)
    write_state(d.state_dir, 3)  # good files (test_torn_last_journal_line starts from them)
    snapshot_file = d.state_dir / "state.json"
    journal = d.state_dir / "journal.jsonl"
    prev = d.state_dir / "state.json.prev"
    assert snapshot_file.exists() and prev.exists() and journal.read_text()
    kept = {p.name: p.read_bytes() for p in d.state_dir.iterdir()}
    if damage == "truncated snapshot":
        snapshot_file.write_bytes(snapshot_file.read_bytes()[:40])
        bad = snapshot_file
    elif damage == "garbage snapshot":
        snapshot_file.write_bytes(b"\x00" * 64)
        bad = snapshot_file
    elif damage == "snapshot of another format":
        doc = json.loads(snapshot_file.read_bytes())
        snapshot_file.write_text(json.dumps({**doc, "format": 99}))
        bad = snapshot_file
    else:
        raw = journal.read_bytes()  # the header and one line (both end in a newline)
        assert raw.count(b"\n") == 2 and b'"changes":' in raw  # damage the line
        journal.write_bytes(raw.replace(b'"changes":', b'"changes"#', 1))
        bad = journal
    damaged = bad.read_bytes()
    code, err = d.run_to_exit()
    print(f"damaged state ({damage}): exit {code}: {err.strip().splitlines()[-1]}")
    assert code == 6, err
    # the last good copy: for a damaged snapshot the one before it, for a damaged
    # journal the snapshot (the journal's lines come after it)
    last_good = snapshot_file if bad == journal else prev
    assert str(bad) in err, err
    assert re.search(re.escape(f"the last good copy is {last_good}") + r"[;\s]", err), err
    assert "netagent ready" not in err
    # nothing was reset or rewritten: the damaged file and the last good copy are as they were
    assert bad.read_bytes() == damaged
    assert prev.read_bytes() == kept["state.json.prev"]
    assert {p.name for p in d.state_dir.iterdir()} - {"lock"} == set(kept) - {"lock"}
    # and no socket was left behind to make clients think it runs
    assert not Path(d.socket).exists()


def test_torn_last_journal_line_is_dropped_not_an_error(sandbox: Sandbox, workdir: Path) -> None:
    """A write cut by kill -9 (no newline yet) was never acknowledged: it is dropped."""
    d = Daemon(sandbox, workdir)
    write_state(d.state_dir, 1)
    journal = d.state_dir / "journal.jsonl"
    journal.write_bytes(journal.read_bytes() + b'{"seq": 99, "changes": [{"key": "fwd/tc')
    d.start()
    keys = {f["key"] for f in request(d.socket, "fwd.list")["result"]}
    assert keys == {"fwd/tcp/9000", "fwd/tcp/9001", "fwd/tcp/9002", "fwd/tcp/9100"}
    assert journal.read_bytes().endswith(b"\n")


def test_a_removal_journaled_before_a_kill_is_carried_out_at_start(
    sandbox: Sandbox, workdir: Path
) -> None:
    """``plug.del`` makes the removal durable (journal, fsync), then changes the kernel.
    A kill -9 between the two leaves the plug's veth pair in place; the next start must
    remove it, as the acknowledged state says. The kill is simulated exactly: the
    daemon is killed, and the removal is journaled with the daemon's own store."""
    from netagent.agent.kinds import default_kinds
    from netagent.agent.state import Change
    from netagent.agent.store import StateStore

    d = Daemon(sandbox, workdir)
    d.start()
    d.ok("ns", "add", "c5")
    d.ok("bridge", "add", BRIDGE, "--address", "10.5.255.1/16")
    d.ok("plug", "c5", BRIDGE, "--address", "10.5.0.2/16")
    plug = next(i for i in d.ctl_json("show")["intents"] if i["key"] == f"plug/c5/{BRIDGE}")
    assert owned_aliases(d, ["c5"])[f"netagent:plug/c5/{BRIDGE}"] == 2
    d.kill9()
    kinds = default_kinds()
    store = StateStore(d.state_dir, kinds)
    store.load()
    store.append([Change(plug["key"], kinds.from_dict(plug["intent"]), None)])
    store.close()
    d.start()
    assert {i["key"] for i in d.ctl_json("show")["intents"]} == {"ns/c5", f"br/{BRIDGE}"}
    wait_for(
        "the removed plug's veth pair gone",
        lambda: f"netagent:plug/c5/{BRIDGE}" not in owned_aliases(d, ["c5"]),
        timeout=10,
        detail=lambda: d.sh("ip", "-o", "link", "show").stdout,
    )
