"""Clearing tracked connections over netlink, in the daemon itself.

When a forward is removed or retargeted, its established flows would keep going to the
old destination: their conntrack entries are deleted. Starting the ``conntrack`` tool for
held the daemon's event loop ~6-8 ms per run (starting a process from a 150 MB process),
so it is done here with raw ctnetlink: one dump that the kernel filters to the entries
that were destination-NATed (status filter, Linux 5.19), matched on each forward's port
(original destination port, reply source address and port), then one delete per match
with the original tuple the kernel returned. The answer says how many were cleared.
"""

from __future__ import annotations

import errno
import socket
import struct

from .netfilter import KeptSocket

NFNL_SUBSYS_CTNETLINK = 1
IPCTNL_MSG_CT_GET, IPCTNL_MSG_CT_DELETE = 1, 2
NLM_F_REQUEST, NLM_F_ACK, NLM_F_DUMP = 0x1, 0x4, 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLA_F_NESTED = 0x8000
CTA_TUPLE_ORIG, CTA_TUPLE_REPLY, CTA_STATUS, CTA_STATUS_MASK = 1, 2, 3, 26
IPS_DST_NAT = 1 << 5
CTA_TUPLE_IP, CTA_TUPLE_PROTO = 1, 2
CTA_IP_V4_SRC, CTA_IP_V6_SRC = 1, 3
CTA_PROTO_NUM, CTA_PROTO_SRC_PORT, CTA_PROTO_DST_PORT = 1, 2, 3
PROTO = {"tcp": socket.IPPROTO_TCP, "udp": socket.IPPROTO_UDP}
#: seconds a dump or a delete may take
TIMEOUT = 5.0

_HDR = struct.Struct("=IHHII")
_NFGEN = struct.Struct("=BBH")


def _attr(kind: int, payload: bytes, nested: bool = False) -> bytes:
    length = 4 + len(payload)
    pad = b"\0" * ((4 - length % 4) % 4)
    return struct.pack("=HH", length, kind | (NLA_F_NESTED if nested else 0)) + payload + pad


def _attrs(data: bytes, start: int, end: int) -> dict[int, tuple[int, int]]:
    """Attribute type -> (offset of the whole attribute, its length)."""
    out: dict[int, tuple[int, int]] = {}
    while start + 4 <= end:
        length, kind = struct.unpack_from("=HH", data, start)
        if length < 4:
            break
        out[kind & 0x3FFF] = (start, length)
        start += (length + 3) & ~3
    return out


def dnat_request(family: int, seq: int) -> bytes:
    """A dump of the entries that were destination-NATed (status filter, Linux 5.19):
    the flows of forwards, and only a few others."""
    status = _attr(CTA_STATUS, struct.pack("!I", IPS_DST_NAT))
    mask = _attr(CTA_STATUS_MASK, struct.pack("!I", IPS_DST_NAT))
    body = _NFGEN.pack(family, 0, 0) + status + mask
    kind = NFNL_SUBSYS_CTNETLINK << 8 | IPCTNL_MSG_CT_GET
    return _HDR.pack(_HDR.size + len(body), kind, NLM_F_REQUEST | NLM_F_DUMP, seq, 0) + body


Flow = tuple[int, int, bytes, int]  # (protocol, original destination port, reply source, its port)


def flow_of(tuple_orig: bytes, tuple_reply: bytes) -> Flow | None:
    """What a forward's clearing matches on, from an entry's two tuples (attribute
    bytes as the kernel sent them)."""

    def inner(blob: bytes) -> dict[int, tuple[int, int]]:
        return _attrs(blob, 4, len(blob))

    def payload(blob: bytes, where: tuple[int, int]) -> bytes:
        return blob[where[0] + 4 : where[0] + where[1]]

    o, r = inner(tuple_orig), inner(tuple_reply)
    if CTA_TUPLE_PROTO not in o or CTA_TUPLE_PROTO not in r or CTA_TUPLE_IP not in r:
        return None
    oproto = payload(tuple_orig, o[CTA_TUPLE_PROTO])
    rproto = payload(tuple_reply, r[CTA_TUPLE_PROTO])
    rip = payload(tuple_reply, r[CTA_TUPLE_IP])
    op, rp, ri = (
        _attrs(oproto, 0, len(oproto)),
        _attrs(rproto, 0, len(rproto)),
        _attrs(rip, 0, len(rip)),
    )
    src = ri.get(CTA_IP_V4_SRC) or ri.get(CTA_IP_V6_SRC)
    if CTA_PROTO_NUM not in op or CTA_PROTO_DST_PORT not in op or src is None:
        return None
    if CTA_PROTO_SRC_PORT not in rp:
        return None
    num = oproto[op[CTA_PROTO_NUM][0] + 4]
    dport = struct.unpack_from("!H", oproto, op[CTA_PROTO_DST_PORT][0] + 4)[0]
    sport = struct.unpack_from("!H", rproto, rp[CTA_PROTO_SRC_PORT][0] + 4)[0]
    return num, dport, rip[src[0] + 4 : src[0] + src[1]], sport


