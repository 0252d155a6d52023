"""A small client for the daemon's socket. Standard library only (CLI start-up time)."""

from __future__ import annotations

import contextlib
import json
import os
import socket
from collections.abc import Iterator
from typing import Any

from netagent.agent.errors import NetagentError, error_from_wire
from netagent.agent.protocol import VERSION

DEFAULT_SOCKET = "/run/netagent/netagent.sock"


class Unreachable(Exception):
    """The daemon is not there (not running, wrong --socket, no permission on the file)."""

    exit_status = 69  # EX_UNAVAILABLE


def socket_path(explicit: str | None = None) -> str:
    return explicit or os.environ.get("NETAGENT_SOCKET") or DEFAULT_SOCKET


class Client:
    def __init__(self, path: str | None = None, timeout: float | None = 60.0) -> None:
        self.path = socket_path(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(self.path)
        except FileNotFoundError:
            self.sock.close()
            raise Unreachable(
                f"no netagent socket at {self.path}: is the daemon running "
                "(`netagent run`, or `systemctl start netagent`)? Use --socket or "
                "NETAGENT_SOCKET for another path"
            ) from None
        except PermissionError:
            self.sock.close()
            raise Unreachable(
                f"permission denied on {self.path}: run as root or as a member of the "
                "netagent group"
            ) from None
        except ConnectionRefusedError:
            self.sock.close()
            raise Unreachable(
                f"nothing listens on {self.path}: the daemon is not running"
            ) from None
        self._buf = b""
        self._next_id = 1

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _readline(self) -> bytes:
        while b"\n" not in self._buf:
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                raise Unreachable("the daemon closed the connection")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line

    def raw(self, op: str, args: dict[str, Any] | None = None) -> dict[str, Any]:
        """Send one request; return the whole reply object."""
        req = {"v": VERSION, "id": self._next_id, "op": op, "args": args or {}}
        self._next_id += 1
        # the daemon stops reading a request over its size limit and says why before it
        # hangs up: that answer is the one to show, not "Broken pipe"
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self.sock.sendall(json.dumps(req, separators=(",", ":")).encode() + b"\n")
        try:
            reply = json.loads(self._readline())
        except ConnectionResetError:
            raise Unreachable("the daemon closed the connection") from None
        if not isinstance(reply, dict):
            raise Unreachable("the daemon sent something that is not a reply")
        return reply

    def call(self, op: str, args: dict[str, Any] | None = None) -> Any:
        """Send one request; return its result or raise the error it carries."""
        reply = self.raw(op, args)
        if not reply.get("ok"):
            raise error_from_wire(reply.get("error") or {})
        return reply.get("result")

    def events(self) -> Iterator[dict[str, Any]]:
        self.sock.settimeout(None)
        self.call("events")
        while True:
            msg = json.loads(self._readline())
            if isinstance(msg, dict) and "event" in msg:
                yield msg["event"]


def call(op: str, args: dict[str, Any] | None = None, path: str | None = None) -> Any:
    with Client(path) as client:
        return client.call(op, args)


__all__ = ["Client", "NetagentError", "Unreachable", "call", "socket_path"]
