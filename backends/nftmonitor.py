"""A drift watcher on nf_tables' own change notifications: someone else changed what a
backend owns, or something else on the host's firewall.

The kernel multicasts every committed nf_tables change (group ``NFNLGRP_NFTABLES``): one
message per object the transaction touched (table, chain, rule, set, element), then one
``NFT_MSG_NEWGEN`` naming the new generation and the committing process (pid and name).
A transaction by another process that touches what the backend owns (``markers``: text
such as `` inet netagent`` or `` ip nat``, matched against a line ``VERB OBJECT FAMILY
TABLE`` per message, the way ``nft monitor`` prints them) is reported once to
``on_drift``, with who did it; any other foreign transaction to ``on_foreign`` (the
findings about other tools are refreshed then, ``agent/hostcheck.py``).

Own changes are not drift: nf_tables names the committing *task*, so the daemon's pid,
any of its threads (big transactions run off the event loop), and the pids the backend
says are its own (``own_pids``: the iptables-restore processes it runs) are ignored.
The notifications of the daemon's own element writes (one transaction per forward
added or removed) never reach the watcher: each names the socket it came from (the
message header's port id), and a socket filter drops those of the daemon's kept
netfilter sockets (``netfilter.OPEN``), in the kernel, so a forward's pass does not wake
the watcher to read and discard them.
iptables-nft (Debian's default iptables) is nf_tables underneath, so the same watcher
serves the iptables backend; iptables-legacy changes never show here.

Why not ``nft monitor`` (what this replaced): its socket holds 16 MiB, and ``nft flush
ruleset`` over 65,535 iptables rules sends a notification per rule: the transaction's
generation line was lost, nothing was reported, and only the periodic pass (30 s)
repaired it. nft also spent ~1 s of CPU printing those rules, beside the repair. Here
only each message's type and table name are read (~1.5 us a message), and lost
notifications (ENOBUFS) count as drift: what changed is unknown, so the backend looks
(a cached observation tells at once when it was only our own big commit).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import os
import socket
import struct
import sys
from collections.abc import Callable, Iterable

import anyio
import structlog

from netagent.agent.turns import Turns

from .firewall import DriftCallback
from .netfilter import NETLINK_NETFILTER, OPEN

log = structlog.get_logger("netagent.drift")

SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1
SO_RCVBUFFORCE = 33
NFNLGRP_NFTABLES = 7
NFNL_SUBSYS_NFTABLES = 10
NFT_MSG_NEWGEN = 15
NFTA_GEN_PROC_PID, NFTA_GEN_PROC_NAME = 2, 3
#: message type -> how ``nft monitor`` would name it (verb, object)
MESSAGES = {
    0: ("add", "table"),
    2: ("delete", "table"),
    3: ("add", "chain"),
    5: ("delete", "chain"),
    6: ("add", "rule"),
    8: ("delete", "rule"),
    9: ("add", "set"),
    11: ("delete", "set"),
    12: ("add", "element"),
    14: ("delete", "element"),
    18: ("add", "object"),
    20: ("delete", "object"),
    22: ("add", "flowtable"),
    24: ("delete", "flowtable"),
}
FAMILIES = {1: "inet", 2: "ip", 3: "arp", 5: "netdev", 7: "bridge", 10: "ip6"}
#: what a lost notification is fed as (``nft monitor`` prints the same line)
LOST = "# ERROR: We lost some netlink events!"
#: the receive buffer: a transaction of a few thousand objects fits; a bigger one loses
#: notifications, which counts as drift (cheap: the backend's observation answers)
RCVBUF = 8 << 20
#: pause before a broken socket is opened again
RESTART_DELAY = 1.0
_HDR = struct.Struct("=IHHII")
_ATTR = struct.Struct("=HH")
SO_ATTACH_FILTER, SO_DETACH_FILTER = 26, 27
#: classic BPF: a word loaded from the packet, a jump if equal to k, a return of k
BPF_LD_W_ABS, BPF_JEQ_K, BPF_RET_K = 0x20, 0x15, 0x06
_INSN = struct.Struct("=HBBI")  # struct sock_filter
_FPROG = struct.Struct("@HP")  # struct sock_fprog: a count and a pointer

#: called with the tables a foreign transaction touched and who committed it
ForeignCallback = Callable[[frozenset[str], str], None]


def is_own(pid: int, me: int, others: Iterable[int] = ()) -> bool:
    return pid == me or pid in others or os.path.exists(f"/proc/{me}/task/{pid}")


class Transactions:
    """Groups notification lines into transactions and decides which are drift. Pure but
    for the pid test it is given, so it is tested without a kernel."""

    def __init__(self, markers: tuple[str, ...], own: Callable[[int], bool]) -> None:
        self.markers = (*markers, "flush ruleset")
        self.own = own
        self.pending: list[str] = []
        #: the tables (``FAMILY NAME``) the transaction under way touched
        self.tables: set[str] = set()
        #: set by :meth:`feed` when a foreign transaction touched only other tables
        self.foreign: tuple[frozenset[str], str] | None = None

    def feed(self, line: str) -> str | None:
        """A description of the drift when ``line`` ends a foreign transaction that
        touched what is watched; else None (and ``foreign`` says whether it ended a
        foreign transaction of other tables).

        A transaction too big for the socket (``nft flush ruleset`` with 65,535 iptables
        rules sends a notification per rule) loses notifications, its closing generation
        among them: without :data:`LOST` nothing would ever be reported. What changed
        is then unknown, so it counts as drift (the backend's observation tells whether
        anything of ours is gone; for our own big commits, a cached observation says at
        once that nothing is)."""
        self.foreign = None
        if line.startswith(LOST):
            self.pending = []
            self.tables = set()
            return "the firewall watcher lost events (a change too big to follow); looking"
        if not line.startswith("# new generation "):
            parts = line.split()
            if len(parts) >= 4:
                self.tables.add(f"{parts[2]} {parts[3]}")
            if any(m in line for m in self.markers) and (
                not self.pending or self.pending[-1] != line
            ):
                self.pending.append(line)
            return None
        head, _, comm = line.partition(" (")
        try:
            pid = int(head.rsplit(" ", 1)[1])
        except (IndexError, ValueError):
            pid = 0
        comm = comm.rstrip(")")
        lines, self.pending = self.pending, []
        tables, self.tables = self.tables, set()
        if self.own(pid):
            return None
        if not lines:
            if tables:
                self.foreign = (frozenset(tables), f"{comm} (pid {pid})")
            return None
        more = " ..." if len(lines) > 3 else ""
        return f"{comm} (pid {pid}) changed netagent's rules: {'; '.join(lines[:3])}{more}"


def _string(data: bytes, start: int, end: int) -> str:
    return data[start:end].split(b"\0", 1)[0].decode(errors="replace")


def parse(data: bytes) -> list[str]:
    """One datagram of notifications -> ``nft monitor``-like lines: ``VERB OBJECT FAMILY
    TABLE`` per object message (table name: attribute 1 of every object message), and
    ``# new generation N by process PID (COMM)`` for NFT_MSG_NEWGEN. A line the same as
    the one before it in the same transaction is given once: ``iptables -t nat -F`` over
    10,000 forwards sends 10,000 ``delete rule ip nat``, and so does the repair, on the
    event loop (~45 ms of it a drift, formatted and fed one by one)."""
    out: list[str] = []
    off = 0
    size = len(data)
    last = b""  # the header and table of the last object message given
    while off + 20 <= size:
        length, kind, _flags, _seq, _pid = _HDR.unpack_from(data, off)
        if length < 20:
            break
        end = min(off + length, size)
        if kind >> 8 == NFNL_SUBSYS_NFTABLES and kind & 0xFF != NFT_MSG_NEWGEN:
            alen = _ATTR.unpack_from(data, off + 20)[0] if off + 24 <= end else 0
            # type, family, and the first attribute (the table) with its length
            same = (
                data[off + 4 : off + 6]
                + data[off + 16 : off + 17]
                + data[off + 20 : off + 20 + alen]
            )
            if same == last:
                off += (length + 3) & ~3
                continue
            last = same
        else:
            last = b""
        if kind >> 8 == NFNL_SUBSYS_NFTABLES:
            msg = kind & 0xFF
            family = FAMILIES.get(data[off + 16], str(data[off + 16]))
            if msg == NFT_MSG_NEWGEN:
                pid, comm, at = 0, "?", off + 20
                while at + 4 <= end:
                    alen, atype = _ATTR.unpack_from(data, at)
                    if alen < 4:
                        break
                    atype &= 0x3FFF
                    if atype == NFTA_GEN_PROC_PID and alen >= 8:
                        pid = struct.unpack_from(">I", data, at + 4)[0]
                    elif atype == NFTA_GEN_PROC_NAME:
                        comm = _string(data, at + 4, at + alen)
                    at += (alen + 3) & ~3
                genid = 0
                if off + 28 <= end:
                    genid = struct.unpack_from(">I", data, off + 24)[0]
                out.append(f"# new generation {genid} by process {pid} ({comm})")
            elif msg in MESSAGES and off + 24 <= end:
                verb, what = MESSAGES[msg]
                alen, atype = _ATTR.unpack_from(data, off + 20)
                table = _string(data, off + 24, off + 20 + alen) if atype & 0x3FFF == 1 else "?"
                out.append(f"{verb} {what} {family} {table}")
        off += (length + 3) & ~3
    return out


def drop_program(portids: Iterable[int]) -> list[tuple[int, int, int, int]]:
    """A classic BPF program that drops a datagram whose first message came from one
    of ``portids`` (the header's port id, at offset 12) and keeps any other. A datagram
    holds the notifications of one transaction: the kernel sends each transaction's
    own, one after the other, under its commit mutex."""
    ids = sorted({p & 0xFFFFFFFF for p in portids})
    prog = [(BPF_LD_W_ABS, 0, 0, 12)]
    for i, portid in enumerate(ids):
        # BPF loads words in network order; the header's port id is in the host's
        loaded = int.from_bytes(portid.to_bytes(4, sys.byteorder), "big")
        prog.append((BPF_JEQ_K, len(ids) - i, 0, loaded))  # equal: on to the drop
    return [*prog, (BPF_RET_K, 0, 0, 0xFFFFFFFF), (BPF_RET_K, 0, 0, 0)]


def ignore_portids(sock: socket.socket, portids: frozenset[int]) -> None:
    """Have the kernel drop, before they are queued on ``sock``, the notifications of
    transactions from these netlink port ids (none: keep everything). Failing, keep
    everything: the watcher then reads and discards them (they are the daemon's own)."""
    try:
        if not portids:
            with contextlib.suppress(OSError):  # ENOENT: none attached
                sock.setsockopt(socket.SOL_SOCKET, SO_DETACH_FILTER, 0)
            return
        code = b"".join(_INSN.pack(*insn) for insn in drop_program(portids))
        buf = ctypes.create_string_buffer(code, len(code))
        prog = _FPROG.pack(len(code) // _INSN.size, ctypes.addressof(buf))
        sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, prog)
    except OSError as exc:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, SO_DETACH_FILTER, 0)
        log.debug("cannot filter the firewall watcher's socket", error=str(exc))


def open_socket(rcvbuf: int = RCVBUF) -> socket.socket:
    sock = socket.socket(
        socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC,
        NETLINK_NETFILTER,
    )  # fmt: skip
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf)
    except OSError:  # without CAP_NET_ADMIN: the default buffer, losses count as drift
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.bind((0, 0))
    sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, NFNLGRP_NFTABLES)
    return sock


