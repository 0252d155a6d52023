"""The nf_tables generation over raw nfnetlink: a counter the kernel bumps on every
committed ruleset change, by anyone, in this network namespace.

iptables-nft (Debian's default iptables) commits each ``iptables-restore`` file as one
nf_tables transaction, so while the generation is the one last seen, nothing changed
and a remembered observation still holds (``cache.py``). Reading it is one
``NFT_MSG_GETGEN`` round trip, ~30 us, against ~0.3 s to read 10,000 rules back. Legacy
iptables changes do not go through nf_tables and never move it: there it is not used.
"""

from __future__ import annotations

import os
import socket
import struct

NETLINK_NETFILTER = 12
NFNL_SUBSYS_NFTABLES = 10
NFT_MSG_NEWGEN, NFT_MSG_GETGEN = 15, 16
NFTA_GEN_ID = 1
NLM_F_REQUEST = 1
#: the kernel answers at once; a reply that does not come is an unknown generation
TIMEOUT = 1.0


def getgen_request(seq: int = 1) -> bytes:
    """nlmsghdr (length, type, flags, seq, pid) + nfgenmsg (family, version, res_id)."""
    kind = NFNL_SUBSYS_NFTABLES << 8 | NFT_MSG_GETGEN
    return struct.pack("=IHHIIBBH", 20, kind, NLM_F_REQUEST, seq, 0, 0, 0, 0)


def parse_newgen(data: bytes) -> int | None:
    """The generation in a ``NFT_MSG_NEWGEN`` reply; None for anything else (an
    NLMSG_ERROR when the kernel has no nf_tables or we lack the permission)."""
    if len(data) < 20:
        return None
    length, kind = struct.unpack_from("=IH", data)
    if kind != NFNL_SUBSYS_NFTABLES << 8 | NFT_MSG_NEWGEN:
        return None
    offset = 20  # nlmsghdr + nfgenmsg
    while offset + 4 <= min(length, len(data)):
        size, attr = struct.unpack_from("=HH", data, offset)
        if size < 4:
            return None
        if attr & 0x3FFF == NFTA_GEN_ID and size >= 8:
            genid: int = struct.unpack_from(">I", data, offset + 4)[0]
            return genid
        offset += (size + 3) & ~3
    return None


def nf_genid(timeout: float = TIMEOUT) -> int | None:
    """The nf_tables generation of the calling thread's network namespace, or None when
    it cannot be read (in ``timeout`` seconds at most). Blocking, but one round trip."""
    try:
        with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER) as sock:
            sock.settimeout(timeout)
            sock.sendto(getgen_request(), (0, 0))
            data = sock.recv(4096)
    except OSError:  # includes the timeout
        return None
    return parse_newgen(data)


def nft_flavour(program: str) -> bool:
    """Is this iptables-nft (its changes are nf_tables transactions)? Judged by the
    program the name resolves to: upstream builds name it ``xtables-nft-multi``, or
    ``iptables-nft-restore`` and the like; anything else (legacy, unknown) is not."""
    return "nft" in os.path.basename(os.path.realpath(program))
