"""Fuzzing the socket: thousands of random and mutated messages to one daemon.

Messages are valid requests over a small vocabulary (so that adds, deletes, conflicts and
repeats really happen), the same requests mutated (a value swapped for random JSON, a key
dropped or added, the op or version changed, the line cut short), and random lines
(bytes, text, JSON of any shape). After every batch the daemon must have answered each
line with a well-formed reply in order, and its desired state must be exactly what the
acknowledged changes built, replayed by the test from the replies alone; at the end the
kernel (namespaces, bridges, nft forward map) must match too."""

from __future__ import annotations

import json
import socket
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st

from netagent.cli.sandbox import Sandbox
from tests.support.daemon import Daemon
from tests.support.protocol import connect, read_line, request
from tests.support.state import all_in_place, nft_forwards, not_in_place
from tests.support.wait import wait_for

pytestmark = pytest.mark.e2e

EXAMPLES = 300  # batches of 5-20 messages (hypothesis favours short ones): 2000+ in all

NAMESPACES = ["n1", "n2", "n3"]
BRIDGES = ["b1", "b2"]
PORTS = list(range(7000, 7008))
PLUG_INTO = {"n1": "b1", "n2": "b2", "n3": "b1"}
json_leaf = (
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20)
)
json_value = st.recursive(
    json_leaf,
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
    max_leaves=8,
)


@st.composite
def valid_request(draw: st.DrawFn) -> dict[str, Any]:
    ns = draw(st.sampled_from(NAMESPACES))
    br = draw(st.sampled_from(BRIDGES))
    port = draw(st.sampled_from(PORTS))
    net = BRIDGES.index(br) + 1
    host = draw(st.integers(2, 5))
    # each namespace is plugged into one bridge only (see test_second_plug_of_a_namespace)
    home = PLUG_INTO[ns]
    home_net = BRIDGES.index(home) + 1
    op, args = draw(
        st.sampled_from(
            [
                ("ns.add", {"name": ns}),
                ("ns.del", {"name": ns}),
                ("bridge.add", {"name": br, "addresses": [f"10.{net}.0.1/24"]}),
                ("bridge.del", {"name": br}),
                (
                    "plug.add",
                    {"ns": ns, "bridge": home, "addresses": [f"10.{home_net}.0.{host}/24"]},
                ),
                ("plug.del", {"ns": ns, "bridge": home}),
                ("fwd.add", {"host_ports": port, "destination": f"10.{net}.0.{host}:80"}),
                (
                    "fwd.add",
                    {
                        "host_ports": str(port),
                        "proto": "udp",
                        "destination": f"10.{net}.0.{host}:53",
                    },
                ),
                ("fwd.del", {"host_ports": port}),
                ("fwd.del", {"host_ports": port, "proto": "udp"}),
                ("rule.add", {"pattern": f"t{host}-*", "bridge": br}),
                ("rule.del", {"pattern": f"t{host}-*", "bridge": br}),
                ("status", {}),
                ("fwd.list", {}),
                ("ns.list", {}),
                ("rule.list", {}),
                ("bridge.list", {}),
            ]
        )
    )
    return {"v": 1, "op": op, "args": args}


@st.composite
def mutated_request(draw: st.DrawFn) -> dict[str, Any]:
    msg = draw(valid_request())
    args = dict(msg["args"])
    how = draw(st.sampled_from(["value", "drop", "junk", "op", "version", "args", "id"]))
    if how == "value" and args:
        args[draw(st.sampled_from(sorted(args)))] = draw(json_value)
    elif how == "drop" and args:
        del args[draw(st.sampled_from(sorted(args)))]
    elif how == "junk":
        args[draw(st.text(max_size=8))] = draw(json_value)
    elif how == "op":
        msg["op"] = draw(json_value)
    elif how == "version":
        msg["v"] = draw(json_value)
    elif how == "args":
        return {**msg, "args": draw(json_value)}
    elif how == "id":
        msg["id"] = draw(json_value)
    return {**msg, "args": args}