def dnat_entries(data: bytes) -> tuple[list[tuple[bytes, Flow]], bool, int]:
    """From one datagram of a DNAT dump: (CTA_TUPLE_ORIG bytes, its flow) per entry,
    whether the dump is done, an errno."""
    found: list[tuple[bytes, Flow]] = []
    off = 0
    while off + _HDR.size <= len(data):
        length, kind, _flags, _seq, _pid = _HDR.unpack_from(data, off)
        if length < _HDR.size:
            break
        if kind == NLMSG_DONE:
            return found, True, 0
        if kind == NLMSG_ERROR:
            return found, True, -struct.unpack_from("=i", data, off + _HDR.size)[0]
        if kind & 0xFF00 == NFNL_SUBSYS_CTNETLINK << 8:
            attrs = _attrs(data, off + _HDR.size + _NFGEN.size, off + length)
            o, r = attrs.get(CTA_TUPLE_ORIG), attrs.get(CTA_TUPLE_REPLY)
            if o is not None and r is not None:
                orig, reply = data[o[0] : o[0] + o[1]], data[r[0] : r[0] + r[1]]
                flow = flow_of(orig, reply)
                if flow is not None:
                    found.append((orig, flow))
        off += (length + 3) & ~3
    return found, False, 0


def entries(data: bytes) -> tuple[list[bytes], bool, int]:
    """From one datagram of a dump: the CTA_TUPLE_ORIG attribute (bytes) of each entry,
    whether the dump is done, and an errno (0: none)."""
    found: list[bytes] = []
    off = 0
    while off + _HDR.size <= len(data):
        length, kind, _flags, _seq, _pid = _HDR.unpack_from(data, off)
        if length < _HDR.size:
            break
        if kind == NLMSG_DONE:
            return found, True, 0
        if kind == NLMSG_ERROR:
            code = -struct.unpack_from("=i", data, off + _HDR.size)[0]
            return found, True, code
        if kind & 0xFF00 == NFNL_SUBSYS_CTNETLINK << 8:
            attrs = _attrs(data, off + _HDR.size + _NFGEN.size, off + length)
            where = attrs.get(CTA_TUPLE_ORIG)
            if where is not None:
                found.append(data[where[0] : where[0] + where[1]])
        off += (length + 3) & ~3
    return found, False, 0


def delete_request(family: int, tuple_orig: bytes, seq: int) -> bytes:
    body = _NFGEN.pack(family, 0, 0) + tuple_orig
    pad = b"\0" * ((4 - len(body) % 4) % 4)
    kind = NFNL_SUBSYS_CTNETLINK << 8 | IPCTNL_MSG_CT_DELETE
    return (
        _HDR.pack(_HDR.size + len(body) + len(pad), kind, NLM_F_REQUEST | NLM_F_ACK, seq, 0)
        + body
        + pad
    )


def tracked() -> int | None:
    """How many connections this network namespace tracks (None: cannot tell)."""
    try:
        with open("/proc/sys/net/netfilter/nf_conntrack_count") as f:
            return int(f.read())
    except (OSError, ValueError):
        return None


class Unsupported(OSError):
    """The kernel does not filter conntrack dumps (before Linux 5.8)."""


class Conntrack(KeptSocket):
    """One long-lived ctnetlink socket, used from a worker thread.

    The kernel does a dump's work inside the requesting syscalls, walking the whole
    conntrack hash table (262,144 buckets here: ~12 ms even when it is empty), and
    closing a netlink socket waits for an RCU grace period: both would hold the event
    loop. So the socket is kept, and each clearing runs in a worker thread (syscalls
    release the GIL), one at a time."""

    def __init__(self) -> None:
        super().__init__(TIMEOUT)

    async def clear_flows(self, family: int, flows: set[Flow]) -> dict[Flow, int]:
        """Delete the tracked connections of many forwarded ports with one dump (of the
        DNATed entries): flow -> how many were deleted."""
        import anyio

        if not flows or tracked() == 0:
            return {}
        return await anyio.to_thread.run_sync(self._clear_flows, family, flows)

    def _clear_flows(self, family: int, flows: set[Flow]) -> dict[Flow, int]:
        with self.held() as sock:
            return self._clear_flows_held(sock, family, flows)

    def _clear_flows_held(
        self, sock: socket.socket, family: int, flows: set[Flow]
    ) -> dict[Flow, int]:
        af = socket.AF_INET if family == 4 else socket.AF_INET6
        sock.sendall(dnat_request(af, self.next_seqs()))
        hits: list[tuple[bytes, Flow]] = []
        while True:
            batch, done, code = dnat_entries(sock.recv(1 << 16))
            hits += [(orig, flow) for orig, flow in batch if flow in flows]
            if code in (errno.EOPNOTSUPP, errno.EINVAL):
                raise Unsupported(code, "this kernel does not filter conntrack dumps")
            if code:
                raise OSError(code, "conntrack dump failed")
            if done:
                break
        deleted: dict[Flow, int] = {}
        for orig, flow in hits:
            sock.sendall(delete_request(af, orig, self.next_seqs()))
            _batch, _done, code = entries(sock.recv(1 << 12))
            if code == 0:
                deleted[flow] = deleted.get(flow, 0) + 1
            elif code != errno.ENOENT:
                raise OSError(code, "conntrack delete failed")
        return deleted
