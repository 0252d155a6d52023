"""A minimal raw rtnetlink client for the two hot paths pyroute2 is too slow for.

pyroute2 parses every attribute of every message in Python (~0.5-1 ms per link message
here), which is fine for requests but not for an event listener that must react within a
millisecond and keep up with a burst of 1,000 new interfaces (``docs/kernel-facts.md``: a
minimal pyroute2 listener p50 0.7 ms, p99 2.3 ms, burst 1.32x; raw netlink 0.04 ms /
0.45 ms / 1.18x). This module reads only the few fields netagent uses:

* :class:`EventSocket`: link and address events, parsed straight into
  :class:`~netagent.backends.netlink.Link` records (name, kind, master, alias, group,
  veth peer, MAC); a receive buffer forced to 32 MiB; ENOBUFS surfaces as ``OSError``.
* :class:`Requests`: "enslave to this bridge and set up" in one RTM_NEWLINK, with the
  kernel's ACK awaited without blocking the loop.

The blocking one-shot dumps for worker threads (every link, the counters) and work
inside another namespace are in ``rtnldump.py``.
"""

from __future__ import annotations

import asyncio
import errno
import os
import queue
import socket
import struct
from dataclasses import dataclass
from typing import TypeVar

from netagent.agent.turns import Turns

from .netlink import Link

T = TypeVar("T")

NLMSG_ERROR = 2
RTM_NEWLINK, RTM_DELLINK, RTM_GETLINK, RTM_NEWADDR, RTM_DELADDR = 16, 17, 18, 20, 21
RTM_NEWROUTE, RTM_DELROUTE = 24, 25
NLM_F_REQUEST, NLM_F_ACK = 0x1, 0x4
NLM_F_DUMP = 0x300
NLMSG_DONE = 3
IFLA_IFNAME, IFLA_LINK, IFLA_MASTER, IFLA_LINKINFO, IFLA_IFALIAS = 3, 5, 10, 18, 20
IFLA_ADDRESS, IFLA_GROUP, IFLA_LINK_NETNSID = 1, 27, 37
IFLA_INFO_KIND = 1
IFA_ADDRESS, IFA_LOCAL = 1, 2
#: an address of this scope or wider is one the host uses (not a link-local one)
RT_SCOPE_LINK = 253
IFF_UP = 0x1
RTMGRP_LINK, RTMGRP_IPV4_IFADDR, RTMGRP_IPV6_IFADDR = 0x1, 0x10, 0x100
RTMGRP_IPV4_ROUTE, RTMGRP_IPV6_ROUTE = 0x40, 0x400
SO_RCVBUFFORCE = 33

_NLMSGHDR = struct.Struct("IHHII")
_IFINFOMSG = struct.Struct("BxHiII")
_IFADDRMSG = struct.Struct("BBBBI")
_RTATTR = struct.Struct("HH")


@dataclass(frozen=True, slots=True)
class LinkEvent:
    deleted: bool
    link: Link


@dataclass(frozen=True)
class AddrEvent:
    deleted: bool
    index: int
    #: the address itself (packed), and its scope (RT_SCOPE_LINK = 253: link-local)
    address: bytes = b""
    scope: int = 0


@dataclass(frozen=True)
class RouteEvent:
    deleted: bool


Event = LinkEvent | AddrEvent | RouteEvent


def _attrs(
    data: bytes, start: int, end: int, wanted: frozenset[int] | None = None
) -> dict[int, bytes]:
    """The attributes from ``start`` to ``end`` by type; with ``wanted``, only those
    (a link message carries ~40, of which the cache reads 8: the walk is the cost, and
    slicing the rest is a third of it)."""
    out: dict[int, bytes] = {}
    unpack = _RTATTR.unpack_from
    while start + 4 <= end:
        length, atype = unpack(data, start)
        if length < 4:
            break
        atype &= 0x3FFF
        if wanted is None or atype in wanted:
            out[atype] = data[start + 4 : start + length]
        start += (length + 3) & ~3
    return out


#: what :func:`parse` reads of a link message
_LINK_ATTRS = frozenset(
    (
        IFLA_ADDRESS,
        IFLA_IFNAME,
        IFLA_LINK,
        IFLA_MASTER,
        IFLA_LINKINFO,
        IFLA_IFALIAS,
        IFLA_GROUP,
        IFLA_LINK_NETNSID,
    )
)


def _cstr(raw: bytes | None) -> str | None:
    return None if raw is None else raw.split(b"\0", 1)[0].decode(errors="replace")


