"""Map elements added and deleted over raw nfnetlink: the batch ``nft add element`` and
``nft delete element`` send, without libnftables' parser and its cache.

A forward's update is a few elements of a map (``backends/nftables.py``). libnftables
parses the script, fetches the sets it names and builds the batch: ~0.26 ms for one
element with 10,000 in the map, ~85 ms for 10,000 new ones. The kernel itself takes
~0.02 ms and ~35 ms; encoding 10,000 elements here is ~15 ms. The batch is the same
transaction: ``NFNL_MSG_BATCH_BEGIN``, ``NFT_MSG_DELSETELEM`` and ``NFT_MSG_NEWSETELEM``
messages of at most :data:`PER_MESSAGE` elements each (an attribute's length is 16
bits), ``NFNL_MSG_BATCH_END``; all or nothing. Adding an element that is there with the
same value changes nothing (no ``NLM_F_EXCL``, as ``nft add``); with another value, or
deleting one that is not there, fails the whole batch (EEXIST, ENOENT), as nft's does.
A map declared with ``counter`` gives each new element its counter (the kernel clones
the set's expressions), as for nft's.

Keys and values are encoded as nf_tables stores them (``nftcount.key_bytes``): a port
is 2 bytes in network order; in a concatenation each field takes a multiple of 4 bytes.
Intervals (a ranged map's ``1000-1999``: two elements in the kernel, a start and an end)
are not written here: :func:`writable` says so and libnftables takes those.

Blocking, for the backend's libnftables thread (the order of its transactions is the
order they were asked in). One socket, kept open (``backends/netfilter.py``), with a
send buffer sized to the batch (the kernel takes a batch only in one message).
"""

from __future__ import annotations

import functools
import ipaddress
import os
import socket
import struct

from .netfilter import KeptSocket
from .nftcount import (
    _HDR,
    ELEM_KEY,
    LIST_ELEMENTS,
    LIST_SET,
    LIST_TABLE,
    NFNL_SUBSYS_NFTABLES,
    NFPROTO,
    NFT_MSG_NEWSETELEM,
    NFTA_DATA_VALUE,
    NFTA_LIST_ELEM,
    NLM_F_ACK,
    NLM_F_REQUEST,
    NLMSG_ERROR,
    Elem,
    _attr,
    key_bytes,
)

NFNL_MSG_BATCH_BEGIN, NFNL_MSG_BATCH_END = 0x10, 0x11
NFT_MSG_DELSETELEM = 14
NLM_F_CREATE = 0x400
ELEM_DATA = 2
SO_SNDBUFFORCE = 32
#: elements in one message: ~32 bytes each, and a nested attribute holds 65,535 at most
PER_MESSAGE = 1000
#: seconds the kernel may take to answer a batch (the backend's thread call has its own
#: limit around it)
TIMEOUT = 5.0

_BATCH_BODY = struct.pack("=BBH", socket.AF_UNSPEC, 0, socket.htons(NFNL_SUBSYS_NFTABLES))


def _interval(elem: Elem) -> bool:
    """A ranged map's element (``1000-1999``), which :class:`Writer` does not write."""
    return "-" in elem[1]


def writable(elems: list[Elem]) -> bool:
    """Whether these elements can go by :class:`Writer`: no intervals among them."""
    return not any(map(_interval, elems))


def split_writable(elems: list[Elem]) -> tuple[list[Elem], list[Elem]]:
    """``elems`` as those :class:`Writer` can write and the others (intervals)."""
    direct: list[Elem] = []
    other: list[Elem] = []
    for e in elems:
        (other if _interval(e) else direct).append(e)
    return direct, other


@functools.lru_cache(maxsize=4096)
def _address(text: str) -> bytes:
    return ipaddress.ip_address(text).packed


def value_bytes(value: str) -> bytes:
    """A map's value: ``10.0.0.2 . 80`` -> 8 bytes (address, port, 2 of padding);
    ``10.0.0.2`` -> 4 bytes."""
    addr, _, port = value.partition(" . ")
    packed = _address(addr.strip())
    if not port:
        return packed
    return packed + _PORT_PADDED(int(port))


_PORT_PADDED = struct.Struct("!H2x").pack


#: the element's, ELEM_KEY's and the key's VALUE attribute headers
HEADS = 12


@functools.lru_cache(maxsize=64)
def _frame(key_len: int, value_len: int | None) -> tuple[bytes, bytes, bytes]:
    """What goes around an element's key and value: its attribute headers and
    paddings, the same for every element of a map (10,000 elements encode in ~10 ms,
    not ~35 attribute by attribute). ``(before the key, between, after the value)``."""
    key = _attr(ELEM_KEY, _attr(NFTA_DATA_VALUE, b"\0" * key_len), nested=True)
    if value_len is None:
        whole = _attr(NFTA_LIST_ELEM, key, nested=True)
        return whole[:HEADS], whole[HEADS + key_len :], b""
    data = _attr(ELEM_DATA, _attr(NFTA_DATA_VALUE, b"\0" * value_len), nested=True)
    whole = _attr(NFTA_LIST_ELEM, key + data, nested=True)
    value_at = 4 + len(key) + 8  # after the element's, ELEM_DATA's and VALUE's headers
    return whole[:HEADS], whole[HEADS + key_len : value_at], whole[value_at + value_len :]