class NftMonitorWatcher:
    """``markers``: what the backend owns (see the module). ``own_pids``: pids that are
    the backend's besides the daemon's own tasks."""

    def __init__(
        self, markers: tuple[str, ...], own_pids: Callable[[], Iterable[int]] = tuple
    ) -> None:
        self.markers = markers
        self.own_pids = own_pids
        #: told about foreign transactions that did not touch the markers (set by the
        #: daemon before ``run``); None: nobody asks
        self.on_foreign: ForeignCallback | None = None

    async def run(self, on_drift: DriftCallback) -> None:
        me = os.getpid()
        while True:
            tx = Transactions(self.markers, lambda pid: is_own(pid, me, self.own_pids()))
            try:
                sock = open_socket()
            except OSError as exc:
                log.warning("cannot watch nf_tables; the periodic pass finds drift", error=str(exc))
                return

            def own(portids: frozenset[int], sock: socket.socket = sock) -> None:
                ignore_portids(sock, portids)

            OPEN.follow(own)
            try:
                await self._read(sock, tx, on_drift)
            except OSError as exc:
                log.warning("the firewall watcher failed; restarting it", error=str(exc))
            finally:
                OPEN.unfollow(own)  # before the socket (its number) is free
                sock.close()
            # what happened while it was down is unknown: look once
            on_drift("the firewall watcher restarted")
            await anyio.sleep(RESTART_DELAY)

    async def _read(self, sock: socket.socket, tx: Transactions, on_drift: DriftCallback) -> None:
        loop = asyncio.get_running_loop()
        ready = asyncio.Event()
        loop.add_reader(sock.fileno(), ready.set)
        try:
            while True:
                await ready.wait()
                ready.clear()
                turns = Turns()
                while not turns.due():  # then yield: a burst must not hold the loop
                    try:
                        data = sock.recv(1 << 16)
                    except BlockingIOError:
                        break
                    except OSError as exc:
                        if exc.errno != errno.ENOBUFS:
                            raise
                        lines = [LOST]
                    else:
                        lines = parse(data)
                    for line in lines:
                        self._feed(tx, line, on_drift)
                else:
                    ready.set()  # more may wait: read on after the others' turn
                    await anyio.sleep(0)
        finally:
            loop.remove_reader(sock.fileno())

    def _feed(self, tx: Transactions, line: str, on_drift: DriftCallback) -> None:
        what = tx.feed(line)
        if what is not None:
            log.info("firewall drift", what=what)
            on_drift(what)
        elif tx.foreign is not None and self.on_foreign is not None:
            self.on_foreign(*tx.foreign)
