"""The firewall watcher's socket filter (``nftmonitor.drop_program``), run by a small
classic-BPF interpreter of the three instructions it uses (the kernel's own run is
``tests/backends/test_nftelems_kernel.py``)."""

from __future__ import annotations

import struct
import sys

import pytest

from netagent.backends import nftmonitor
from netagent.backends.nftmonitor import BPF_JEQ_K, BPF_LD_W_ABS, BPF_RET_K, drop_program

HDR = struct.Struct("=IHHII")  # nlmsghdr: length, type, flags, seq, port id


def run(prog: list[tuple[int, int, int, int]], packet: bytes) -> int:
    """What the kernel would keep of ``packet`` (0: dropped)."""
    a, pc = 0, 0
    while True:
        code, jt, jf, k = prog[pc]
        if code == BPF_LD_W_ABS:
            (a,) = struct.unpack_from(">I", packet, k)  # BPF loads in network order
            pc += 1
        elif code == BPF_JEQ_K:
            pc += 1 + (jt if a == k else jf)
        elif code == BPF_RET_K:
            return k
        else:
            raise AssertionError(f"unknown instruction {code:#x}")


def message(portid: int, seq: int = 1) -> bytes:
    return HDR.pack(20, (10 << 8) | 12, 0, seq, portid & 0xFFFFFFFF)


@pytest.mark.parametrize("ours", [[], [4242], [4242, -4097, 77], [2**31 + 5]])
def test_the_program_drops_our_port_ids_and_keeps_the_rest(ours: list[int]) -> None:
    prog = drop_program(ours)
    assert len(prog) == len(ours) + 3
    for portid in ours:
        assert run(prog, message(portid)) == 0
    for other in (0, 1, 4243, -4096, 2**31 + 6, 0x01000000):
        if other not in ours:
            assert run(prog, message(other)) == 0xFFFFFFFF
    # the port id of the first message decides (a datagram is one transaction's)
    assert run(prog, message(9) + message(ours[0] if ours else 9)) == 0xFFFFFFFF


def test_the_loaded_word_is_the_header_s_port_id_in_this_host_s_order() -> None:
    (_, _, _, k) = drop_program([0x01020304])[1]
    assert k.to_bytes(4, "big") == (0x01020304).to_bytes(4, sys.byteorder)


def test_a_socket_that_refuses_the_filter_keeps_everything() -> None:
    class Refusing:
        def __init__(self) -> None:
            self.calls: list[int] = []

        def setsockopt(self, level: int, name: int, value: object) -> None:
            self.calls.append(name)
            raise OSError(22, "Invalid argument")

    sock = Refusing()
    nftmonitor.ignore_portids(sock, frozenset({5}))  # type: ignore[arg-type]
    assert sock.calls == [nftmonitor.SO_ATTACH_FILTER, nftmonitor.SO_DETACH_FILTER]
