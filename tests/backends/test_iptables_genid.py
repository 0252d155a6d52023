"""The nf_tables generation over nfnetlink (``backends/iptables/genid.py``), from
crafted messages; the real kernel's answer is tested in a sandbox
(``test_iptables_kernel.py``)."""

from __future__ import annotations

import os
import socket
import struct
from typing import Any

import pytest

from netagent.backends.iptables import genid


def attr(kind: int, value: bytes) -> bytes:
    size = 4 + len(value)
    return struct.pack("=HH", size, kind) + value + b"\0" * (-size % 4)


def message(kind: int, *attrs: bytes) -> bytes:
    body = b"".join(attrs)
    return struct.pack("=IHHII", 20 + len(body), kind, 0, 1, 0) + b"\0\0\0\0" + body


NEWGEN = genid.NFNL_SUBSYS_NFTABLES << 8 | genid.NFT_MSG_NEWGEN


def test_the_generation_is_read_whatever_the_order_of_the_attributes() -> None:
    gen = attr(genid.NFTA_GEN_ID, struct.pack(">I", 123456))
    pid = attr(2, struct.pack(">I", 42))
    name = attr(3, b"nft\0")  # padded to 4
    assert genid.parse_newgen(message(NEWGEN, gen)) == 123456
    assert genid.parse_newgen(message(NEWGEN, name, pid, gen)) == 123456
    # the nested flag bits of the attribute type are ignored
    assert genid.parse_newgen(message(NEWGEN, attr(genid.NFTA_GEN_ID | 0x8000, b"\0\0\0\7"))) == 7


def test_anything_else_is_unknown() -> None:
    error = message(2, struct.pack("=i", -1) + b"\0" * 16)  # NLMSG_ERROR
    assert genid.parse_newgen(error) is None
    assert genid.parse_newgen(b"") is None
    assert genid.parse_newgen(message(NEWGEN)) is None  # no attribute
    assert genid.parse_newgen(message(NEWGEN, b"\0\0\0\0")) is None  # a zero-size one


def test_the_request_is_a_getgen() -> None:
    length, kind, flags, seq, pid = struct.unpack_from("=IHHII", genid.getgen_request(9))
    assert (length, kind, flags, seq, pid) == (
        20,
        genid.NFNL_SUBSYS_NFTABLES << 8 | genid.NFT_MSG_GETGEN,
        genid.NLM_F_REQUEST,
        9,
        0,
    )


def test_a_socket_that_fails_or_stays_silent_is_unknown(monkeypatch: pytest.MonkeyPatch) -> None:
    timeouts: list[float] = []

    class Silent:
        def __init__(self, *args: Any) -> None:
            pass

        def __enter__(self) -> Silent:
            return self

        def __exit__(self, *exc: object) -> None:
            pass

        def settimeout(self, value: float) -> None:
            timeouts.append(value)

        def sendto(self, data: bytes, addr: tuple[int, int]) -> None:
            pass

        def recv(self, size: int) -> bytes:
            raise TimeoutError("timed out")  # what a socket timeout raises

    monkeypatch.setattr(socket, "socket", Silent)
    assert genid.nf_genid() is None
    assert timeouts == [genid.TIMEOUT]

    def refuse(*args: Any) -> None:
        raise PermissionError("no")

    monkeypatch.setattr(socket, "socket", refuse)
    assert genid.nf_genid() is None


def test_only_iptables_nft_counts_generations(monkeypatch: pytest.MonkeyPatch) -> None:
    real = {"/usr/sbin/iptables-restore": "/usr/sbin/xtables-nft-multi"}
    monkeypatch.setattr(os.path, "realpath", lambda p: real.get(p, p))
    assert genid.nft_flavour("/usr/sbin/iptables-restore")
    assert genid.nft_flavour("/usr/sbin/iptables-nft-save")
    assert not genid.nft_flavour("/usr/sbin/iptables-legacy-restore")
    assert not genid.nft_flavour("iptables-restore")
