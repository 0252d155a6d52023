"""The netfilter netlink family (``NETLINK_NETFILTER``): one way to open its sockets.

Its sockets are kept open by their users (``conntrack.py``, ``nftcount.py``,
``nftelems.py``: :class:`KeptSocket`): a socket opened right after a commit that deleted
nf_tables elements waits for the kernel to free them (~15 ms, ``docs/kernel-facts.md``),
and opening one per call costs that each time; closing one waits for an RCU grace period.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator

NETLINK_NETFILTER = 12


def open_socket(timeout: float) -> socket.socket:
    """A bound netfilter socket whose calls wait at most ``timeout`` seconds."""
    sock = socket.socket(
        socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_NETFILTER
    )
    sock.settimeout(timeout)
    sock.bind((0, 0))
    return sock


class KeptSocket:
    """One netfilter socket kept open across calls, for blocking calls from worker
    threads, one at a time: :meth:`held` gives it under a lock. A call that fails or
    times out inside closes it (what it left unread goes with it), and the next opens
    another."""

    def __init__(self, timeout: float) -> None:
        self._timeout = timeout
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._seq = 0

    @contextlib.contextmanager
    def held(self) -> Iterator[socket.socket]:
        with self._lock:
            if self._sock is None:
                self._sock = open_socket(self._timeout)
            try:
                yield self._sock
            except BaseException:
                self._drop()
                raise

    def next_seqs(self, n: int = 1) -> int:
        """The first of ``n`` fresh sequence numbers (never 0); under :meth:`held`."""
        if self._seq + n >= 0xFFFFFFFF:
            self._seq = 0
        first = self._seq + 1
        self._seq += n
        return first

    def close(self) -> None:
        with self._lock:
            self._drop()

    def _drop(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
