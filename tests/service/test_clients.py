"""Slow, silent and greedy clients: each is timed out without holding anyone else up, and
hundreds of concurrent clients are served without starving the event loop."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from netagent.cli.sandbox import Sandbox
from tests.support.daemon import Daemon
from tests.support.protocol import answers, connect, read_line, request
from tests.support.wait import wait_for

pytestmark = pytest.mark.e2e

TIMEOUT = 1.0  # --client-timeout for these tests
DEAF_CUT = "client did not read its replies in time; disconnected"


@pytest.fixture
def served(sandbox: Sandbox, workdir: Path, request: pytest.FixtureRequest) -> Iterator[Daemon]:
    timeout = getattr(request, "param", TIMEOUT)
    d = Daemon(sandbox, workdir, extra=["--client-timeout", str(timeout)])
    d.start()
    try:
        yield d
    finally:
        if d.proc is not None and d.proc.poll() is None:
            d.stop()


def open_fds(d: Daemon) -> int:
    assert d.proc is not None
    return len(os.listdir(f"/proc/{d.proc.pid}/fd"))


_PROBE = r"""
import json, select, socket, sys, time
path, out, errors = sys.argv[1], [], []
while not select.select([sys.stdin], [], [], 0.05)[0]:
    t = time.perf_counter()
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(30)
            s.connect(path)
            s.sendall(b'{"op":"status"}\n')
            buf = b""
            while b"\n" not in buf:
                chunk = s.recv(65536)
                if not chunk:
                    raise EOFError("closed")
                buf += chunk
        if b'"ok":true' not in buf:
            raise ValueError(buf[:200])
        out.append(time.perf_counter() - t)
    except Exception as exc:
        errors.append(repr(exc))