raw_line = st.one_of(
    st.binary(min_size=1, max_size=200),
    st.text(min_size=1, max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass")),
    json_value.map(lambda v: json.dumps(v).encode()),
    valid_request().map(lambda m: json.dumps(m).encode()[: len(json.dumps(m)) // 2]),
)


@st.composite
def message(draw: st.DrawFn) -> bytes:
    """One request line, without its newline."""
    kind = draw(st.sampled_from(["valid", "valid", "mutated", "mutated", "raw"]))
    if kind == "raw":
        line = draw(raw_line)
    else:
        msg = draw(valid_request() if kind == "valid" else mutated_request())
        line = json.dumps(msg, ensure_ascii=draw(st.booleans())).encode("utf-8", "surrogatepass")
    line = line.replace(b"\n", b" ").replace(b"\r", b" ")
    if not line.strip():  # blank lines get no reply, by design
        line = b"?"
    # "events" turns the connection into a stream: not a request/reply exchange
    return line.replace(b'"events"', b'"eventz"')


class Session:
    """One connection, reopened if the daemon hangs up; replies checked for shape."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.sock: socket.socket | None = None
        self.buf = bytearray()

    def exchange(self, lines: list[bytes]) -> list[dict[str, Any]]:
        if self.sock is None:
            self.sock = connect(self.path, timeout=30)
            self.buf = bytearray()
        self.sock.sendall(b"".join(line + b"\n" for line in lines))
        replies = []
        for _ in lines:
            raw = read_line(self.sock, self.buf)
            assert raw, "the daemon hung up mid-batch"
            replies.append(json.loads(raw))
        return replies

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()


def apply_changes(model: dict[str, bool], result: Any) -> None:
    if isinstance(result, dict):
        for change in result.get("changes", []):
            model[change["key"]] = change["action"] != "removed"


def desired_keys(path: str) -> set[str]:
    """The keys of the desired state, from the four cheap list ops (``show`` would also
    inspect the kernel for each intent: too slow to run after every batch)."""
    keys = {f"ns/{n['name']}" for n in request(path, "ns.list")["result"] if n["managed"]}
    for br in request(path, "bridge.list")["result"]:
        keys.add(f"br/{br['name']}")
        keys |= {f"plug/{ns}/{br['name']}" for ns in br["plugs"]}
    keys |= {f["key"] for f in request(path, "fwd.list")["result"]}
    keys |= {f"rule/{r['bridge']}/{r['pattern']}" for r in request(path, "rule.list")["result"]}
    return keys


def test_fuzz_the_socket(sandbox: Sandbox, workdir: Path, rng_seed: int) -> None:
    # a short resync period: convergence is checked within one full pass (see
    # test_plug_gets_its_route_when_the_bridge_gets_a_gateway for why it can take one)
    config = workdir / "netagent.toml"
    config.write_text("resync_interval = 2\n")
    d = Daemon(sandbox, workdir, extra=["--config", str(config)])
    d.start()
    session = Session(d.socket)
    model: dict[str, bool] = {}
    stats: Counter[str] = Counter()
    internal: list[tuple[bytes, dict[str, Any]]] = []
    t0 = time.monotonic()

    # the run's examples follow from the seed (NETAGENT_TEST_SEED replays them)
    @hypothesis_seed(rng_seed)
    @settings(
        max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck)
    )
    @given(st.lists(message(), min_size=5, max_size=20))
    def batch(msgs: list[bytes]) -> None:
        # number each request that is a JSON object so replies can be matched
        lines = []
        for n, line in enumerate(msgs):
            try:
                obj = json.loads(line)
            except ValueError:
                obj = None
            if isinstance(obj, dict) and "id" not in obj:
                obj["id"] = f"m{n}"
                line = json.dumps(obj).encode()
            lines.append(line)
        replies = session.exchange(lines)
        for line, reply in zip(lines, replies, strict=True):
            stats["messages"] += 1
            assert isinstance(reply, dict) and reply.get("v") == 1
            assert isinstance(reply.get("ok"), bool), reply
            if reply["ok"]:
                stats["ok"] += 1
                apply_changes(model, reply.get("result"))
                if isinstance(reply.get("result"), dict) and reply["result"].get("changed"):
                    stats["changed state"] += 1
            else:
                err = reply["error"]
                assert isinstance(err["code"], int) and err["name"] and err["message"]
                stats[f"error {err['name']}"] += 1
                if err["code"] == 5001:
                    internal.append((line, err))
        expected = {k for k, present in model.items() if present}
        assert desired_keys(d.socket) == expected

    try:
        batch()
    finally:
        session.close()
    # the daemon still answers, and the kernel converges to the desired state
    assert request(d.socket, "status")["ok"]

    wait_for(
        "every intent in place", lambda: all_in_place(d), timeout=20, detail=lambda: not_in_place(d)
    )
    expected = {k for k, present in model.items() if present}
    assert {i["key"] for i in request(d.socket, "show")["result"]["intents"]} == expected
    netns = set(d.sh("ip", "netns", "list").stdout.split())
    assert {k.split("/")[1] for k in expected if k.startswith("ns/")} <= netns
    for key in expected:
        if key.startswith("br/"):
            assert d.sh("ip", "link", "show", key.split("/")[1], check=False).returncode == 0
    in_kernel = nft_forwards(d)
    assert set(in_kernel.values()) <= {1}
    assert {f"fwd/{proto}/{port}" for proto, port, _dest in in_kernel} == {
        k for k in expected if k.startswith("fwd/")
    }
    print(
        f"fuzz: {stats['messages']} messages in {time.monotonic() - t0:.1f} s; "
        + ", ".join(f"{k}: {v}" for k, v in stats.most_common())
    )
    assert internal == [], internal[:5]


def test_second_plug_of_a_namespace(sandbox: Sandbox, workdir: Path) -> None:
    """One namespace on two bridges with subnets that do not overlap is allowed (two
    plugs, two interfaces in it); plugging it into the same bridge again with another
    address is a conflict that names the plug; the same plug again changes nothing."""
    d = Daemon(sandbox, workdir)
    d.start()
    d.ok("ns", "add", "n3")
    d.ok("bridge", "add", "b1", "--address", "10.1.0.1/24")
    d.ok("bridge", "add", "b2", "--address", "10.2.0.1/24")
    d.ok("plug", "n3", "b1", "--address", "10.1.0.2/24")
    second = d.ctl("plug", "n3", "b2", "--address", "10.2.0.2/24", json_out=True)
    assert second.returncode == 0, second.stdout + second.stderr
    reply = json.loads(second.stdout)
    assert [c["key"] for c in reply["result"]["changes"]] == ["plug/n3/b2"]
    assert not_in_place(d) == []
    addrs = d.sh("ip", "-n", "n3", "-o", "-4", "addr", "show").stdout
    assert "10.1.0.2/24" in addrs and "10.2.0.2/24" in addrs, addrs
    keys = {i["key"] for i in request(d.socket, "show")["result"]["intents"]}
    assert {"plug/n3/b1", "plug/n3/b2"} <= keys

    again = d.ctl("plug", "n3", "b1", "--address", "10.1.0.3/24")
    assert again.returncode == 4, again.stdout + again.stderr
    assert "already plugged into b1" in again.stderr
    same = d.ctl("plug", "n3", "b2", "--address", "10.2.0.2/24")
    assert same.returncode == 0 and "nothing changed" in same.stdout
    # the refused request changed nothing in the kernel
    assert d.sh("ip", "-n", "n3", "-o", "-4", "addr", "show").stdout == addrs


def test_plug_gets_its_route_when_the_bridge_gets_a_gateway(
    sandbox: Sandbox, workdir: Path
) -> None:
    d = Daemon(sandbox, workdir)
    d.start()
    assert request(d.socket, "ns.add", {"name": "n1"})["ok"]
    assert request(d.socket, "bridge.add", {"name": "b1", "addresses": []})["ok"]
    assert request(
        d.socket, "plug.add", {"ns": "n1", "bridge": "b1", "addresses": ["10.1.0.2/24"]}
    )["ok"]
    assert request(d.socket, "bridge.add", {"name": "b1", "addresses": ["10.1.0.1/24"]})["ok"]
    wait_for(
        "the plug's default route via the new gateway",
        lambda: all_in_place(d),
        timeout=5,
        detail=lambda: not_in_place(d),
    )
    assert "default via 10.1.0.1" in d.sh("ip", "-n", "n1", "route").stdout
