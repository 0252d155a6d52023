"""Run inside a sandbox by ``bench/cluster.py``: simulated hosts' leases written into
etcd, and a route listener that says when the kernel added or removed a route.

``write ENDPOINTS PREFIX FIRST COUNT TTL``  COUNT simulated hosts' records under one
    lease (subnets FIRST, FIRST+1, ... of /24), written in transactions of 100, then
    wait for a line on stdin: "put N", "delete N" (one more host, or one gone, printing
    the time of the write), "revoke", "quit".
``route SUBNET new|del``  print "ready", then the time.time() of the first RTM_NEWROUTE /
    RTM_DELROUTE for SUBNET in this network namespace.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import socket
import struct
import sys
import time

RTMGRP_IPV4_ROUTE = 0x40
TXN_OPS = 100
RTM_NEWROUTE, RTM_DELROUTE = 24, 25


def record(n: int, subnet: ipaddress.IPv4Network) -> bytes:
    mac = "0a:58:" + ":".join(f"{b:02x}" for b in subnet.network_address.packed)
    underlay = str(ipaddress.IPv4Address("100.64.0.0") + n)  # never sent to: no traffic
    return json.dumps(
        {
            "version": 1,
            "node": f"sim{n}",
            "host": f"sim{n}",
            "underlay": underlay,
            "vtep_mac": mac,
            "vni": 1,
            "port": 4789,
        },
        sort_keys=True,
    ).encode()


async def write(endpoints: str, prefix: str, first: str, count: int, ttl: int) -> None:
    from etcd3aio import Etcd3Client

    base = ipaddress.IPv4Network(first)

    def subnet(n: int) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network((int(base.network_address) + n * 256, 24))

    def key(n: int) -> str:
        return prefix + str(subnet(n)).replace("/", "-")

    async with Etcd3Client(endpoints.split(",")) as c:
        assert c.kv is not None and c.lease is not None
        kv = c.kv
        lease = (await c.lease.grant(ttl, timeout=5)).ID
        t0 = time.time()
        # in transactions of TXN_OPS puts (etcd's limit is 128 a transaction): the
        # leases arrive as a burst, the way a host joining a cluster of this size finds
        # them listed, and the figure is the host's, not etcd's pace of single puts
        # (64 at a time: ~1.5 s for 1,000 on this machine)
        for lo in range(0, count, TXN_OPS):
            ops = [
                kv.txn_op_put(key(n), record(n, subnet(n)), lease=lease)
                for n in range(lo, min(lo + TXN_OPS, count))
            ]
            await kv.txn([], ops, timeout=10)
        print(json.dumps({"begin": t0, "end": time.time()}), flush=True)
        loop = asyncio.get_running_loop()
        while True:
            line = (await loop.run_in_executor(None, sys.stdin.readline)).split()
            if not line or line[0] == "quit":
                return
            if line[0] == "revoke":
                t = time.time()
                await c.lease.revoke(lease, timeout=10)
                print(json.dumps({"at": t}), flush=True)
                return
            n = int(line[1])
            t = time.time()
            if line[0] == "put":
                await kv.put(key(n), record(n, subnet(n)), lease=lease, timeout=10)
            else:
                await kv.delete(key(n), timeout=10)
            print(json.dumps({"at": t, "subnet": str(subnet(n))}), flush=True)


def route(subnet: str, which: str) -> None:
    net = ipaddress.IPv4Network(subnet)
    want = RTM_NEWROUTE if which == "new" else RTM_DELROUTE
    s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    s.bind((0, RTMGRP_IPV4_ROUTE))
    s.settimeout(30)
    print("ready", flush=True)
    while True:
        data = s.recv(1 << 20)
        t = time.time()
        off = 0
        while off + 16 <= len(data):
            length, mtype = struct.unpack_from("IH", data, off)
            if length < 16:
                break
            if mtype == want:
                _f, dst_len = struct.unpack_from("BB", data, off + 16)
                a = off + 16 + 12
                while a + 4 <= off + length:
                    alen, atype = struct.unpack_from("HH", data, a)
                    if alen < 4:
                        break
                    dst = data[a + 4 : a + 8]  # RTA_DST
                    if (
                        atype == 1
                        and dst_len == net.prefixlen
                        and dst == net.network_address.packed
                    ):
                        print(json.dumps({"at": t}), flush=True)
                        return
                    a += (alen + 3) & ~3
            off += (length + 3) & ~3


if __name__ == "__main__":
    if sys.argv[1] == "write":
        asyncio.run(
            write(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), int(sys.argv[6]))
        )
    else:
        route(sys.argv[2], sys.argv[3])
