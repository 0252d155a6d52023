"""Traffic inside the sandbox: servers in namespaces, and HTTP, TCP, UDP and ping clients.

Servers say ``ready`` on stdout once they listen, and the test waits for that line with a
deadline, so a server that fails to start fails the test instead of hanging it. Clients
answer their reply, or a string starting with ``ERROR``: a refused connection is a
result a test may expect."""

from __future__ import annotations

import subprocess
import sys
import threading
from typing import Any

from .daemon import Daemon

#: how long a server may take to start listening (a fresh interpreter, on a busy machine)
READY_TIMEOUT = 20.0


def wait_ready_line(
    proc: subprocess.Popen[Any], what: str, timeout: float = READY_TIMEOUT, expect: str = "ready"
) -> None:
    """Wait until ``proc`` prints ``expect`` (a line); AssertionError naming ``what`` if
    it prints something else, exits, or takes longer than ``timeout``."""
    out = proc.stdout
    assert out is not None
    got: list[str] = []
    reader = threading.Thread(target=lambda: got.append(out.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    if reader.is_alive():
        raise AssertionError(f"{what} did not say {expect} within {timeout:g} s")
    if not got or got[0].strip() != expect:
        raise AssertionError(f"{what} did not start: {got!r}, exit {proc.poll()}")


def _server(d: Daemon, ns: str, code: str, what: str) -> subprocess.Popen[Any]:
    proc = d.box.popen(
        ["ip", "netns", "exec", ns, sys.executable, "-c", code], stdout=subprocess.PIPE, text=True
    )
    wait_ready_line(proc, what)
    return proc


def _family(addr: str) -> str:
    return "socket.AF_INET6" if ":" in addr else "socket.AF_INET"


def serve_http(d: Daemon, ns: str, addr: str, port: int, body: str) -> None:
    """A tiny HTTP server in a namespace answering ``body``; returns once it listens."""
    code = (
        "import http.server,socket,sys\n"
        "class H(http.server.BaseHTTPRequestHandler):\n"
        "    def do_GET(self):\n"
        f"        b={body!r}.encode(); self.send_response(200)\n"
        "        self.send_header('Content-Length', str(len(b)))\n"
        "        self.end_headers(); self.wfile.write(b)\n"
        "    def log_message(self,*a): pass\n"
        "class S(http.server.ThreadingHTTPServer):\n"
        f"    address_family = {_family(addr)}\n"
        f"s=S(({addr!r},{port}),H)\n"  # bound and listening from here on
        "print('ready',flush=True)\n"
        "s.serve_forever()\n"
    )
    _server(d, ns, code, f"the HTTP server on {addr}:{port} in {ns}")


def udp_server(d: Daemon, ns: str, addr: str, port: int, reply: str) -> None:
    """Answers each datagram with ``reply``; returns once bound."""
    code = (
        "import socket\n"
        f"s=socket.socket({_family(addr)},socket.SOCK_DGRAM); s.bind(({addr!r},{port}))\n"
        "print('ready',flush=True)\n"
        f"while True:\n    data,peer=s.recvfrom(100); s.sendto({reply!r}.encode(),peer)\n"
    )
    _server(d, ns, code, f"the UDP server on {addr}:{port} in {ns}")


def peer_echo_server(d: Daemon, ns: str, addr: str, port: int) -> None:
    """A TCP server that answers with the address the connection came from."""
    code = (
        "import socket\n"
        "s=socket.socket(); s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n"
        f"s.bind(({addr!r},{port})); s.listen(16); print('ready',flush=True)\n"
        "while True:\n    c,p=s.accept(); c.sendall(p[0].encode()); c.close()\n"
    )
    _server(d, ns, code, f"the TCP echo server on {addr}:{port} in {ns}")


def _client(d: Daemon, ns: str | None, code: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-c", code]
    return d.in_ns(ns, *argv, check=False) if ns else d.sh(*argv, check=False)


def http_get(d: Daemon, ns: str | None, url: str) -> str:
    """The body, or ``ERROR ...`` (in namespace ``ns``, or the sandbox's host)."""
    code = (
        f"import urllib.request;print(urllib.request.urlopen({url!r}, timeout=3).read().decode())"
    )
    r = _client(d, ns, code)
    return r.stdout.strip() if r.returncode == 0 else f"ERROR {r.stderr.strip()[-200:]}"


def tcp_read(d: Daemon, ns: str | None, host: str, port: int) -> str:
    """What a TCP server sends first, or ``ERROR``."""
    code = (
        "import socket\n"
        f"c=socket.create_connection(({host!r},{port}),3); print(c.recv(100).decode())"
    )
    r = _client(d, ns, code)
    return r.stdout.strip() if r.returncode == 0 else "ERROR"


def udp_ask(d: Daemon, ns: str, host: str, port: int, sport: int = 0, tries: int = 1) -> str:
    """Send datagrams from a fixed source port (1 s apart); the answer or ``ERROR``."""
    bind = "'::'" if ":" in host else "'0.0.0.0'"
    code = (
        "import socket\n"
        f"s=socket.socket({_family(host)},socket.SOCK_DGRAM); s.bind(({bind},{sport}))\n"
        "s.settimeout(1)\n"
        f"for _ in range({tries}):\n"
        f"    s.sendto(b'?',({host!r},{port}))\n"
        "    try:\n        print(s.recv(100).decode()); break\n"
        "    except OSError: pass\n"
        "else: print('ERROR')\n"
    )
    return _client(d, ns, code).stdout.strip()


def ping(d: Daemon, ns: str | None, addr: str) -> bool:
    argv = ["ping", "-c", "1", "-W", "2", addr]
    r = d.in_ns(ns, *argv, check=False) if ns else d.sh(*argv, check=False)
    return r.returncode == 0