def parse(data: bytes) -> list[Event]:
    """Link and address events in one datagram (other messages are skipped)."""
    events: list[Event] = []
    off = 0
    while off + _NLMSGHDR.size <= len(data):
        length, mtype, _flags, _seq, _pid = _NLMSGHDR.unpack_from(data, off)
        if length < _NLMSGHDR.size or off + length > len(data):
            break
        body = off + _NLMSGHDR.size
        if mtype in (RTM_NEWLINK, RTM_DELLINK) and length >= _NLMSGHDR.size + _IFINFOMSG.size:
            family, _type, index, flags, _change = _IFINFOMSG.unpack_from(data, body)
            if family != socket.AF_UNSPEC:
                # AF_BRIDGE copies announce bridge-port changes: a port leaving a bridge
                # comes as RTM_DELLINK of family AF_BRIDGE, not the interface going away
                off += (length + 3) & ~3
                continue
            attrs = _attrs(data, body + _IFINFOMSG.size, off + length, _LINK_ATTRS)
            master = attrs.get(IFLA_MASTER)
            link = attrs.get(IFLA_LINK)
            peer = far_peer = None
            if link is not None and IFLA_LINK_NETNSID not in attrs:
                peer = struct.unpack("I", link[:4])[0] or None
            elif link is not None:
                far_peer = struct.unpack("I", link[:4])[0] or None
            kind = None
            info = attrs.get(IFLA_LINKINFO)
            if info is not None:
                kind = _cstr(_attrs(info, 0, len(info)).get(IFLA_INFO_KIND))
            name = _cstr(attrs.get(IFLA_IFNAME))
            if name is None:  # never seen; an interface is always announced by name
                off += (length + 3) & ~3
                continue
            group = attrs.get(IFLA_GROUP)
            netnsid = attrs.get(IFLA_LINK_NETNSID)
            mac = attrs.get(IFLA_ADDRESS)
            link_rec = Link(
                index=index,
                name=name,
                kind=kind,
                up=bool(flags & IFF_UP),
                master=(struct.unpack("I", master[:4])[0] or None) if master else None,
                alias=_cstr(attrs.get(IFLA_IFALIAS)),
                group=struct.unpack("I", group[:4])[0] if group else 0,
                peer=peer if kind == "veth" else None,
                link_netnsid=struct.unpack("i", netnsid[:4])[0] if netnsid else None,
                mac=mac.hex(":") if mac and len(mac) == 6 else None,
                far_peer=far_peer if kind == "veth" else None,
            )
            events.append(LinkEvent(mtype == RTM_DELLINK, link_rec))
        elif mtype in (RTM_NEWADDR, RTM_DELADDR) and length >= _NLMSGHDR.size + _IFADDRMSG.size:
            _fam, _plen, _flags, scope, index = _IFADDRMSG.unpack_from(data, body)
            attrs = _attrs(data, body + _IFADDRMSG.size, off + length)
            address = attrs.get(IFA_LOCAL) or attrs.get(IFA_ADDRESS) or b""
            events.append(AddrEvent(mtype == RTM_DELADDR, index, address, scope))
        elif mtype in (RTM_NEWROUTE, RTM_DELROUTE):
            events.append(RouteEvent(deleted=mtype == RTM_DELROUTE))
        off += (length + 3) & ~3
    return events


class EventSocket:
    """Subscribed to link and address groups; read with :meth:`receive`."""

    def __init__(
        self,
        groups: int = RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR,
        rcvbuf: int = 32 << 20,
        sock: socket.socket | None = None,
    ) -> None:
        self.sock = sock or socket.socket(
            socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE
        )
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf)
        except OSError:  # not root: as much as net.core.rmem_max allows
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.bind((0, groups))
        self.sock.setblocking(False)
        self._readable = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self.sock.fileno(), self._readable.set)
        #: set by :meth:`fail`: what :meth:`receive` raises from then on
        self._error: OSError | None = None

    def pending(self) -> tuple[list[bytes], OSError | None]:
        """Every datagram queued right now, without waiting, and the error that ended
        the reading (ENOBUFS: events were lost; None: the queue is empty)."""
        datagrams = []
        while True:
            try:
                datagrams.append(self.sock.recv(1 << 20))
            except BlockingIOError:
                return datagrams, None
            except OSError as exc:
                return datagrams, exc

    def fail(self, exc: OSError) -> None:
        """Make :meth:`receive` raise ``exc`` (the kernel reports an overflow once: who
        read it hands it on to the reader that must resync)."""
        self._error = exc
        self._readable.set()

    async def receive(self) -> list[bytes]:
        """Every datagram waiting (at least one). ENOBUFS raises ``OSError``: events
        were lost and the caller must resync."""
        while True:
            if self._error is not None:
                raise self._error
            datagrams, exc = self.pending()
            if exc is not None:
                if exc.errno == errno.ENOBUFS and datagrams:
                    self._error = exc  # hand over what arrived; the next call raises
                    return datagrams
                raise exc
            if datagrams:
                return datagrams
            self._readable.clear()
            await self._readable.wait()

    def close(self) -> None:
        self._loop.remove_reader(self.sock.fileno())
        self.sock.close()