print(json.dumps({"latencies": out, "errors": errors}))
"""


class Probe:
    """Asks for status every 50 ms on new connections, from its own process (threads
    here would measure this process's GIL, not the daemon); records each latency."""

    def __init__(self, path: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _PROBE, path],
            text=True,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        self.latencies: list[float] = []
        self.errors: list[str] = []

    def finish(self) -> None:
        out, _ = self.proc.communicate("stop", timeout=60)
        result = json.loads(out)
        self.latencies, self.errors = result["latencies"], result["errors"]


def until_closed(sock: socket.socket, t0: float, limit: float = 10) -> tuple[float, list[bytes]]:
    """Read until the daemon hangs up: (seconds since t0, reply lines)."""
    sock.settimeout(limit)
    buf = bytearray()
    lines: list[bytes] = []
    while True:
        line = read_line(sock, buf)
        if not line:
            return time.monotonic() - t0, lines
        lines.append(line)


def test_silent_partial_slow_and_deaf_clients_are_cut_off(served: Daemon) -> None:
    d = served
    fds_before = open_fds(d)
    probe = Probe(d.socket)
    t0 = time.monotonic()
    silent = connect(d.socket)
    half = connect(d.socket)
    half.sendall(b'{"op":"ns.add","args":{"na')
    slow = connect(d.socket)
    slow_sent = []

    def drip() -> None:  # one byte every 0.2 s: never a whole line
        for ch in b'{"op":"status","args":{"padding":"' + b"x" * 100:
            try:
                slow.send(bytes([ch]))
            except OSError:
                return
            slow_sent.append(ch)
            time.sleep(0.2)

    deaf = connect(d.socket)
    deaf_sent = [0]

    def flood() -> None:  # pipelines requests and never reads a reply
        msg = b'{"op":"show"}\n'
        try:
            for _ in range(20_000):
                deaf.sendall(msg)
                deaf_sent[0] += 1
        except OSError:
            pass

    threads = [
        threading.Thread(target=drip, daemon=True),
        threading.Thread(target=flood, daemon=True),
    ]
    for t in threads:
        t.start()
    # while they hang on, everyone else is served at once, changes included
    wait_for(
        "the slow client dripping and the deaf one flooding",
        lambda: len(slow_sent) >= 2 and deaf_sent[0] > 0,
    )
    assert request(d.socket, "fwd.add", {"host_ports": 8080, "destination": "10.0.0.2:80"})["ok"]
    results = {
        name: until_closed(sock, t0)
        for name, sock in (("silent", silent), ("half", half), ("slow", slow))
    }
    # the deaf client reads nothing until the daemon has cut it off
    wait_for(
        "the deaf client disconnected",
        lambda: DEAF_CUT in d.event_names(),
        timeout=TIMEOUT + 10,
    )
    _closed_after, deaf_replies = until_closed(deaf, t0)
    probe.finish()
    for t in threads:
        t.join(10)
    for name, (after, lines) in results.items():
        assert TIMEOUT * 0.9 <= after <= TIMEOUT + 1.5, (name, after)
        assert len(lines) == 1 and b"request-timeout" in lines[0], (name, lines)
    assert len(slow_sent) < 20  # cut off mid-drip, not when it finished
    assert len(deaf_replies) < deaf_sent[0] <= 20_000
    assert probe.errors == [] and len(probe.latencies) >= 10
    print(
        f"timeouts: silent/half/slow cut after {[round(r[0], 2) for r in results.values()]} s; "
        f"deaf client sent {deaf_sent[0]} requests, read {len(deaf_replies)} replies; "
        f"probe max latency {max(probe.latencies) * 1000:.0f} ms over "
        f"{len(probe.latencies)} requests"
    )
    assert max(probe.latencies) < 0.5
    for s in (silent, half, slow, deaf):
        s.close()
    wait_for(  # nothing held after they are gone
        "the daemon's open files back to where they were",
        lambda: open_fds(d) <= fds_before + 2,
        detail=lambda: f"{open_fds(d)} open, {fds_before} before",
    )


@pytest.mark.parametrize("served", [10.0], indirect=True)
def test_200_concurrent_clients_are_served(served: Daemon) -> None:
    d = served
    fds_before = open_fds(d)
    idle = [connect(d.socket) for _ in range(200)]  # connected, saying nothing
    probe = Probe(d.socket)
    barrier = threading.Barrier(200)
    latencies: list[float] = []
    failures: list[str] = []

    def client(n: int) -> None:
        try:
            with connect(d.socket, timeout=30) as sock:
                barrier.wait(10)
                buf = bytearray()
                for op in ("status", "fwd.list", "show"):
                    t = time.perf_counter()
                    sock.sendall(b'{"id":%d,"op":"%s"}\n' % (n, op.encode()))
                    reply = read_line(sock, buf)
                    latencies.append(time.perf_counter() - t)
                    if b'"ok":true' not in reply:
                        failures.append(reply.decode()[:200])
        except Exception as exc:
            failures.append(repr(exc))

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(n,)) for n in range(200)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    took = time.perf_counter() - t0
    probe.finish()
    held = len(idle) + len(threads)
    print(
        f"concurrency: {held} clients at once ({len(idle)} idle), {len(latencies)} requests "
        f"in {took:.2f} s, max latency {max(latencies) * 1000:.0f} ms; probe max "
        f"{max(probe.latencies) * 1000:.0f} ms"
    )
    assert failures == []
    assert len(latencies) == 600
    assert probe.errors == [] and max(probe.latencies) < 1.0
    for s in idle:
        s.close()
    wait_for(
        "the daemon's open files back to where they were",
        lambda: open_fds(d) <= fds_before + 2,
        detail=lambda: f"{open_fds(d)} open, {fds_before} before",
    )


def test_running_out_of_file_descriptors_does_not_take_it_down(
    sandbox: Sandbox, workdir: Path
) -> None:
    """With a tiny fd limit: clients past the daemon's limit are told to come back,
    accept() then fails with EMFILE (retried, not fatal: anyio's own serve() would end
    the daemon), those waiting in the backlog are taken in as fds free up, and the
    daemon serves again once they are gone."""
    d = Daemon(
        sandbox, workdir, wrap=["prlimit", "--nofile=96:96", "--"], extra=["--client-timeout", "3"]
    )
    d.start()
    socks = [connect(d.socket, timeout=10) for _ in range(150)]  # all silent, for now
    # the daemon has run out of descriptors (it says so) and is still there
    wait_for(
        "accept() failing with EMFILE, logged",
        lambda: "accepting connections fails; retrying" in d.event_names(),
    )
    assert d.proc is not None and d.proc.poll() is None
    for s in socks:
        s.sendall(b'{"op":"status"}\n')
    ok = busy = 0
    for s in socks:
        line = read_line(s, bytearray())
        ok += b'"ok":true' in line
        busy += b"its limit" in line
        s.close()
    events = [e.get("event") for e in d.log_events()]
    print(
        f"fd limit 96: 150 clients at once, {ok} served, {busy} told to come back; "
        f"accept() failing with EMFILE was survived: "
        f"{'accepting connections fails; retrying' in events}"
    )
    assert ok >= 16 and busy >= 1 and ok + busy == 150
    assert "too many clients; connection refused" in events
    assert "accepting connections fails; retrying" in events
    assert d.proc.poll() is None
    wait_for("the daemon answering status again", lambda: answers(d.socket))