def _element(key: bytes, value: bytes | None) -> bytes:
    before, between, after = _frame(len(key), None if value is None else len(value))
    if value is None:
        return before + key + between
    return b"".join((before, key, between, value, after))


def _message(kind: int, flags: int, seq: int, body: bytes) -> bytes:
    return _HDR.pack(_HDR.size + len(body), kind, flags, seq, 0) + body


def batch(
    family: str, table: str, gone: list[Elem], new: list[Elem], first_seq: int
) -> tuple[bytes, list[int]]:
    """The batch deleting ``gone`` (by key) and adding ``new``, its messages numbered
    from ``first_seq`` (the batch's begin); and the sequence numbers the kernel
    acknowledges (each element message)."""
    head = struct.pack("=BBH", NFPROTO[family], 0, 0) + _attr(LIST_TABLE, table.encode() + b"\0")
    parts = [_message(NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, first_seq, _BATCH_BODY)]
    acked: list[int] = []
    seq = first_seq + 1
    for verb, elems in ((NFT_MSG_DELSETELEM, gone), (NFT_MSG_NEWSETELEM, new)):
        by_map: dict[str, list[Elem]] = {}
        for e in elems:
            by_map.setdefault(e[0], []).append(e)
        flags = NLM_F_REQUEST | NLM_F_ACK | (NLM_F_CREATE if verb == NFT_MSG_NEWSETELEM else 0)
        for name, group in sorted(by_map.items()):
            for i in range(0, len(group), PER_MESSAGE):
                chunk = group[i : i + PER_MESSAGE]
                listed = b"".join(
                    _element(key_bytes(k), value_bytes(v) if verb == NFT_MSG_NEWSETELEM else None)
                    for _m, k, v in chunk
                )
                body = (
                    head
                    + _attr(LIST_SET, name.encode() + b"\0")
                    + _attr(LIST_ELEMENTS, listed, nested=True)
                )
                parts.append(_message(NFNL_SUBSYS_NFTABLES << 8 | verb, flags, seq, body))
                acked.append(seq)
                seq += 1
    parts.append(_message(NFNL_MSG_BATCH_END, NLM_F_REQUEST, seq, _BATCH_BODY))
    return b"".join(parts), acked


class Writer(KeptSocket):
    """Element batches over one nfnetlink socket, kept open; one at a time. A call that
    fails or times out closes the socket, and the next opens another
    (``netfilter.KeptSocket``)."""

    def __init__(self) -> None:
        super().__init__(TIMEOUT)
        self._sndbuf = 0

    def _drop(self) -> None:
        super()._drop()
        self._sndbuf = 0

    def write(self, family: str, table: str, gone: list[Elem], new: list[Elem]) -> None:
        """Delete ``gone`` and add ``new`` in one transaction. OSError with the
        kernel's code when it refuses (nothing changed then), or when it does not answer
        within :data:`TIMEOUT`."""
        if not gone and not new:
            return
        with self.held() as sock:
            self._write(sock, family, table, gone, new)

    def _write(
        self, sock: socket.socket, family: str, table: str, gone: list[Elem], new: list[Elem]
    ) -> None:
        # a sequence number for each element message at most, and the begin and end
        first = self.next_seqs(len(gone) + len(new) + 2)
        data, acked = batch(family, table, gone, new, first)
        if len(data) + 4096 > self._sndbuf:
            # a batch is one message, and the kernel refuses one bigger than the socket's
            # send buffer (EMSGSIZE): a 10,000-element batch is ~320 KB
            self._sndbuf = max(len(data) * 2, 1 << 18)
            sock.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, self._sndbuf)
        sock.sendall(data)
        # the kernel runs the batch inside sendmsg: its answers are queued by now
        left = set(acked)
        ours = range(first, first + len(acked) + 2)
        while left:
            reply = sock.recv(1 << 16)
            off = 0
            while off + _HDR.size <= len(reply):
                length, kind, _flags, seq, _pid = _HDR.unpack_from(reply, off)
                if length < _HDR.size:
                    break
                if kind == NLMSG_ERROR and seq in ours:
                    code = -struct.unpack_from("=i", reply, off + _HDR.size)[0]
                    if code:
                        raise OSError(code, os.strerror(code))
                    left.discard(seq)
                off += (length + 3) & ~3


class ElementScript(list[str]):
    """An update's nft script, its lines (what libnftables runs, and what tests and
    ``show`` read), carrying the same change as elements for :class:`Writer`."""

    def __init__(self, lines: list[str], gone: list[Elem], new: list[Elem]) -> None:
        super().__init__(lines)
        self.gone = gone
        self.new = new

    @property
    def writable(self) -> bool:
        return writable(self.gone) and writable(self.new)

    @property
    def size(self) -> int:
        """How many elements it deletes and adds."""
        return len(self.gone) + len(self.new)


class TableScript(list[str]):
    """A new table's nft script (its lines: what ``show`` and tests read), run as two
    transactions: ``head`` by libnftables (the table, its chains, rules and sets, and the
    elements only it writes: intervals), then the other map elements by :class:`Writer`
    (10,000 of them: ~50 ms, where libnftables parses them in ~85 ms). Only for a table
    that is not there: until the second ends its maps are empty, as they were before."""

    def __init__(self, lines: list[str], head: list[str], new: list[Elem]) -> None:
        super().__init__(lines)
        self.head = head
        self.elements = ElementScript([], [], new)
