"""The nf_tables watcher's reading (``backends/nftmonitor.py``) over a socket pair: what
arrives while ``hold`` says so (a pass of the daemon is running) waits in the socket,
then is read; never longer than HOLD_MAX."""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import anyio
import pytest

from netagent.backends import nftmonitor
from netagent.backends.nftmonitor import NftMonitorWatcher, Transactions

LIMIT = 5.0
#: the asks of one hold of 0.05 s at most (one every HOLD_POLL, 5 ms)
HOLD_ASKS = 11


def _nfmsg(msg: int, family: int, attrs: list[tuple[int, bytes]]) -> bytes:
    body = struct.pack("=BBH", family, 0, 0)
    for kind, value in attrs:
        n = 4 + len(value)
        body += struct.pack("=HH", n, kind) + value + b"\0" * ((4 - n % 4) % 4)
    return struct.pack("=IHHII", 16 + len(body), 10 << 8 | msg, 0, 0, 0) + body


#: someone else (pid 777) deletes a rule of netagent's nat table
FOREIGN = _nfmsg(8, 2, [(1, b"nat\0"), (2, b"NETAGENT-DNAT\0")]) + _nfmsg(
    15, 0, [(1, struct.pack(">I", 42)), (2, struct.pack(">I", 777)), (3, b"iptables\0")]
)


async def until(cond: Callable[[], object], what: str) -> None:
    deadline = time.monotonic() + LIMIT
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {LIMIT:g} s: {what}")
        await anyio.sleep(0.002)


@dataclass
class Reader:
    """A watcher reading one end of a socket pair (``send`` puts FOREIGN in the other)."""

    watcher: NftMonitorWatcher
    sock: socket.socket
    peer: socket.socket
    tx: Transactions
    seen: list[str] = field(default_factory=list)

    def send(self) -> None:
        self.peer.send(FOREIGN)

    async def read(self) -> None:
        await self.watcher._read(self.sock, self.tx, self.seen.append)

    def close(self) -> None:
        self.sock.close()
        self.peer.close()


def reader(held: Callable[[], bool], asked: list[float]) -> Reader:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    ours.setblocking(False)
    watcher = NftMonitorWatcher((" ip nat",))

    def hold() -> bool:
        asked.append(time.monotonic())
        return held()

    watcher.hold = hold
    return Reader(watcher, ours, theirs, Transactions(watcher.markers, lambda pid: False))


@pytest.mark.parametrize("release", ["pass ends", "time limit"])
async def test_what_arrives_during_a_pass_is_read_after_it(
    release: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    in_pass = True
    asked: list[float] = []
    if release == "time limit":
        monkeypatch.setattr(nftmonitor, "HOLD_MAX", 0.05)
    r = reader(lambda: in_pass, asked)
    seen = r.seen
    async with anyio.create_task_group() as tg:
        tg.start_soon(r.read)
        r.send()
        t0 = time.monotonic()
        # held: asked again and again, nothing read meanwhile
        await until(lambda: len(asked) >= 5, "the watcher asks whether a pass runs")
        if release == "pass ends":
            assert seen == []
            in_pass = False
        await until(lambda: seen, "the drift is reported")
        waited = time.monotonic() - t0
        tg.cancel_scope.cancel()
    r.close()
    assert seen == ["iptables (pid 777) changed netagent's rules: delete rule ip nat"]
    if release == "time limit":
        assert 0.05 <= waited < LIMIT  # read although the pass still runs


async def test_nothing_held_is_read_at_once() -> None:
    asked: list[float] = []
    r = reader(lambda: False, asked)
    async with anyio.create_task_group() as tg:
        tg.start_soon(r.read)
        r.send()
        await until(lambda: r.seen, "the drift is reported")
        tg.cancel_scope.cancel()
    r.close()
    assert asked and len(r.seen) == 1  # asked, and not kept waiting


async def test_a_backlog_is_held_once_then_read_to_its_end(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A pass that runs on (a big apply) holds the reading once: what is waiting is then
    read to its end in turns, not held again before each turn."""
    monkeypatch.setattr(nftmonitor, "HOLD_MAX", 0.05)
    asked: list[float] = []
    r = reader(lambda: True, asked)  # a pass that never ends
    datagrams = 20
    r.peer.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    r.peer.setblocking(False)  # a full buffer fails the test, never hangs it
    async with anyio.create_task_group() as tg:
        for _ in range(datagrams):  # 500 transactions each: a turn reads one or two
            r.peer.send(FOREIGN * 500)
        tg.start_soon(r.read)
        await until(lambda: len(r.seen) == datagrams * 500, "the backlog is read")
        tg.cancel_scope.cancel()
    r.close()
    # held before the backlog (and once more after its end, when the socket's last
    # readiness is seen), each up to HOLD_MAX, i.e. ~10 asks: not before every turn
    assert 0 < len(asked) <= 4 * HOLD_ASKS
