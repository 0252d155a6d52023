"""The request sockets netagent keeps inside other namespaces, one per namespace
identity (the nsfs inode: a namespace deleted and made again under the same name is
another one), and the ``ip netns`` program where the kernel refuses the daemon's own way.

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
import time
from typing import Any

import anyio

from netagent.agent.errors import BackendFailed

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
