"""Shared steps for end-to-end tests: the seed topology, an outside client, HTTP."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import Any

from netagent.cli.sandbox import CLIENT_HOST as CLIENT_HOST
from netagent.cli.sandbox import outside_client_steps
from tests.conftest import Daemon


def build_seed(d: Daemon, forward: bool = True) -> None:
    d.ok("ns", "add", "red")
    d.ok("ns", "add", "blue")
    d.ok("bridge", "add", "v-net-0", "--address", "192.168.15.5/24")
    d.ok("plug", "red", "v-net-0", "--address", "192.168.15.1/24")
    d.ok("plug", "blue", "v-net-0", "--address", "192.168.15.2/24")
    if forward:
        d.ok("forward", "80", "192.168.15.2:80")


def add_client(d: Daemon) -> None:
    """The outside world: a namespace wired to the host by hand (not netagent's)."""
    for argv in outside_client_steps():
        d.sh(*argv)


def serve_http(d: Daemon, ns: str, addr: str, port: int, body: str) -> None:
    """A tiny HTTP server in a namespace answering ``body``; waits until it listens."""
    code = (
        "import http.server,socket,sys\n"
        "class H(http.server.BaseHTTPRequestHandler):\n"
        "    def do_GET(self):\n"
        f"        b={body!r}.encode(); self.send_response(200)\n"
        "        self.send_header('Content-Length', str(len(b)))\n"
        "        self.end_headers(); self.wfile.write(b)\n"
        "    def log_message(self,*a): pass\n"
        "class S(http.server.ThreadingHTTPServer):\n"
        f"    address_family = socket.AF_INET6 if ':' in {addr!r} else socket.AF_INET\n"
        f"S(({addr!r},{port}),H).serve_forever()\n"
    )
    d.box.popen(["ip", "netns", "exec", ns, sys.executable, "-c", code])
    for _ in range(200):
        r = d.in_ns(
            ns,
            sys.executable,
            "-c",
            f"import socket;socket.create_connection(({addr!r},{port}),1)",
            check=False,
        )
        if r.returncode == 0:
            return
        time.sleep(0.05)
    raise AssertionError(f"http server in {ns} did not start")


def http_get(d: Daemon, ns: str | None, url: str) -> str:
    code = (
        f"import urllib.request;print(urllib.request.urlopen({url!r}, timeout=3).read().decode())"
    )
    argv = [sys.executable, "-c", code]
    r = d.in_ns(ns, *argv, check=False) if ns else d.sh(*argv, check=False)
    return r.stdout.strip() if r.returncode == 0 else f"ERROR {r.stderr.strip()[-200:]}"


def ping(d: Daemon, ns: str | None, addr: str) -> bool:
    argv = ["ping", "-c", "1", "-W", "2", addr]
    r = d.in_ns(ns, *argv, check=False) if ns else d.sh(*argv, check=False)
    return r.returncode == 0


def show(d: Daemon) -> dict[str, Any]:
    reply = json.loads(d.ctl("show", json_out=True, check=True).stdout)
    assert reply["ok"] is True
    result: dict[str, Any] = reply["result"]
    return result


def desired(d: Daemon) -> list[dict[str, Any]]:
    return [i["intent"] for i in show(d)["intents"]]


BACKENDS = ["nftables", "iptables"]


def udp_server(d: Daemon, ns: str, addr: str, port: int, reply: str) -> None:
    """Answers each datagram with ``reply``; waits until bound."""
    family = "socket.AF_INET6" if ":" in addr else "socket.AF_INET"
    code = (
        "import socket\n"
        f"s=socket.socket({family},socket.SOCK_DGRAM); s.bind(({addr!r},{port}))\n"
        "print('ready',flush=True)\n"
        f"while True:\n    data,peer=s.recvfrom(100); s.sendto({reply!r}.encode(),peer)\n"
    )
    proc = d.box.popen(
        ["ip", "netns", "exec", ns, sys.executable, "-c", code], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"


def peer_echo_server(d: Daemon, ns: str, addr: str, port: int) -> None:
    """A TCP server that answers with the address the connection came from."""
    code = (
        "import socket\n"
        f"s=socket.socket(); s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n"
        f"s.bind(({addr!r},{port})); s.listen(16); print('ready',flush=True)\n"
        "while True:\n    c,p=s.accept(); c.sendall(p[0].encode()); c.close()\n"
    )
    proc = d.box.popen(
        ["ip", "netns", "exec", ns, sys.executable, "-c", code], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"


def tcp_read(d: Daemon, ns: str | None, host: str, port: int) -> str:
    code = (
        "import socket\n"
        f"c=socket.create_connection(({host!r},{port}),3); print(c.recv(100).decode())"
    )
    argv = [sys.executable, "-c", code]
    r = d.in_ns(ns, *argv, check=False) if ns else d.sh(*argv, check=False)
    return r.stdout.strip() if r.returncode == 0 else "ERROR"
