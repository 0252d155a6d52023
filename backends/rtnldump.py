"""Blocking one-shot rtnetlink, for worker threads: work inside another network
namespace from a short-lived thread (:func:`in_netns`, :func:`socket_in_netns`), a dump
of every link parsed by ``rtnl.parse`` (:func:`dump_links`), and every interface's
counters (:func:`link_counters`). The event source and the sender of requests that
share the event loop are ``rtnl.py``."""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Callable
from typing import TypeVar

from . import netns
from .netlink import Link
from .rtnl import (
    _IFINFOMSG,
    _NLMSGHDR,
    _RTATTR,
    IFLA_IFNAME,
    NLM_F_DUMP,
    NLM_F_REQUEST,
    NLMSG_DONE,
    NLMSG_ERROR,
    RTM_GETLINK,
    RTM_NEWLINK,
    TIMEOUT,
    LinkEvent,
    parse,
)

T = TypeVar("T")


def in_netns(path: str, work: Callable[[], T]) -> T:
    """Run ``work`` inside the network namespace bound at ``path``, in a short-lived
    thread that enters it (setns changes only the calling thread) and ends: no thread of
    the daemon is ever left in another namespace, and nothing forks. What ``work``
    creates there (a socket) stays in that namespace; what it opens under /proc/sys/net
    is that namespace's."""

    def inside() -> T:
        netns.enter(path)
        return work()

    return netns.in_own_thread("netagent-setns", inside)


def dump_links(path: str | None = None, timeout: float = TIMEOUT) -> list[Link]:
    """Every link of the daemon's namespace (or of the one bound at ``path``), parsed by
    :func:`parse`: blocking, for a worker thread. About ten times faster than pyroute2's
    parser, which a host with thousands of veths (1,000 containers) notices: the orphan
    search and the event source's resync dump the host's links."""
    sock = (
        socket_in_netns(path)
        if path is not None
        else socket.socket(
            socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE
        )
    )
    with sock:
        sock.settimeout(timeout)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        body = _IFINFOMSG.pack(0, 0, 0, 0, 0)
        seq = 1
        sock.send(
            _NLMSGHDR.pack(
                _NLMSGHDR.size + len(body), RTM_GETLINK, NLM_F_REQUEST | NLM_F_DUMP, seq, 0
            )
            + body
        )
        links: list[Link] = []
        while True:
            data = sock.recv(1 << 20)
            off = 0
            while off + _NLMSGHDR.size <= len(data):
                length, mtype, _f, got, _pid = _NLMSGHDR.unpack_from(data, off)
                if length < _NLMSGHDR.size:
                    break
                if got == seq:
                    if mtype == NLMSG_DONE:
                        return links
                    if mtype == NLMSG_ERROR:
                        err = -struct.unpack_from("i", data, off + _NLMSGHDR.size)[0]
                        if err:
                            raise OSError(err, f"link dump: {os.strerror(err)}")
                    elif mtype == RTM_NEWLINK:
                        links.extend(
                            e.link
                            for e in parse(data[off : off + length])
                            if isinstance(e, LinkEvent)
                        )
                off += (length + 3) & ~3


def socket_in_netns(path: str) -> socket.socket:
    """A rtnetlink socket living in the network namespace bound at ``path``."""
    # SOCK_DGRAM (netlink treats it as SOCK_RAW): pyroute2 takes it as fileno= only as a
    # datagram socket
    return in_netns(
        path,
        lambda: socket.socket(
            socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE
        ),
    )


IFLA_STATS64 = 23
#: (rx packets, rx bytes, tx packets, tx bytes) of an interface
LinkCounters = tuple[int, int, int, int]


def link_counters(timeout: float = TIMEOUT) -> dict[str, LinkCounters]:
    """Every interface of the calling thread's network namespace by name, with its
    counters (``IFLA_STATS64``): one RTM_GETLINK dump on a socket of its own, reading
    two attributes of each message. Blocking (run it in a worker thread): a dump of
    1,200 interfaces is a few milliseconds of parsing."""
    out: dict[str, LinkCounters] = {}
    stats_hdr: bytes | None = None  # IFLA_STATS64's header, learnt from the first link
    family = socket.NETLINK_ROUTE
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, family) as sock:
        sock.settimeout(timeout)
        sock.bind((0, 0))
        body = _IFINFOMSG.pack(0, 0, 0, 0, 0)
        sock.sendall(
            _NLMSGHDR.pack(16 + len(body), RTM_GETLINK, NLM_F_REQUEST | NLM_F_DUMP, 1, 0) + body
        )
        while True:
            data = sock.recv(1 << 16)
            off = 0
            while off + 16 <= len(data):
                length, kind, _flags, _seq, _pid = _NLMSGHDR.unpack_from(data, off)
                if length < 16:
                    return out
                if kind == NLMSG_DONE:
                    return out
                if kind == NLMSG_ERROR:
                    code = -struct.unpack_from("i", data, off + 16)[0]
                    raise OSError(code, os.strerror(code))
                if kind == RTM_NEWLINK:
                    name: str | None = None
                    stats: LinkCounters | None = None
                    at, end = off + 16 + _IFINFOMSG.size, off + length
                    # fast path: the kernel puts IFLA_IFNAME first, and IFLA_STATS64
                    # always has the same size: found with bytes.find, not a walk of
                    # the ~40 attributes of each message (18 ms -> a few ms for 1,200)
                    alen, atype = _RTATTR.unpack_from(data, at)
                    if atype == IFLA_IFNAME and stats_hdr is not None:
                        pos = data.find(stats_hdr, at, end)
                        if pos > 0 and (pos - at) % 4 == 0:
                            name = data[at + 4 : at + alen].split(b"\0", 1)[0].decode()
                            rxp, txp, rxb, txb = struct.unpack_from("QQQQ", data, pos + 4)
                            out[name] = (rxp, rxb, txp, txb)
                            off += (length + 3) & ~3
                            continue
                    while at + 4 <= end:
                        alen, atype = _RTATTR.unpack_from(data, at)
                        if alen < 4:
                            break
                        if atype == IFLA_IFNAME:
                            name = data[at + 4 : at + alen].split(b"\0", 1)[0].decode()
                        elif atype == IFLA_STATS64 and alen >= 36:
                            rxp, txp, rxb, txb = struct.unpack_from("QQQQ", data, at + 4)
                            stats = (rxp, rxb, txp, txb)
                            stats_hdr = _RTATTR.pack(alen, IFLA_STATS64)
                        at += (alen + 3) & ~3
                    if name is not None and stats is not None:
                        out[name] = stats
                off += (length + 3) & ~3
