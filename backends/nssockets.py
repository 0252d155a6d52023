"""Named network namespaces for the netlink backend (``pyroute.py``): their files under
``/run/netns``, making and removing them (``netns.py``, or the ``ip netns`` program where
the kernel refuses the daemon's own way), and the request sockets netagent keeps inside
them, one per namespace identity (the nsfs inode: a namespace deleted and made again
under the same name is another one).

A socket let go of is not closed at once: a request of another task may be waiting on it
(a socket closed under a pending request leaves it unanswered until its time limit,
holding up whoever waits for that request). It is closed on a timer once no request can
still be using it; kept open longer it would hold its namespace alive (a deleted
namespace, its veths and what they reach would live on until something else came by)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import anyio

from netagent.agent.errors import BackendFailed, HostTimeout

from . import netns, rtnldump

T = TypeVar("T")

#: seconds ``ip netns add/del`` may take
TOOL_TIMEOUT = 15.0


class NsSockets:
    """Sockets per namespace name, each with the identity it was opened in."""

    def __init__(self, linger: float) -> None:
        #: seconds a socket let go of stays open (longer than any request may take)
        self.linger = linger
        #: held while a socket is made, so two tasks never make two for one namespace
        self.lock = anyio.Lock()
        self._kept: dict[str, tuple[tuple[int, int], Any]] = {}
        self._retired: list[tuple[float, Any]] = []

    def get(self, ns: str, ident: tuple[int, int] | None) -> Any | None:
        """The socket kept for ``ns`` if it was opened in the namespace ``ident`` names."""
        cached = self._kept.get(ns)
        return cached[1] if cached is not None and cached[0] == ident else None

    def keep(self, ns: str, ident: tuple[int, int] | None, sock: Any) -> None:
        """Keep ``sock`` for ``ns``; with no identity (gone already) it is let go of."""
        self.forget(ns)
        if ident is None:
            self.retire(sock)
        else:
            self._kept[ns] = (ident, sock)

    def forget(self, ns: str) -> None:
        """Let go of the socket kept for ``ns``."""
        cached = self._kept.pop(ns, None)
        if cached is not None:
            self.retire(cached[1])
        self._close_due()

    def retire(self, sock: Any) -> None:
        """Close ``sock`` once no request can still be waiting on it."""
        self._retired.append((time.monotonic() + self.linger, sock))
        with contextlib.suppress(RuntimeError):  # no event loop: the next forget closes it
            asyncio.get_running_loop().call_later(self.linger + 0.05, self._close_due)

    def close(self) -> None:
        """Close every socket, kept or let go of (the daemon stops)."""
        for name in list(self._kept):
            self.forget(name)
        for _when, sock in self._retired:
            with contextlib.suppress(Exception):
                sock.close()
        self._retired.clear()

    def _close_due(self) -> None:
        now = time.monotonic()
        while self._retired and self._retired[0][0] <= now:
            _when, sock = self._retired.pop(0)
            with contextlib.suppress(Exception):
                sock.close()


async def ip_tool(argv: list[str]) -> None:
    """Run ``ip`` (``ip netns add|del NAME``) with a time limit; "File exists" is
    FileExistsError, any other failure BackendFailed with what the program said."""
    env = {"LANG": "C", "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")}
    try:
        with anyio.fail_after(TOOL_TIMEOUT):
            result = await anyio.run_process(argv, check=False, env=env)
    except TimeoutError:
        raise BackendFailed(f"{' '.join(argv)} did not finish in {TOOL_TIMEOUT:g} s") from None
    if result.returncode != 0:
        msg = result.stderr.decode(errors="replace").strip() or f"exit {result.returncode}"
        if "File exists" in msg:
            raise FileExistsError(errno.EEXIST, msg)
        raise BackendFailed(f"{' '.join(argv)}: {msg}")


#: errors of making a namespace in the daemon that the ``ip`` program may not meet
_FALL_BACK = frozenset({errno.EPERM, errno.EACCES, errno.ENOSYS, errno.EOPNOTSUPP})


class Namespaces:
    """The named namespaces under ``netns_dir`` and a request socket kept in each
    (``make_socket`` turns a raw rtnetlink socket opened inside into the backend's)."""

    def __init__(
        self, netns_dir: Path, timeout: float, make_socket: Callable[[socket.socket], Any]
    ) -> None:
        self.netns_dir = netns_dir
        self.timeout = timeout
        self._make_socket = make_socket
        self._sockets = NsSockets(linger=timeout + 1)
        #: identities of the namespaces made here with ``netns.ANNOUNCE_DEFAULTS``
        self._announcing: set[tuple[int, int]] = set()

    async def _timed(self, what: str, aw: Awaitable[T]) -> T:
        try:
            with anyio.fail_after(self.timeout):
                return await aw
        except TimeoutError:
            raise HostTimeout(
                f"the kernel did not answer {what} within {self.timeout:g} s"
            ) from None

    def path(self, ns: str) -> Path:
        return Path(ns) if ns.startswith("/") else self.netns_dir / ns

    def exists(self, ns: str) -> bool:
        return self.path(ns).exists()

    def identity(self, ns: str) -> tuple[int, int] | None:
        """A stat of the path (no ``Path`` object: the namespace watcher asks this of every
        namespace in use four times a second)."""
        try:
            st = os.stat(ns if ns.startswith("/") else f"{self.netns_dir}/{ns}")
        except (FileNotFoundError, NotADirectoryError, PermissionError):
            return None
        return st.st_dev, st.st_ino

    def names(self) -> list[str]:
        try:
            return sorted(p.name for p in self.netns_dir.iterdir())
        except FileNotFoundError:
            return []

    def announcing(self, ns: str) -> bool:
        ident = self.identity(ns)
        return ident is not None and ident in self._announcing

    async def add(self, name: str) -> None:
        """``ip netns add``, in the daemon (``netns.py``: a child process is most of a
        namespace's cost); the namespace's socket comes with it. The ``ip`` program
        where the kernel refuses doing it so."""
        path = str(self.path(name))
        try:
            raw = await self._timed(
                f"creating namespace {name}", anyio.to_thread.run_sync(netns.add, path)
            )
        except FileExistsError:
            raise
        except OSError as exc:
            if exc.errno not in _FALL_BACK:
                raise BackendFailed(f"creating namespace {name}: {exc.strerror or exc}") from None
            await ip_tool(["ip", "netns", "add", name])
            return
        async with self._sockets.lock:
            sock = self._make_socket(raw)
            await self._timed("opening a socket", sock.setup_endpoint())
            ident = self.identity(name)
            self._sockets.keep(name, ident, sock)
            if ident is not None:
                self._announcing.add(ident)

    async def delete(self, name: str) -> None:
        """``ip netns del``, in the daemon (``netns.py``)."""
        try:
            await self._timed(
                f"removing namespace {name}",
                anyio.to_thread.run_sync(netns.delete, str(self.path(name))),
            )
        except OSError as exc:
            if exc.errno not in _FALL_BACK:
                raise BackendFailed(f"removing namespace {name}: {exc.strerror or exc}") from None
            await ip_tool(["ip", "netns", "del", name])

    async def socket(self, ns: str) -> Any:
        """A request socket inside ``ns``, kept with the namespace's identity."""
        sock = self._sockets.get(ns, self.identity(ns))
        if sock is not None:
            return sock
        async with self._sockets.lock:
            ident = self.identity(ns)
            sock = self._sockets.get(ns, ident)
            if sock is not None:
                return sock
            self._sockets.forget(ns)
            if ident is None:
                raise FileNotFoundError(f"namespace {ns} does not exist")
            raw = await self._timed(
                f"entering namespace {ns}",
                anyio.to_thread.run_sync(rtnldump.socket_in_netns, str(self.path(ns))),
            )
            sock = self._make_socket(raw)
            await self._timed("opening a socket", sock.setup_endpoint())
            self._sockets.keep(ns, ident, sock)
        return sock

    def forget(self, ns: str) -> None:
        """Let go of the socket kept in ``ns`` (closed once no request can still be
        using it)."""
        self._sockets.forget(ns)

    def open_checked(self, ns: str, ident: tuple[int, int]) -> int:
        """The namespace's file, opened and checked to be the one ``ident`` names."""
        fd = os.open(self.path(ns), os.O_RDONLY | os.O_CLOEXEC)
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != ident:
            os.close(fd)
            raise FileNotFoundError(f"{ns} names another namespace now")
        return fd

    def close(self) -> None:
        self._sockets.close()
