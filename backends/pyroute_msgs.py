"""pyroute2's messages read into netagent's records (``Link``, ``Vxlan``) and into the
rows ``ctl show --kernel`` prints; no I/O here, so ``pyroute.py`` keeps only the requests."""

from __future__ import annotations

import os
import socket
from typing import Any

from .netlink import Link, Vxlan

IFF_UP = 0x1


def link_from_msg(msg: Any) -> Link:
    kind = None
    info = msg.get_attr("IFLA_LINKINFO")
    if info is not None:
        kind = info.get_attr("IFLA_INFO_KIND")
    netnsid = msg.get_attr("IFLA_LINK_NETNSID")
    return Link(
        index=msg["index"],
        name=msg.get_attr("IFLA_IFNAME"),
        kind=kind,
        up=bool(msg["flags"] & IFF_UP),
        master=msg.get_attr("IFLA_MASTER"),
        alias=msg.get_attr("IFLA_IFALIAS"),
        group=msg.get_attr("IFLA_GROUP") or 0,
        peer=(msg.get_attr("IFLA_LINK") or None) if kind == "veth" and netnsid is None else None,
        link_netnsid=netnsid,
        mac=msg.get_attr("IFLA_ADDRESS"),
        far_peer=(msg.get_attr("IFLA_LINK") or None)
        if kind == "veth" and netnsid is not None
        else None,
    )


def random_mac() -> str:
    """A random unicast, locally administered MAC address."""
    first = (os.urandom(1)[0] & 0xFC) | 0x02
    return ":".join(f"{b:02x}" for b in (first, *os.urandom(5)))


def drain(sock: Any) -> None:
    """Drop stray ACKs that pyroute2 leaves in the root queue after "get" requests."""
    queue = sock.msg_queue.root
    while not queue.empty():
        queue.get_nowait()
        queue.task_done()


def family(version: int) -> int:
    return socket.AF_INET if version == 4 else socket.AF_INET6


def vxlan_from_msg(msg: Any) -> Vxlan | None:
    """The VXLAN device a link message describes, or None when it is not one."""
    link = link_from_msg(msg)
    info = msg.get_attr("IFLA_LINKINFO")
    data = info.get_attr("IFLA_INFO_DATA") if info is not None else None
    if link.kind != "vxlan" or data is None:
        return None
    return Vxlan(
        link=link,
        vni=data.get_attr("IFLA_VXLAN_ID") or 0,
        port=data.get_attr("IFLA_VXLAN_PORT") or 0,
        local=data.get_attr("IFLA_VXLAN_LOCAL"),
        dev=data.get_attr("IFLA_VXLAN_LINK") or None,
        learning=bool(data.get_attr("IFLA_VXLAN_LEARNING")),
    )


def link_rows(links: list[Link], addr_msgs: list[Any]) -> list[dict[str, Any]]:
    names = {lk.index: lk.name for lk in links}
    addrs: dict[int, list[str]] = {}
    for m in addr_msgs:
        addr = m.get_attr("IFA_ADDRESS")
        if addr:
            addrs.setdefault(m["index"], []).append(f"{addr}/{m['prefixlen']}")
    return [
        {
            "index": lk.index,
            "name": lk.name,
            "kind": lk.kind,
            "state": "up" if lk.up else "down",
            "master": names.get(lk.master) if lk.master else None,
            "addresses": addrs.get(lk.index, []),
            "owner": lk.owner_key,
        }
        for lk in links
    ]


def neigh_rows(msgs: list[Any], names: dict[int, str]) -> list[dict[str, Any]]:
    return [
        {
            "address": m.get_attr("NDA_DST"),
            "lladdr": m.get_attr("NDA_LLADDR"),
            "dev": names.get(m["ifindex"], str(m["ifindex"])),
            "state": _NUD.get(m["state"], str(m["state"])),
        }
        for m in msgs
        if m.get_attr("NDA_DST") is not None
    ]


def route_rows(msgs: list[Any], names: dict[int, str]) -> list[dict[str, Any]]:
    """The main table's routes (254), as ``ip route`` lists them."""
    rows = []
    for m in msgs:
        if (m.get_attr("RTA_TABLE") or m["table"]) != 254:
            continue
        dst = m.get_attr("RTA_DST")
        rows.append(
            {
                "destination": f"{dst}/{m['dst_len']}" if dst else "default",
                "gateway": m.get_attr("RTA_GATEWAY"),
                "dev": names.get(m.get_attr("RTA_OIF")),
                "source": m.get_attr("RTA_PREFSRC"),
                "proto": m["proto"],
            }
        )
    return rows


_NUD = {
    0x01: "INCOMPLETE",
    0x02: "REACHABLE",
    0x04: "STALE",
    0x08: "DELAY",
    0x10: "PROBE",
    0x20: "FAILED",
    0x40: "NOARP",
    0x80: "PERMANENT",
}
