"""A small client for the daemon's socket (tests, the benchmark, the demo use it; every
``ctl`` command goes through the same :class:`~netagent.cli.wire.Connection`). Standard
library only (CLI start-up time)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from netagent.agent.errors import NetagentError, error_from_wire

from .wire import DEFAULT_SOCKET, Connection, Unreachable, socket_path


class Client(Connection):
    def __init__(self, path: str | None = None, timeout: float | None = 60.0) -> None:
        self.path = socket_path(path)
        super().__init__(self.path, timeout)

    def __enter__(self) -> Client:
        return self

    def _readline(self) -> bytes:
        return self.readline()

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
            msg = self.read_message()
            if isinstance(msg, dict) and "event" in msg:
                yield msg["event"]


def call(op: str, args: dict[str, Any] | None = None, path: str | None = None) -> Any:
    with Client(path) as client:
        return client.call(op, args)


__all__ = ["DEFAULT_SOCKET", "Client", "NetagentError", "Unreachable", "call", "socket_path"]
