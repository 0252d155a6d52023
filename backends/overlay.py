"""Raw rtnetlink for the VXLAN overlay's per-peer entries: a route, a neighbour entry and
an FDB entry per peer, read and written with point requests, pipelined.

A host in a cluster of 1,000 has ~1,000 routes, neighbour and FDB entries on its VXLAN
device. Dumping them to check one peer would cost a parse of 3,000 messages (pyroute2:
~25 us each), so one peer is checked with three *point* lookups instead, all three sent
at once on :class:`~netagent.backends.rtnl.Requests`' socket (one round trip):

* the route: ``RTM_GETROUTE`` with ``RTM_F_FIB_MATCH`` (``ip route get fibmatch``,
  kernel >= 4.13) answers with the FIB entry a lookup of the peer's VTEP address
  matches, so its prefix, gateway, device, flags and protocol can be compared;
* the neighbour: ``RTM_GETNEIGH`` for one address on one device (``ip neigh get``,
  kernel >= 4.20);
* the FDB entry: ``RTM_GETNEIGH`` of family ``AF_BRIDGE`` with ``NTF_SELF`` and the MAC
  (``bridge fdb get``, kernel >= 5.0): the VXLAN driver's ``ndo_fdb_get`` answers with
  the entry's first remote, which is the only one netagent ever gives it.

Writes are "create or replace" (``NLM_F_CREATE | NLM_F_REPLACE``): a route replace, a
neighbour replace to ``NUD_PERMANENT``, and an FDB replace, which for a VXLAN device with
a unicast MAC swaps the entry's remote (``vxlan_fdb_replace``), so a peer whose underlay
address changed keeps exactly one remote. Routes carry netagent's protocol number.
Checked on kernel 6.18 (see ``docs/cluster.md``).
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct

from .netlink import RTPROT_NETAGENT, PeerEntries
from .rtnl import NLM_F_ACK, NLM_F_REQUEST, Requests

RTM_NEWROUTE, RTM_DELROUTE, RTM_GETROUTE = 24, 25, 26
RTM_NEWNEIGH, RTM_DELNEIGH, RTM_GETNEIGH = 28, 29, 30
NLM_F_REPLACE, NLM_F_CREATE = 0x100, 0x400
RTA_DST, RTA_OIF, RTA_GATEWAY, RTA_TABLE = 1, 4, 5, 15
NDA_DST, NDA_LLADDR = 1, 2
RTM_F_FIB_MATCH = 0x2000
RTNH_F_ONLINK = 0x4
RT_TABLE_MAIN = 254
RTN_UNICAST = 1
RT_SCOPE_UNIVERSE, RT_SCOPE_NOWHERE = 0, 255
NUD_PERMANENT = 0x80
NTF_SELF = 0x02
#: the absent answers of a point lookup or a delete
ABSENT = (errno.ENOENT, errno.ESRCH, errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ENODEV)

_NLMSGHDR = struct.Struct("IHHII")
_RTMSG = struct.Struct("BBBBBBBBI")
_NDMSG = struct.Struct("BxxxiHBB")
_RTATTR = struct.Struct("HH")


def _attr(kind: int, data: bytes) -> bytes:
    length = _RTATTR.size + len(data)
    return _RTATTR.pack(length, kind) + data + b"\0" * (-length % 4)


def _mac(text: str) -> bytes:
    return bytes(int(b, 16) for b in text.split(":"))


def _mac_text(raw: bytes) -> str:
    return ":".join(f"{b:02x}" for b in raw)


def _attrs(data: bytes, start: int) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    while start + 4 <= len(data):
        length, kind = _RTATTR.unpack_from(data, start)
        if length < 4:
            break
        out[kind & 0x3FFF] = data[start + 4 : start + length]
        start += (length + 3) & ~3
    return out


class Overlay:
    """Point requests for peers on one VXLAN device, on a :class:`Requests` socket."""

    def __init__(self, requests: Requests) -> None:
        self.requests = requests

    # ---- messages -------------------------------------------------------------------
    @staticmethod
    def _route(
        mtype: int, flags: int, index: int, subnet: ipaddress.IPv4Network, via: str | None
    ) -> tuple[int, int, bytes]:
        scope = RT_SCOPE_NOWHERE if mtype == RTM_DELROUTE else RT_SCOPE_UNIVERSE
        head = _RTMSG.pack(
            socket.AF_INET,
            subnet.prefixlen,
            0,
            0,
            RT_TABLE_MAIN,
            RTPROT_NETAGENT,
            scope,
            RTN_UNICAST,
            RTNH_F_ONLINK if via else 0,
        )
        body = head + _attr(RTA_DST, subnet.network_address.packed)
        body += _attr(RTA_OIF, struct.pack("I", index))
        if via is not None:
            body += _attr(RTA_GATEWAY, ipaddress.IPv4Address(via).packed)
        return mtype, flags, body

    @staticmethod
    def _neigh(
        mtype: int, flags: int, index: int, ip: str, mac: str | None
    ) -> tuple[int, int, bytes]:
        state = NUD_PERMANENT if mtype == RTM_NEWNEIGH else 0
        body = _NDMSG.pack(socket.AF_INET, index, state, 0, 0)
        body += _attr(NDA_DST, ipaddress.IPv4Address(ip).packed)
        if mac is not None:
            body += _attr(NDA_LLADDR, _mac(mac))
        return mtype, flags, body

    @staticmethod
    def _fdb(
        mtype: int, flags: int, index: int, mac: str, dst: str | None
    ) -> tuple[int, int, bytes]:
        state = NUD_PERMANENT if mtype == RTM_NEWNEIGH else 0
        body = _NDMSG.pack(socket.AF_BRIDGE, index, state, NTF_SELF, 0)
        body += _attr(NDA_LLADDR, _mac(mac))
        if dst is not None:
            body += _attr(NDA_DST, ipaddress.IPv4Address(dst).packed)
        return mtype, flags, body

    # ---- parsing --------------------------------------------------------------------
    @staticmethod
    def _parse_route(raw: bytes, index: int, subnet: ipaddress.IPv4Network) -> str | None:
        body = _NLMSGHDR.size
        _fam, dst_len, _s, _t, _table, proto, _sc, _ty, flags = _RTMSG.unpack_from(raw, body)
        attrs = _attrs(raw, body + _RTMSG.size)
        dst = attrs.get(RTA_DST)
        oif = attrs.get(RTA_OIF)
        gw = attrs.get(RTA_GATEWAY)
        if (
            dst_len != subnet.prefixlen
            or dst != subnet.network_address.packed
            or oif is None
            or struct.unpack("I", oif[:4])[0] != index
            or proto != RTPROT_NETAGENT
            or not flags & RTNH_F_ONLINK
            or gw is None
        ):
            return None
        return str(ipaddress.IPv4Address(gw))

    @staticmethod
    def _parse_neigh(raw: bytes) -> str | None:
        _fam, _index, state, _flags, _type = _NDMSG.unpack_from(raw, _NLMSGHDR.size)
        mac = _attrs(raw, _NLMSGHDR.size + _NDMSG.size).get(NDA_LLADDR)
        if mac is None or not state & NUD_PERMANENT:
            return None
        return _mac_text(mac)

    @staticmethod
    def _parse_fdb(raw: bytes) -> str | None:
        dst = _attrs(raw, _NLMSGHDR.size + _NDMSG.size).get(NDA_DST)
        return None if dst is None or len(dst) != 4 else str(ipaddress.IPv4Address(dst))

    # ---- requests -------------------------------------------------------------------
    async def get(
        self, index: int, subnet: ipaddress.IPv4Network, vtep: str, mac: str
    ) -> PeerEntries:
        lookup = _RTMSG.pack(socket.AF_INET, 32, 0, 0, 0, 0, 0, 0, RTM_F_FIB_MATCH)
        lookup += _attr(RTA_DST, subnet.network_address.packed)
        results = await self.requests.many(
            [
                (RTM_GETROUTE, NLM_F_REQUEST, lookup),
                self._neigh(RTM_GETNEIGH, NLM_F_REQUEST, index, vtep, None),
                self._fdb(RTM_GETNEIGH, NLM_F_REQUEST, index, mac, None),
            ]
        )
        parsed: list[str | None] = []
        for n, r in enumerate(results):
            if isinstance(r, OSError):
                raise r
            if isinstance(r, int):
                if r not in ABSENT and r != 0:
                    raise OSError(r, os.strerror(r))
                parsed.append(None)
            elif n == 0:
                parsed.append(self._parse_route(r, index, subnet))
            elif n == 1:
                parsed.append(self._parse_neigh(r))
            else:
                parsed.append(self._parse_fdb(r))
        return PeerEntries(*parsed)

    async def _run(self, requests: list[tuple[int, int, bytes]], absent_ok: bool) -> None:
        for r in await self.requests.many(requests):
            if isinstance(r, OSError):
                raise r
            if isinstance(r, int) and r and not (absent_ok and r in ABSENT):
                raise OSError(r, os.strerror(r))

    async def set(
        self,
        index: int,
        subnet: ipaddress.IPv4Network,
        vtep: str,
        mac: str,
        underlay: str,
        what: tuple[bool, bool, bool] = (True, True, True),
    ) -> None:
        """Create or replace the route, the neighbour and the FDB entry (``what`` picks
        which), all at once."""
        flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE
        requests = []
        if what[0]:
            requests.append(self._route(RTM_NEWROUTE, flags, index, subnet, vtep))
        if what[1]:
            requests.append(self._neigh(RTM_NEWNEIGH, flags, index, vtep, mac))
        if what[2]:
            requests.append(self._fdb(RTM_NEWNEIGH, flags, index, mac, underlay))
        if requests:
            await self._run(requests, absent_ok=False)

    async def delete(self, index: int, subnet: ipaddress.IPv4Network, vtep: str, mac: str) -> None:
        """Remove the route, the neighbour and the FDB entry; absent ones are fine."""
        flags = NLM_F_REQUEST | NLM_F_ACK
        await self._run(
            [
                self._route(RTM_DELROUTE, flags, index, subnet, None),
                self._neigh(RTM_DELNEIGH, flags, index, vtep, None),
                self._fdb(RTM_DELNEIGH, flags, index, mac, None),
            ],
            absent_ok=True,
        )

    async def delete_fdb(self, index: int, mac: str) -> None:
        await self._run(
            [self._fdb(RTM_DELNEIGH, NLM_F_REQUEST | NLM_F_ACK, index, mac, None)], absent_ok=True
        )
