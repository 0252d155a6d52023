"""Hostile and broken input: every bad request gets an error reply, the daemon keeps
serving, nothing changes (desired state, nft ruleset, links, namespaces), and no program
is ever run through a shell or handed an argument a request smuggled in.

The daemon runs under a Python audit hook (``sys.addaudithook``) that records every
``subprocess.Popen`` (asyncio's subprocesses go through it too) and ``os.system``/
``os.posix_spawn``/``os.exec*``, so the test sees each command line it ran."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from netagent.agent.protocol import MAX_LINE
from netagent.cli.sandbox import Sandbox
from tests.support.daemon import Daemon
from tests.support.protocol import exchange, request
from tests.support.state import snapshot

pytestmark = pytest.mark.e2e

AUDIT_LAUNCHER = r"""
import json, os, sys
out = open(os.environ["NETAGENT_AUDIT_LOG"], "a", buffering=1)
ARGV_AT = {"subprocess.Popen": 1, "os.posix_spawn": 1, "os.exec": 1, "os.spawn": 2}
def hook(event, args):
    if event in ARGV_AT:
        argv = args[ARGV_AT[event]]
        argv = [argv] if isinstance(argv, (str, bytes)) else list(argv)
        out.write(json.dumps({"event": event, "argv": [
            a if isinstance(a, str) else os.fsdecode(a) for a in argv]}) + "\n")
    elif event in ("os.system", "os.popen"):
        out.write(json.dumps({"event": event, "argv": [repr(args)[:500]]}) + "\n")
