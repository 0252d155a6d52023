"""Reading the counters of single map elements over raw nfnetlink.

``nft get element`` refetches its cache of the map's elements whenever the ruleset
changed since its last call: 30-40 ms with 10,000 elements, more than the conntrack walk
the counter is read to avoid (``agent/fwsync.py``). The kernel looks one element up by
its key instead: one ``NFT_MSG_GETSETELEM`` request per element (not a dump), answered
with the element and its stateful expressions, ~30 us each.

Keys are encoded as nf_tables stores them: an ``inet_service`` is 2 bytes in network
order; in a concatenation every field takes a multiple of 4 bytes (``ipv4_addr .
inet_service`` is 4 + 2 + 2 padding).
"""

from __future__ import annotations

import errno
import ipaddress
import os
import struct

from .netfilter import KeptSocket

NFNL_SUBSYS_NFTABLES = 10
NFT_MSG_GETSETELEM, NFT_MSG_NEWSETELEM = 13, 12
NLM_F_REQUEST, NLM_F_ACK = 0x1, 0x4
NLMSG_ERROR = 2
NLA_F_NESTED = 0x8000
NFPROTO = {"inet": 1, "ip": 2, "ip6": 10}
LIST_TABLE, LIST_SET, LIST_ELEMENTS = 1, 2, 3
NFTA_LIST_ELEM = 1
ELEM_KEY, ELEM_EXPR, ELEM_EXPRESSIONS = 1, 7, 11
NFTA_DATA_VALUE = 1
EXPR_NAME, EXPR_DATA = 1, 2
COUNTER_BYTES, COUNTER_PACKETS = 1, 2
#: seconds the kernel may take to answer all of one call's requests
TIMEOUT = 1.0

_HDR = struct.Struct("=IHHII")
Elem = tuple[str, str, str]  # (map name, key text, value text), as backends/nftables.py writes them


def _attr(kind: int, payload: bytes, nested: bool = False) -> bytes:
    n = 4 + len(payload)
    return (
        struct.pack("=HH", n, kind | (NLA_F_NESTED if nested else 0))
        + payload
        + (b"\0" * ((4 - n % 4) % 4))
    )


def _attrs(data: bytes, start: int, end: int) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    while start + 4 <= end:
        n, kind = struct.unpack_from("=HH", data, start)
        if n < 4:
            break
        out.setdefault(kind & 0x3FFF, data[start + 4 : start + n])
        start += (n + 3) & ~3
    return out


_PORT = struct.Struct("!H").pack


def key_bytes(key: str) -> bytes:
    """``80`` -> 2 bytes; ``10.0.0.1 . 80`` -> 8 bytes; ``fd00::1 . 80`` -> 20 bytes. An
    interval (``1000-1999``) is found by its first port: the kernel keys the element,
    and its counter, by where it starts."""
    if key.isdigit():  # a port: the common case, ~10,000 of one apply
        return _PORT(int(key))
    parts = [p.strip().split("-", 1)[0] for p in key.split(" . ")]
    if len(parts) == 1:
        return _PORT(int(parts[0]))
    addr, port = ipaddress.ip_address(parts[0]), int(parts[1])
    return addr.packed + struct.pack("!H", port) + b"\0\0"


def request(family: str, table: str, elem: Elem, seq: int) -> bytes:
    name, key, _value = elem
    inner = _attr(ELEM_KEY, _attr(NFTA_DATA_VALUE, key_bytes(key)), nested=True)
    body = (
        struct.pack("=BBH", NFPROTO[family], 0, 0)
        + _attr(LIST_TABLE, table.encode() + b"\0")
        + _attr(LIST_SET, name.encode() + b"\0")
        + _attr(LIST_ELEMENTS, _attr(NFTA_LIST_ELEM, inner, nested=True), nested=True)
    )
    kind = NFNL_SUBSYS_NFTABLES << 8 | NFT_MSG_GETSETELEM
    return _HDR.pack(_HDR.size + len(body), kind, NLM_F_REQUEST | NLM_F_ACK, seq, 0) + body