#: seconds a raw request may wait for the kernel's answer
TIMEOUT = 5.0
#: raw requests in flight at once
WINDOW = 128
#: at most this many requests in one send (an enslave is 40 bytes, a lookup 32: far
#: below the socket's send buffer, whose size a send may not pass)
SEND_MAX = 256
#: at most this many requests, while nothing else is in flight, are sent on the event
#: loop itself (a lone attach; a peer's three point lookups or writes): the hop to the
#: sender thread and back costs ~0.1 ms, and up to the interpreter's switch interval
#: (5 ms) when the loop is busy as the thread wakes
INLINE_MAX = 3


def _expire(fut: asyncio.Future[int | bytes]) -> None:
    if not fut.done():
        fut.set_exception(TimeoutError(f"no answer from the kernel in {TIMEOUT:g} s"))


class Requests:
    """Fire-and-await requests on a raw socket: "enslave and up" and "get one link".

    A netlink request to the kernel is carried out inside ``send()``, under the kernel's
    rtnl lock, which ``ip`` and every other tool contend for: during a burst of new
    interfaces one send can take milliseconds. Sends therefore go out from a thread of
    their own, and only the answers are read on the event loop. At most :data:`WINDOW`
    requests are in flight, and the receive buffer is large: when answers do not fit the
    kernel drops them (ENOBUFS) and their requests would wait for their time limit (a
    burst of 500 attaches once waited 5 s so)."""

    def __init__(self) -> None:
        import threading

        self.sock = socket.socket(
            socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE
        )
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 8 << 20)
        except OSError:  # not root: as much as net.core.rmem_max allows
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        self.sock.bind((0, 0))
        self.sock.setblocking(False)
        self._seq = 0
        #: seq -> the future of the request: an errno (ACK/error) or the reply's bytes
        self._waiting: dict[int, asyncio.Future[int | bytes]] = {}
        self._window = asyncio.Semaphore(WINDOW)
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self.sock.fileno(), self._on_readable)
        self._outbox: queue.SimpleQueue[list[tuple[int, bytes]] | None] = queue.SimpleQueue()
        self._sender = threading.Thread(target=self._send_loop, name="netagent-rtnl", daemon=True)
        self._sender.start()

    def _send_loop(self) -> None:
        while True:
            batch = self._outbox.get()
            if batch is None:
                return
            # every request queued goes out in one send (the kernel carries them out one
            # after the other, each under its lock, each with its own answer): the
            # thread needs the interpreter's lock once per send, not once per request,
            # and the loop holds that lock up to the switch interval at a time
            while True:
                try:
                    more = self._outbox.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self._outbox.put(None)
                    break
                batch.extend(more)
            for start in range(0, len(batch), SEND_MAX):
                part = batch[start : start + SEND_MAX]
                try:
                    self.sock.sendall(b"".join(msg for _seq, msg in part))
                except OSError as exc:
                    for seq, _msg in part:
                        self._loop.call_soon_threadsafe(self._failed, seq, exc)

    def _failed(self, seq: int, exc: BaseException) -> None:
        fut = self._waiting.pop(seq, None)
        if fut is not None and not fut.done():
            fut.set_exception(exc)

    def _on_readable(self) -> None:
        while True:
            try:
                data = self.sock.recv(1 << 16)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    raise
                # answers were dropped: nobody can tell which requests they belonged to;
                # fail them all now (the callers' decisions are level-based and retried)
                for seq in list(self._waiting):
                    self._failed(seq, OSError(errno.ENOBUFS, "netlink answers were lost"))
                continue
            off = 0
            while off + _NLMSGHDR.size <= len(data):
                length, mtype, _f, seq, _pid = _NLMSGHDR.unpack_from(data, off)
                if length < _NLMSGHDR.size:
                    break
                fut = self._waiting.pop(seq, None)
                if fut is not None and not fut.done():
                    if mtype == NLMSG_ERROR:
                        fut.set_result(-struct.unpack_from("i", data, off + _NLMSGHDR.size)[0])
                    else:
                        fut.set_result(data[off : off + length])
                off += (length + 3) & ~3

    async def _many(self, requests: list[tuple[int, int, bytes]]) -> list[int | bytes | OSError]:
        """Send requests pipelined, at most :data:`WINDOW` in flight, and wait for every
        answer: futures, no task per request (a burst of 1,000 must not cost 1,000
        tasks). Each result is the errno of the ACK (0: done), the reply's bytes, or the
        OSError (lost answers, the time limit)."""
        results: list[int | bytes | OSError] = []
        # a few requests while nothing else is in flight: sent right here (the hop to
        # the sender thread costs ~0.1 ms, a lone attach's whole budget); a batch goes
        # to the thread, where the kernel's work under its lock cannot hold the loop
        inline = len(requests) <= INLINE_MAX and not self._waiting
        for start in range(0, len(requests), WINDOW):
            futs: list[asyncio.Future[int | bytes]] = []
            timers = []
            queued: list[tuple[int, bytes]] = []
            for mtype, flags, body in requests[start : start + WINDOW]:
                self._seq = (self._seq + 1) & 0xFFFFFFFF
                seq = self._seq
                msg = _NLMSGHDR.pack(_NLMSGHDR.size + len(body), mtype, flags, seq, 0) + body
                fut: asyncio.Future[int | bytes] = self._loop.create_future()
                self._waiting[seq] = fut
                futs.append(fut)
                # a plain timer, not asyncio.wait_for (a task of its own per request)
                timers.append(self._loop.call_later(TIMEOUT, _expire, fut))
                if inline:
                    try:
                        self.sock.send(msg)
                        continue
                    except BlockingIOError:
                        inline = False  # the rest after it, in order, from the thread
                queued.append((seq, msg))
            if queued:
                self._outbox.put(queued)
            try:
                await asyncio.wait(futs)
            finally:
                for timer in timers:
                    timer.cancel()
            for fut in futs:
                exc = fut.exception()
                if exc is None:
                    results.append(fut.result())
                else:
                    results.append(exc if isinstance(exc, OSError) else OSError(str(exc)))
        return results

    async def many(self, requests: list[tuple[int, int, bytes]]) -> list[int | bytes | OSError]:
        """Requests of other rooms (``overlay.py``), pipelined the same way: each is
        (message type, flags, body) and answers with an errno, the reply or the OSError."""
        return await self._many(requests)

    async def set_masters_up(self, pairs: list[tuple[int, int]]) -> list[OSError | None]:
        """Many "enslave and up" at once; one result per pair, None when it took."""
        requests = [
            (
                RTM_NEWLINK,
                NLM_F_REQUEST | NLM_F_ACK,
                _IFINFOMSG.pack(0, 0, index, IFF_UP, IFF_UP)
                + _RTATTR.pack(8, IFLA_MASTER)
                + struct.pack("I", master),
            )
            for index, master in pairs
        ]
        out: list[OSError | None] = []
        for r in await self._many(requests):
            if isinstance(r, OSError):
                out.append(r)
            elif isinstance(r, int) and r:
                out.append(OSError(r, os.strerror(r)))
            else:
                out.append(None)
        return out

    async def get_links(self, indexes: list[int]) -> list[Link | None]:
        """Links as the kernel has them now (None: gone), pipelined."""
        requests = [(RTM_GETLINK, NLM_F_REQUEST, _IFINFOMSG.pack(0, 0, i, 0, 0)) for i in indexes]
        out: list[Link | None] = []
        turns = Turns()
        for r in await self._many(requests):
            if turns.due():
                await asyncio.sleep(0)  # parsing 128 full link messages takes milliseconds
            if isinstance(r, OSError):
                raise r
            if isinstance(r, int):
                if r not in (0, errno.ENODEV):
                    raise OSError(r, os.strerror(r))
                out.append(None)
                continue
            found = [e.link for e in parse(r) if isinstance(e, LinkEvent)]
            out.append(found[0] if found else None)
        return out

    def close(self) -> None:
        self._outbox.put(None)
        self._sender.join(timeout=TIMEOUT)
        self._loop.remove_reader(self.sock.fileno())
        self.sock.close()
