"""A stand-in for systemd's ``NOTIFY_SOCKET`` (no systemd manager runs here): a datagram
socket that collects what the daemon says (READY=1, STATUS=, WATCHDOG=1, STOPPING=1)."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path


class NotifyListener:
    """Stands in for systemd's NOTIFY_SOCKET: collects (time, message) datagrams."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, str]] = []
        self.closed = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.closed:
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            self.messages.append((time.monotonic(), data.decode()))

    def having(self, prefix: str) -> list[tuple[float, str]]:
        """Messages with a line starting with ``prefix`` (e.g. READY=1, STATUS=)."""
        return [
            (t, m)
            for t, m in list(self.messages)
            if any(line.startswith(prefix) for line in m.split("\n"))
        ]

    def close(self) -> None:
        self.closed = True
        self.thread.join(2)
        self.sock.close()
