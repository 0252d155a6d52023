"""The netfilter netlink family (``NETLINK_NETFILTER``): one way to open its sockets.

Its sockets are kept open by their users (``conntrack.py``, ``nftcount.py``,
``nftelems.py``: :class:`KeptSocket`): a socket opened right after a commit that deleted
nf_tables elements waits for the kernel to free them (~15 ms, ``docs/kernel-facts.md``),
and opening one per call costs that each time; closing one waits for an RCU grace period.

Each kept socket's netlink port id is in :data:`OPEN` while it is open: nf_tables names
the socket a transaction came from in each of its change notifications, so the drift
watcher (``nftmonitor.py``) has the kernel drop those of our own element writes before
they reach it, instead of reading and discarding one per forward added.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable, Iterator

NETLINK_NETFILTER = 12


def open_socket(timeout: float) -> socket.socket:
    """A bound netfilter socket whose calls wait at most ``timeout`` seconds."""
    sock = socket.socket(
        socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_NETFILTER
    )
    sock.settimeout(timeout)
    sock.bind((0, 0))
    return sock


class PortIds:
    """The netlink port ids of this process's kept netfilter sockets that are open now,
    and who follows them. A port id is unique in the network namespace while its socket
    is open, so a notification that names one of these is ours; it is taken out (and
    the followers told) before its socket closes, so a port id that another process
    may get next is never in it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ids: set[int] = set()
        self._followers: list[Callable[[frozenset[int]], None]] = []

    def add(self, portid: int) -> None:
        with self._lock:
            self._ids.add(portid)
            self._tell()

    def remove(self, portid: int) -> None:
        with self._lock:
            self._ids.discard(portid)
            self._tell()

    def follow(self, fn: Callable[[frozenset[int]], None]) -> None:
        """Call ``fn`` with the port ids now, and again whenever they change (under
        this object's lock: calls come in order, and must be quick)."""
        with self._lock:
            self._followers.append(fn)
            fn(frozenset(self._ids))

    def unfollow(self, fn: Callable[[frozenset[int]], None]) -> None:
        with self._lock:
            self._followers.remove(fn)

    def _tell(self) -> None:
        ids = frozenset(self._ids)
        for fn in self._followers:
            fn(ids)


#: this process's open kept sockets (:class:`KeptSocket`)
OPEN = PortIds()


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
                sock = open_socket(self._timeout)
                OPEN.add(sock.getsockname()[0])
                self._sock = sock
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
            OPEN.remove(self._sock.getsockname()[0])  # before the port id is free
            self._sock.close()
            self._sock = None