def _counter_of(expr: bytes) -> tuple[int, int] | None:
    attrs = _attrs(expr, 0, len(expr))
    if attrs.get(EXPR_NAME, b"").rstrip(b"\0") != b"counter" or EXPR_DATA not in attrs:
        return None
    data = attrs[EXPR_DATA]
    inner = _attrs(data, 0, len(data))
    if COUNTER_PACKETS not in inner or COUNTER_BYTES not in inner:
        return None
    packets = struct.unpack(">Q", inner[COUNTER_PACKETS][:8])[0]
    octets = struct.unpack(">Q", inner[COUNTER_BYTES][:8])[0]
    return int(packets), int(octets)


def counter_in_reply(message: bytes) -> tuple[int, int] | None:
    """The counter of the (one) element in an NFT_MSG_NEWSETELEM message body (after
    the nlmsghdr)."""
    top = _attrs(message, 4, len(message))
    elements = top.get(LIST_ELEMENTS)
    if elements is None:
        return None
    for elem in _attrs(elements, 0, len(elements)).values():
        attrs = _attrs(elem, 0, len(elem))
        if ELEM_EXPR in attrs:
            return _counter_of(attrs[ELEM_EXPR])
        if ELEM_EXPRESSIONS in attrs:
            listed = attrs[ELEM_EXPRESSIONS]
            for expr in _attrs(listed, 0, len(listed)).values():
                found = _counter_of(expr)
                if found is not None:
                    return found
    return None


class Reader(KeptSocket):
    """Counter reads over one nfnetlink socket, kept open. A socket opened for a read
    and closed after it waits, when the ruleset just lost elements, for the kernel to
    let go of them: after a forward's element was deleted, the next read on a new
    socket took 12-16 ms (p50), on the kept one 0.02 ms. Blocking, for worker threads:
    one call at a time; a call that fails or times out closes the socket, and the next
    opens another (``netfilter.KeptSocket``)."""

    def __init__(self) -> None:
        super().__init__(TIMEOUT)

    def element_counters(
        self, family: str, table: str, elems: list[Elem]
    ) -> list[tuple[int, int] | None]:
        """(packets, bytes) of each element, None for one that is not there (or has no
        counter). All requests are sent, then the answers read; an OSError (or a
        timeout) when the kernel does not answer them all in time."""
        out: list[tuple[int, int] | None] = [None] * len(elems)
        if not elems:
            return out
        with self.held() as sock:
            first = self.next_seqs(len(elems))
            sock.sendall(
                b"".join(request(family, table, e, first + i) for i, e in enumerate(elems))
            )
            left = set(range(first, first + len(elems)))
            while left:
                data = sock.recv(1 << 16)
                _answers(data, first, out, left)
        return out

    def dump_counters(self, family: str, table: str, name: str) -> dict[bytes, tuple[int, int]]:
        """Every element of a map with its counter: key bytes -> (packets, bytes). One
        NFT_MSG_GETSETELEM dump, reading the key and the counter of each element and
        nothing else (the listing of nft would also build and print the whole table:
        ~12 ms at 1,000 elements, then the JSON to parse)."""
        out: dict[bytes, tuple[int, int]] = {}
        body = (
            struct.pack("=BBH", NFPROTO[family], 0, 0)
            + _attr(LIST_TABLE, table.encode() + b"\0")
            + _attr(LIST_SET, name.encode() + b"\0")
        )
        kind = NFNL_SUBSYS_NFTABLES << 8 | NFT_MSG_GETSETELEM
        with self.held() as sock:
            seq = self.next_seqs()
            sock.sendall(
                _HDR.pack(_HDR.size + len(body), kind, NLM_F_REQUEST | NLM_F_DUMP, seq, 0) + body
            )
            while True:
                data = sock.recv(1 << 17)
                if _dump_part(data, seq, name, out):
                    return out

    def forward_counts(
        self, family: str, table: str, wanted: list[tuple[str, Elem]]
    ) -> dict[str, tuple[int, int]]:
        """(packets, bytes) by forward key, summed over its elements (``wanted``:
        (forward key, element) pairs), read element by element; a forward none of whose
        elements is there has no entry. OSError as :meth:`element_counters`."""
        got = self.element_counters(family, table, [e for _k, e in wanted])
        out: dict[str, tuple[int, int]] = {}
        for (key, _e), counts in zip(wanted, got, strict=True):
            if counts is not None:
                p, b = out.get(key, (0, 0))
                out[key] = (p + counts[0], b + counts[1])
        return out

    def dumped_counts(
        self, family: str, table: str, wanted: list[tuple[str, Elem]]
    ) -> dict[str, tuple[int, int]]:
        """:meth:`forward_counts` for many: one dump of each map they are in."""
        by_map: dict[str, list[tuple[str, bytes]]] = {}
        for fkey, (name, key, _value) in wanted:
            by_map.setdefault(name, []).append((fkey, key_bytes(key)))
        out: dict[str, tuple[int, int]] = {}
        for name, keys in by_map.items():
            got = self.dump_counters(family, table, name)
            for fkey, kb in keys:
                c = got.get(kb)
                if c is not None:
                    p, b = out.get(fkey, (0, 0))
                    out[fkey] = (p + c[0], b + c[1])
        return out