sys.addaudithook(hook)
import runpy
sys.argv = ["netagent", *sys.argv[1:]]
runpy.run_module("netagent", run_name="__main__", alter_sys=True)
"""

SHELLS = {"sh", "bash", "dash", "zsh", "ksh", "busybox"}

# Names built to be read as options or to break out of an argument list, and names
# with characters no tool or kernel should see.
EVIL_NAMES: list[Any] = [
    "--flush",
    "-n",
    "-all",
    "--all",
    "-f",
    "a;b",
    "a b",
    "a\nb",
    "a\tb",
    "a\rb",
    "a\x00b",
    "a\x1b[31m",
    "ä",
    "\u202eevil",
    "\ud800",
    "é",
    "\uff52\uff45\uff44",
    "x" * 16,
    "",
    ".",
    "..",
    "$(reboot)",
    "`id`",
    "a/b",
    "../../etc",
    "a|b",
    "a&b",
    "a>b",
    "*",
    "red\n",
    " red",
    123,
    1.5,
    True,
    None,
    [],
    {},
    ["red"],
]
#: names above that are valid shell patterns (they match nothing harmful)
VALID_PATTERNS = {"x" * 16, ".", "..", "*"}
EVIL_ADDRESSES: list[Any] = [
    "10.0.0.1/24; flush ruleset",
    "10.0.0.1/24 dev eth0",
    "1.2.3.4/33",
    "10.0.0.1",
    "::1/128",
    "224.0.0.1/24",
    "0.0.0.0/0",
    "10.0.0.0/24",
    "10.0.0.255/24",
    "--flush",
    "\uff11\uff10.0.0.1/24",
    17,
    [17],
    ["10.0.0.1/24", "10.0.0.2/24"],
    {"a": 1},
]
EVIL_PORTS: list[Any] = [
    -1,
    0,
    65536,
    10**30,
    "1-65536",
    "80;81",
    "80 ",
    " 80",
    "80-79",
    "--dport",
    1.5,
    True,
    None,
    "",
    "0x50",
    "8e1",
    [80],
    {"p": 80},
]
EVIL_DESTINATIONS: list[Any] = [
    "10.0.0.2:80 --to-destination 1.1.1.1",
    "10.0.0.2:80;",
    "[::1]:80]",
    "10.0.0.2:-1",
    "10.0.0.2:",
    ":80",
    "10.0.0.2:80\n",
    "10.0.0.2",
    "224.0.0.1:80",
    "0.0.0.0:80",
    "10.0.0.2:80-90",
    "$(id):80",
    80,
    None,
]


def _cases() -> list[tuple[str, str, dict[str, Any]]]:
    cases: list[tuple[str, str, dict[str, Any]]] = []
    for n in EVIL_NAMES:
        if n is None:  # an absent optional argument (ifname, ns of links) is fine
            cases += [
                ("ns.add", "name=None", {"name": n}),
                ("bridge.add", "name=None", {"name": n}),
            ]
            continue
        if not (isinstance(n, str) and n in VALID_PATTERNS):
            cases.append(("rule.add", f"pattern={n!r}", {"pattern": n, "bridge": "br0"}))
        cases += [
            ("ns.add", f"name={n!r}", {"name": n}),
            ("ns.del", f"name={n!r}", {"name": n}),
            ("bridge.add", f"name={n!r}", {"name": n}),
            ("bridge.del", f"name={n!r}", {"name": n}),
            ("plug.add", f"ns={n!r}", {"ns": n, "bridge": "br0", "addresses": ["10.7.0.9/24"]}),
            ("plug.add", f"bridge={n!r}", {"ns": "red", "bridge": n, "addresses": ["10.7.0.9/24"]}),
            (
                "plug.add",
                f"ifname={n!r}",
                {"ns": "blue", "bridge": "br0", "addresses": ["10.7.0.9/24"], "ifname": n},
            ),
            ("plug.del", f"ns={n!r}", {"ns": n, "bridge": "br0"}),
            (
                "wire.add",
                f"ns_b={n!r}",
                {
                    "ns_a": "red",
                    "ns_b": n,
                    "addresses_a": ["10.9.0.1/30"],
                    "addresses_b": ["10.9.0.2/30"],
                },
            ),
            ("rule.add", f"bridge={n!r}", {"pattern": "tap*", "bridge": n}),
            ("links", f"ns={n!r}", {"ns": n}),
            ("routes", f"ns={n!r}", {"ns": n}),
            ("apply", f"ns {n!r}", {"intents": [{"kind": "ns", "name": n}]}),
        ]
    for a in EVIL_ADDRESSES:
        cases += [
            ("bridge.add", f"address={a!r}", {"name": "br9", "addresses": a}),
            ("plug.add", f"address={a!r}", {"ns": "blue", "bridge": "br0", "addresses": a}),
        ]
    for p in EVIL_PORTS:
        cases += [
            ("fwd.add", f"host_ports={p!r}", {"host_ports": p, "destination": "10.7.0.2:80"}),
            ("fwd.del", f"host_ports={p!r}", {"host_ports": p}),
        ]
    for dest in EVIL_DESTINATIONS:
        cases.append(
            ("fwd.add", f"destination={dest!r}", {"host_ports": 9000, "destination": dest})
        )
    for proto in ("tcp; flush", "TCP", "icmp", "sctp", 6, None, ["tcp"]):
        if proto is None:
            continue
        cases.append(
            (
                "fwd.add",
                f"proto={proto!r}",
                {"host_ports": 9001, "proto": proto, "destination": "10.7.0.2:80"},
            )
        )
    for host_ip in ("1.2.3.4 --flush", "0.0.0.0", "224.0.0.1", "::ffff:1.2.3.4x", 1, ["1.2.3.4"]):
        cases.append(
            (
                "fwd.add",
                f"host_ip={host_ip!r}",
                {"host_ports": 9002, "host_ip": host_ip, "destination": "10.7.0.2:80"},
            )
        )
    for masq in ("yes", 1, 0, [True]):
        cases.append(("bridge.add", f"masquerade={masq!r}", {"name": "br8", "masquerade": masq}))
    bad_documents: list[Any] = [
        "all",
        [1, 2],
        [{"kind": "evil"}],
        {},
        [{"kind": "fwd", "host_ports": "--x", "destination": "1.2.3.4:1"}],
    ]
    for intents in bad_documents:
        cases.append(("apply", f"intents={intents!r}", {"intents": intents}))
    cases += [
        ("apply", "prune='yes'", {"intents": [], "prune": "yes"}),
        ("nope", "unknown op", {}),
        ("__init__", "dunder op", {}),
        ("handle", "method op", {}),
        ("op_status", "method name", {}),
        ("fwd.add", "missing args", {}),
        ("plug.add", "missing bridge", {"ns": "blue", "bridge": "nobr"}),
        ("plug.add", "missing ns", {"ns": "nons", "bridge": "br0"}),
        ("ns.del", "not managed", {"name": "nonexistent"}),
        ("fwd.del", "not forwarded", {"host_ports": 9999}),
        ("bridge.del", "still used", {"name": "br0"}),
        ("fwd.add", "port taken", {"host_ports": 8080, "destination": "10.7.0.3:80"}),
        (
            "plug.add",
            "address taken",
            {"ns": "blue", "bridge": "br0", "addresses": ["10.7.0.2/24"]},
        ),
    ]
    return cases


CASES = _cases()

# Raw lines that are not valid requests at all.
RAW_LINES: list[tuple[str, bytes]] = [
    ("not json", b"not json"),
    ("array", b"[1,2,3]"),
    ("string", b'"status"'),
    ("null", b"null"),
    ("version 2", b'{"v":2,"op":"status"}'),
    ("version string", b'{"v":"1","op":"status"}'),
    ("op number", b'{"op":123}'),
    ("op empty", b'{"op":""}'),
    ("no op", b'{"args":{}}'),
    ("args list", b'{"op":"status","args":[]}'),
    ("args string", b'{"op":"ns.add","args":"red"}'),
    ("bad utf-8", b"\xff\xfe{}"),
    ("nul bytes", b'{"op":"st\x00atus"}'),
    ("control chars", b'{"op":"ns.add","args":{"name":"r\\u0000d"}}'),
    ("lone surrogate", b'{"op":"ns.add","args":{"name":"\\ud800"}}'),
    ("nested 100k", b"[" * 100_000 + b"]" * 100_000),
    ("nested objects", b'{"op":"ns.add","args":' + b'{"a":' * 50_000 + b"1" + b"}" * 50_001),
    ("5000 digits", b'{"op":"fwd.add","args":{"host_ports":1' + b"0" * 5000 + b"}}"),
    ("NaN", b'{"op":"fwd.add","args":{"host_ports":NaN,"destination":"10.7.0.2:80"}}'),
    ("Infinity", b'{"op":"fwd.add","args":{"host_ports":Infinity,"destination":"10.7.0.2:80"}}'),
    ("1e400", b'{"op":"fwd.add","args":{"host_ports":1e400,"destination":"10.7.0.2:80"}}'),
    ("truncated", b'{"op":"ns.add","args":{"name":"x"'),
    ("trailing garbage", b'{"op":"status"} {"op":"purge"}'),
    ("duplicate op", b'{"op":"status","op":"ns.add"}'),
]


@pytest.fixture(scope="module")
def hostile_daemon(module_sandbox: Sandbox, module_workdir: Path) -> Iterator[Daemon]:
    """One daemon for the whole module (each test checks that nothing changed)."""
    audit = module_workdir / "audit.jsonl"
    d = Daemon(
        module_sandbox,
        module_workdir,
        extra=["--client-timeout", "1"],
        launcher=[sys.executable, "-c", AUDIT_LAUNCHER],
        env={"NETAGENT_AUDIT_LOG": str(audit)},
    )
    d.start()
    d.ok("ns", "add", "red")
    d.ok("ns", "add", "blue")
    d.ok("bridge", "add", "br0", "--address", "10.7.0.1/24")
    d.ok("plug", "red", "br0", "--address", "10.7.0.2/24")
    d.ok("forward", "8080", "10.7.0.2:80")
    d.ok("attach", "add", "tap*", "br0")
    yield d
    if d.running():
        assert d.stop() == 0


def audit_records(d: Daemon) -> list[dict[str, Any]]:
    path = d.dir / "audit.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def strings_in(value: Any) -> set[str]:
    if isinstance(value, str):
        return {value}
    if isinstance(value, list):
        return set().union(*(strings_in(v) for v in value)) if value else set()
    if isinstance(value, dict):
        return set().union(*(strings_in(v) for v in value.values())) if value else set()
    return set()


def test_hostile_requests_get_errors_and_change_nothing(hostile_daemon: Daemon) -> None:
    d = hostile_daemon
    before = snapshot(d)
    commands_before = len(audit_records(d))
    payload = b"".join(
        json.dumps({"v": 1, "id": n, "op": op, "args": args}).encode() + b"\n"
        for n, (op, _why, args) in enumerate(CASES)
    )
    replies = exchange(d.socket, payload, timeout=120)
    assert len(replies) == len(CASES)
    wrong = []
    for (op, why, _args), reply in zip(CASES, replies, strict=True):
        if reply.get("ok") is not False or reply["error"]["code"] >= 5000:
            wrong.append((op, why, reply))
    assert wrong == [], wrong[:10]
    assert [r["id"] for r in replies] == list(range(len(CASES)))
    assert snapshot(d) == before
    # nothing a request carried reached a command line, and no shell ever ran
    evil = set().union(*(strings_in(a) for _op, _why, a in CASES)) - {
        "red",
        "blue",
        "br0",
        "tap*",
        "10.7.0.2:80",
        "10.7.0.9/24",
        "tcp",
    }
    records = audit_records(d)
    ran = records[commands_before:]
    for rec in records:
        assert rec["event"] not in ("os.system", "os.popen"), rec
        assert Path(rec["argv"][0]).name not in SHELLS, rec
        assert "-c" not in rec["argv"][1:2], rec
    leaked = [rec for rec in ran if set(rec["argv"]) & evil]
    assert leaked == []
    print(
        f"hostile: {len(CASES)} bad requests answered with errors; {len(ran)} commands run "
        f"meanwhile (all exec'd directly), {len(records)} in all"
    )
    assert request(d.socket, "status")["ok"]


@pytest.mark.parametrize(("why", "line"), RAW_LINES, ids=[w for w, _ in RAW_LINES])
def test_malformed_lines_get_an_error_reply(hostile_daemon: Daemon, why: str, line: bytes) -> None:
    d = hostile_daemon
    before = snapshot(d) if why in ("trailing garbage", "duplicate op") else None
    replies = exchange(d.socket, line + b"\n" + b'{"id":"after","op":"status"}\n')
    assert replies, why
    first = replies[0]
    assert first["ok"] is False and first["error"]["code"] < 5000, first
    # the connection (where the protocol allows) and the daemon go on serving
    assert replies[-1]["id"] == "after" and replies[-1]["ok"], replies
    assert request(d.socket, "status")["ok"]
    if before is not None:
        assert snapshot(d) == before


@pytest.mark.parametrize("port", ["²", "٨٠", "\uff18\uff10"])
def test_non_ascii_digits_are_not_ports(hostile_daemon: Daemon, port: str) -> None:
    before = snapshot(hostile_daemon)
    reply = request(
        hostile_daemon.socket, "fwd.add", {"host_ports": port, "destination": "10.7.0.2:80"}
    )
    after = snapshot(hostile_daemon)
    if reply.get("ok"):  # leave the shared daemon as it was
        for change in reply["result"]["changes"]:
            request(hostile_daemon.socket, "fwd.del", {"host_ports": change["key"].split("/")[2]})
    assert after == before
    assert reply["ok"] is False and reply["error"]["name"] == "invalid-port", reply


def test_oversized_request_is_refused_and_the_daemon_goes_on(hostile_daemon: Daemon) -> None:
    d = hostile_daemon
    before = snapshot(d)
    pad = MAX_LINE - len(b'{"op":"status","pad":""}')
    for extra in (1, 1000, 70_000, MAX_LINE):
        big = b'{"op":"status","pad":"' + b" " * (pad + extra) + b'"}\n'
        replies = exchange(d.socket, big + b'{"op":"status"}\n', timeout=30)
        assert [r["error"]["name"] for r in replies] == ["request-too-large"], extra
    # exactly at the limit (the newline not counted) is still a request
    ok = exchange(d.socket, b'{"op":"status","pad":"' + b" " * pad + b'"}\n', timeout=30)
    assert ok and ok[0]["ok"] is True
    assert snapshot(d) == before


def test_a_half_line_then_hangup_gets_an_error(hostile_daemon: Daemon) -> None:
    replies = exchange(hostile_daemon.socket, b'{"op":"ns.add","args":{"name":"x"}}')
    assert [r["error"]["name"] for r in replies] == ["bad-request"]
    assert "newline" in replies[0]["error"]["message"]
    assert "x" not in hostile_daemon.sh("ip", "netns", "list").stdout.split()
