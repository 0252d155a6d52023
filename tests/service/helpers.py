"""Shared pieces of the service-grade tests: a daemon that can be launched under a wrapper
(systemd-socket-activate, setpriv, an audit hook), raw socket clients, and a reader of
the daemon's whole state (desired and kernel) to compare before and after."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from netagent.cli.sandbox import Sandbox
from tests.conftest import Daemon

REPO = Path(__file__).resolve().parents[2]


class ServiceDaemon(Daemon):
    """The real daemon in a sandbox, with a configurable command line.

    ``wrap`` goes in front of the Python interpreter (e.g. ``systemd-socket-activate -l
    PATH``); ``launcher`` replaces ``python -m netagent``; ``env`` is added to the
    environment; ``extra`` goes after ``run``'s usual options."""

    def __init__(
        self,
        box: Sandbox,
        workdir: Path,
        *,
        firewall: str = "nftables",
        extra: list[str] | None = None,
        wrap: list[str] | None = None,
        launcher: list[str] | None = None,
        env: dict[str, str] | None = None,
        with_socket_option: bool = True,
    ) -> None:
        super().__init__(box, workdir, firewall=firewall, extra=extra)
        self.wrap = wrap or []
        self.launcher = launcher or [sys.executable, "-m", "netagent"]
        self.env = env or {}
        self.with_socket_option = with_socket_option

    def argv(self) -> list[str]:
        sock = ["--socket", self.socket] if self.with_socket_option else []
        return [
            *self.wrap,
            *self.launcher,
            "run",
            *sock,
            "--state-dir",
            str(self.state_dir),
            "--firewall",
            self.firewall,
            "--log-format",
            "json",
            *self.extra,
        ]

    def start(self, wait: bool = True) -> None:
        self.starts += 1
        with open(self.log_path, "a") as log:
            self.proc = self.box.popen(
                self.argv(), stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **self.env}
            )
        if wait:
            self.wait_ready()

    def run_to_exit(self, timeout: float = 30) -> tuple[int, str]:
        """Start and wait for the process to end by itself (a start that must fail):
        (exit status, what it logged)."""
        offset = len(self.log())
        self.start(wait=False)
        assert self.proc is not None
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.box.stop(self.proc)
            raise AssertionError(f"the daemon kept running:\n{self.log()}") from None
        return code, self.log()[offset:]


# ---- raw socket clients ------------------------------------------------------------
def connect(path: str, timeout: float = 10) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    sock.connect(path)
    return sock


def read_line(sock: socket.socket, buf: bytearray) -> bytes:
    """One reply line; b"" at end of stream."""
    while b"\n" not in buf:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            rest = bytes(buf)
            buf.clear()
            return rest
        buf += chunk
    line, _, rest = bytes(buf).partition(b"\n")
    buf[:] = rest
    return line


def exchange(path: str, payload: bytes, timeout: float = 10) -> list[dict[str, Any]]:
    """Send raw bytes, half-close, return every reply line until the daemon hangs up."""
    with connect(path, timeout) as sock:
        try:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass
        buf = bytearray()
        replies: list[dict[str, Any]] = []
        while True:
            line = read_line(sock, buf)
            if not line:
                return replies
            replies.append(json.loads(line))


def request(path: str, op: str, args: Any = None, timeout: float = 10) -> dict[str, Any]:
    """One request over a fresh connection; the whole reply object."""
    msg = {"v": 1, "id": 1, "op": op, "args": {} if args is None else args}
    with connect(path, timeout) as sock:
        sock.sendall(json.dumps(msg).encode() + b"\n")
        reply: dict[str, Any] = json.loads(read_line(sock, bytearray()))
        return reply


def status_latency(path: str) -> float:
    t0 = time.perf_counter()
    reply = request(path, "status")
    assert reply["ok"], reply
    return time.perf_counter() - t0


# ---- the whole state, to compare ---------------------------------------------------
def snapshot(d: Daemon) -> dict[str, Any]:
    """What netagent holds and what the kernel has: desired intents, nft table, links and
    namespaces in the sandbox. Equal snapshots mean nothing changed."""
    desired = request(d.socket, "show")["result"]
    nft = d.sh("nft", "list", "ruleset", check=False).stdout
    links = d.sh("ip", "-o", "link", "show").stdout
    names = sorted(line.split(":")[1].strip().split("@")[0] for line in links.splitlines())
    netns = sorted(d.sh("ip", "netns", "list").stdout.split())
    return {
        "intents": [i["intent"] for i in desired["intents"]],
        "nft": nft,
        "links": names,
        "netns": netns,
    }


def wait_for(predicate: Any, timeout: float = 10, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


def nft_forwards(d: Daemon) -> Counter[tuple[str, int, str]]:
    """The forwards in the kernel, from netagent's nft maps: (proto, host port,
    destination) -> how many times (1, or the map is wrong)."""
    out = d.sh("nft", "-j", "list", "table", "inet", "netagent", check=False).stdout
    found: Counter[tuple[str, int, str]] = Counter()
    if not out.strip():
        return found
    for item in json.loads(out).get("nftables", []):
        m = item.get("map")
        if not m or not m.get("name", "").startswith("dnat_") or m["name"].endswith("h"):
            continue
        proto = m["name"][len("dnat_") : -1]
        for key, value in m.get("elem", []):
            ip, port = value["concat"]
            keys = range(key["range"][0], key["range"][1] + 1) if isinstance(key, dict) else [key]
            for offset, k in enumerate(keys):
                found[(proto, int(k), f"{ip}:{int(port) + offset}")] += 1
    return found


def processes_in(box: Sandbox) -> dict[int, str]:
    """Processes in the sandbox's network namespace, besides the one holding it."""
    target = os.readlink(f"/proc/{box.pid}/ns/net")
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == box.pid:
            continue
        try:
            if os.readlink(f"/proc/{entry}/ns/net") == target:
                cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ")
                found[int(entry)] = cmd.decode(errors="replace").strip()
        except OSError:
            continue
    return found


def stop_everything_in(box: Sandbox) -> None:
    """SIGTERM each process started in the sandbox (by pid) and wait for it, then SIGKILL
    (by pid) what is still in its network namespace."""
    import signal

    for proc in box.children:
        box.stop(proc, signal.SIGTERM, timeout=10)
    for pid in processes_in(box):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