def _answers(data: bytes, first: int, out: list[tuple[int, int] | None], left: set[int]) -> None:
    """One datagram of answers to element reads ``first`` .. ``first + len(out) - 1``
    into ``out``; each answered seq leaves ``left``."""
    off = 0
    while off + _HDR.size <= len(data):
        length, kind, _flags, seq, _pid = _HDR.unpack_from(data, off)
        if length < _HDR.size:
            break
        body = data[off + _HDR.size : off + length]
        if first <= seq < first + len(out):
            if kind == NLMSG_ERROR:
                code = -struct.unpack_from("=i", body)[0]
                if code not in (0, errno.ENOENT):
                    raise OSError(code, f"reading a map element's counter: {os.strerror(code)}")
                left.discard(seq)
            elif kind == NFNL_SUBSYS_NFTABLES << 8 | NFT_MSG_NEWSETELEM:
                out[seq - first] = counter_in_reply(body)
        off += (length + 3) & ~3


def _dump_part(data: bytes, seq: int, name: str, out: dict[bytes, tuple[int, int]]) -> bool:
    """One datagram of the dump into ``out``; True when it ended the dump."""
    off = 0
    while off + _HDR.size <= len(data):
        length, mtype, _flags, mseq, _pid = _HDR.unpack_from(data, off)
        if length < _HDR.size:
            return True
        if mseq == seq:
            if mtype == NLMSG_DONE:
                return True
            if mtype == NLMSG_ERROR:
                code = -struct.unpack_from("=i", data, off + _HDR.size)[0]
                if code:
                    raise OSError(code, f"dumping map {name}: {os.strerror(code)}")
                return True
            _elements(data, off + _HDR.size + 4, off + length, out)
        off += (length + 3) & ~3
    return False


NLM_F_DUMP = 0x300
NLMSG_DONE = 3


def _elements(data: bytes, start: int, end: int, out: dict[bytes, tuple[int, int]]) -> None:
    """The elements of one NEWSETELEM message into ``out``."""
    at = start
    while at + 4 <= end:
        n, kind = struct.unpack_from("=HH", data, at)
        if n < 4:
            return
        if kind & 0x3FFF == LIST_ELEMENTS:
            e = at + 4
            stop = at + n
            while e + 4 <= stop:
                en, _k = struct.unpack_from("=HH", data, e)
                if en < 4:
                    break
                attrs = _attrs(data, e + 4, e + en)
                keyattr = attrs.get(ELEM_KEY)
                counts = None
                if ELEM_EXPR in attrs:
                    counts = _counter_of(attrs[ELEM_EXPR])
                elif ELEM_EXPRESSIONS in attrs:
                    listed = attrs[ELEM_EXPRESSIONS]
                    for expr in _attrs(listed, 0, len(listed)).values():
                        counts = counts or _counter_of(expr)
                if keyattr is not None and counts is not None:
                    value = _attrs(keyattr, 0, len(keyattr)).get(NFTA_DATA_VALUE)
                    if value is not None:
                        out[value] = counts
                e += (en + 3) & ~3
        at += (n + 3) & ~3
