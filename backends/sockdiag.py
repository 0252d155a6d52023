"""Sockets listening (TCP) or bound (UDP) in this network namespace, through the kernel's
sock_diag netlink family (what ``ss -l`` asks), not ``/proc/net/tcp``: the /proc file
walks every bucket of the host's connection table, about 5 ms each on a machine with
24 GiB even when it lists two sockets, and a ``forward`` reads all four files.

Standard library only; one socket per call, with a time limit.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from typing import NamedTuple

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST = 0x1
NLM_F_DUMP = 0x300
NLMSG_ERROR = 2
NLMSG_DONE = 3
TCP_LISTEN = 10
#: an unconnected bound UDP socket is in TCP_CLOSE (what /proc/net/udp shows as 07)
UDP_BOUND = 7
#: nlmsghdr, inet_diag_req_v2 (family, protocol, ext, pad, states, sockid of 48 bytes)
_HDR = struct.Struct("=IHHII")
_REQ = struct.Struct("=BBBxI48x")
#: inet_diag_msg: family, state, timer, retrans, sockid (sport, dport, src 16, dst 16,
#: if, cookie 8), expires, rqueue, wqueue, uid, inode: 72 bytes, the inode at 68
_MSG_LEN = 72
TIMEOUT = 2.0


class Bound(NamedTuple):
    proto: str
    family: int
    address: str
    port: int
    inode: int


def _dump(sock: socket.socket, family: int, proto: int, state: int) -> list[Bound]:
    req = _REQ.pack(family, proto, 0, 1 << state)
    sock.send(
        _HDR.pack(_HDR.size + len(req), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, 1, 0) + req
    )
    name = "tcp" if proto == socket.IPPROTO_TCP else "udp"
    out: list[Bound] = []
    while True:
        data = sock.recv(65536)
        off = 0
        while off + _HDR.size <= len(data):
            length, kind, _flags, _seq, _pid = _HDR.unpack_from(data, off)
            if length < _HDR.size:
                return out
            body = off + _HDR.size
            if kind == NLMSG_DONE:
                return out
            if kind == NLMSG_ERROR:
                (err,) = struct.unpack_from("=i", data, body)
                if err:
                    raise OSError(-err, f"sock_diag dump of family {family}: {err}")
                return out
            if kind == SOCK_DIAG_BY_FAMILY and length - _HDR.size >= _MSG_LEN:
                fam, st = data[body], data[body + 1]
                (port,) = struct.unpack_from(">H", data, body + 4)
                raw = data[body + 8 : body + 8 + (4 if fam == socket.AF_INET else 16)]
                (inode,) = struct.unpack_from("=I", data, body + 68)
                if st == state:
                    addr = str(ipaddress.ip_address(raw))
                    out.append(Bound(name, 4 if fam == socket.AF_INET else 6, addr, port, inode))
            off += (length + 3) & ~3


_PROTOS = {"tcp": (socket.IPPROTO_TCP, TCP_LISTEN), "udp": (socket.IPPROTO_UDP, UDP_BOUND)}
_FAMILIES = {4: socket.AF_INET, 6: socket.AF_INET6}


def bound_sockets(timeout: float = TIMEOUT, only: tuple[str, int] | None = None) -> list[Bound]:
    """TCP sockets in LISTEN and UDP sockets bound and unconnected, IPv4 and IPv6, or
    ``only`` those of one protocol and IP version (``("tcp", 4)``: one dump of four, what
    a new forward's check needs); OSError (a timeout included) when the kernel does not
    answer within ``timeout``."""
    if only is None:
        which = [(p, f) for p in _PROTOS.values() for f in _FAMILIES.values()]
    else:
        which = [(_PROTOS[only[0]], _FAMILIES[only[1]])]
    out: list[Bound] = []
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_SOCK_DIAG) as sock:
        sock.settimeout(timeout)
        for (proto, state), family in which:
            out += _dump(sock, family, proto, state)
    return out
