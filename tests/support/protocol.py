"""Raw clients of the daemon's socket: JSON lines, one request and one reply each, or
any bytes at all (the hostile and fuzz tests). Every socket has a time limit."""

from __future__ import annotations

import json
import socket
import time
from typing import Any


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


def answers(path: str, timeout: float = 5) -> bool:
    """Whether the daemon answers ``status`` now (False while it cannot be reached)."""
    try:
        return bool(request(path, "status", timeout=timeout)["ok"])
    except (OSError, ValueError):
        return False


def status_latency(path: str) -> float:
    t0 = time.perf_counter()
    reply = request(path, "status")
    assert reply["ok"], reply
    return time.perf_counter() - t0
