"""Listening sockets by sock_diag (``backends/sockdiag.py``) are those ``/proc/net``
lists: TCP listeners and bound UDP sockets, IPv4 and IPv6, with their inodes; a connected
socket is not one. Loopback sockets of this test's own; no root."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator

import pytest

from netagent.agent import hostview
from netagent.backends import sockdiag


@pytest.fixture
def sockets() -> Iterator[list[socket.socket]]:
    made: list[socket.socket] = []
    try:
        for family, addr in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
            tcp = socket.socket(family, socket.SOCK_STREAM)
            tcp.bind((addr, 0))
            tcp.listen()
            udp = socket.socket(family, socket.SOCK_DGRAM)
            udp.bind((addr, 0))
            made += [tcp, udp]
        # a connected pair: neither end is listening
        client = socket.create_connection(made[0].getsockname()[:2])
        server, _ = made[0].accept()
        made += [client, server]
        yield made
    finally:
        for s in made:
            s.close()


def _inode(s: socket.socket) -> int:
    return os.fstat(s.fileno()).st_ino


def test_sock_diag_lists_what_proc_lists(sockets: list[socket.socket]) -> None:
    # only this test's sockets are compared: other processes may bind or close meanwhile
    mine = {_inode(s) for s in sockets}
    by_diag = {
        (b.proto, b.family, b.address, b.port, b.inode)
        for b in sockdiag.bound_sockets()
        if b.inode in mine
    }
    by_proc = {
        (x.proto, x.family, x.address, x.port, x.inode)
        for x in hostview._proc_listeners()
        if x.inode in mine
    }
    assert by_diag == by_proc
    want = {
        (
            "tcp" if s.type == socket.SOCK_STREAM else "udp",
            4 if s.family == socket.AF_INET else 6,
            s.getsockname()[0],
            s.getsockname()[1],
            _inode(s),
        )
        for s in sockets[:4]
    }
    assert by_diag == want  # the four bound ones, and not the connected pair


@pytest.mark.parametrize("only", [("tcp", 4), ("tcp", 6), ("udp", 4), ("udp", 6)])
def test_one_protocol_and_version_alone(
    sockets: list[socket.socket], only: tuple[str, int]
) -> None:
    mine = {_inode(s) for s in sockets}
    every = [b for b in sockdiag.bound_sockets() if b.inode in mine]
    some = [b for b in sockdiag.bound_sockets(only=only) if b.inode in mine]
    assert len(some) == 1  # each of the four bound sockets is of another pair
    assert some == [b for b in every if (b.proto, b.family) == only]


def test_read_listeners_uses_sock_diag(sockets: list[socket.socket]) -> None:
    got = {(x.proto, x.inode) for x in hostview.read_listeners()}
    assert ("udp", _inode(sockets[1])) in got
