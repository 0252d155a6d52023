"""pyroute2 sockets whose link creations, changes and deletions leave from a thread.

The kernel carries out an rtnetlink request inside ``send()``, under its rtnl lock: a
veth made with its peer in a namespace and a master costs 3-6 ms there, a deletion more
(and any request waits as long as another process holds the lock: ``ip``, a container
runtime). pyroute2 sends from the event loop, so every such send stopped the loop, up to
49 ms a callback while 600 plugs were made. :class:`IPRoute` hands the bytes of those
requests (``RTM_NEWLINK``, ``RTM_DELLINK``, ``RTM_SETLINK``) to one sender thread and
returns; pyroute2 reads the kernel's answer on the loop as before. Lookups, dumps,
addresses and routes (cheap for the kernel) are still sent at once: a hop to the thread
and back costs ~0.1 ms.

One thread for every socket keeps each socket's requests in the order they were made. A
send the kernel refuses (an ``OSError`` from ``send()`` itself, rare: answers carry the
kernel's errors) is answered on the loop with an error message for the request's
sequence number, as the kernel would have answered, so the caller fails at once, not at
its time limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import struct
from collections.abc import Callable
from typing import Any

from pyroute2 import AsyncIPRoute

from netagent.agent.serial import SerialThread

RTM_NEWLINK, RTM_DELLINK, RTM_SETLINK = 16, 17, 19
#: the requests whose kernel work is long enough to keep off the loop
SLOW = frozenset({RTM_NEWLINK, RTM_DELLINK, RTM_SETLINK})
NLMSG_ERROR = 2
_HDR = struct.Struct("IHHII")


def error_answer(request: bytes, code: int) -> bytes:
    """The NLMSG_ERROR answer the kernel gives ``request`` when it refuses it with
    ``code`` (an errno): the request echoed whole, as without NETLINK_CAP_ACK."""
    length, _type, _flags, seq, pid = _HDR.unpack_from(request)
    echo = request[:length]
    head = _HDR.pack(_HDR.size + 4 + len(echo), NLMSG_ERROR, 0, seq, pid)
    return head + struct.pack("i", -code) + echo


class SendThread(SerialThread):
    """Sends (and what must follow them: :meth:`then`, :meth:`call`) one after the
    other, in the order queued."""

    def __init__(self) -> None:
        super().__init__("netagent-nlsend")
        self._loop = asyncio.get_running_loop()

    def send(self, sock: Any, raw: Any, data: bytes) -> None:
        """Send ``data`` on ``raw``, the socket of the pyroute2 socket ``sock`` (taken on
        the loop: pyroute2 keeps a socket per thread); a refusal is answered to ``sock``."""
        self.submit(self._send, sock, raw, data)

    def then(self, fn: Callable[..., Any], *args: Any) -> None:
        """Call ``fn(*args)`` in the thread once every send queued so far has gone (a
        namespace's file descriptor that a queued request names is closed after it)."""
        self.submit(fn, *args)

    def _send(self, sock: Any, raw: Any, data: bytes) -> None:
        try:
            raw.send(data)
        except OSError as exc:
            answer = error_answer(data, exc.errno or errno.EIO)
            # a closed loop: nobody waits any more
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(_answer, sock, answer)


def _answer(sock: Any, answer: bytes) -> None:
    with contextlib.suppress(AttributeError, KeyError):  # the socket was closed meanwhile
        sock.enqueue(answer, None)


class IPRoute(AsyncIPRoute):  # type: ignore[misc]
    """``AsyncIPRoute`` sending its slow requests through :class:`SendThread`."""

    def __init__(self, sender: SendThread, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._netagent_sender = sender

    def send(self, data: bytes, flags: int = 0) -> int:
        if len(data) >= _HDR.size and _HDR.unpack_from(data)[1] in SLOW and not flags:
            self._netagent_sender.send(self, self.socket, data)
            return len(data)
        sent: int = super().send(data, flags)
        return sent
