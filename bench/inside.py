"""Measurements that must run inside the sandbox (they watch the kernel's events).

Run as ``python bench/inside.py KIND ARGS...``; prints one JSON object. A raw netlink
socket (no pyroute2) watches link events, so the watcher itself adds almost nothing:
times are taken when the kernel's messages reach it.
"""

from __future__ import annotations

import ctypes
import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

RTMGRP_LINK = 0x1
RTMGRP_IPV4_IFADDR = 0x10
RTM_NEWLINK, RTM_DELLINK, RTM_NEWADDR = 16, 17, 20
IFLA_IFNAME, IFLA_MASTER = 3, 10
IFF_UP = 0x1


SO_ATTACH_FILTER = 26
#: classic BPF, run by the kernel on each message before it is queued to the watcher:
#: keep RTM_NEWLINK of family AF_UNSPEC that announces a new interface (ifi_change all
#: ones, as register_netdevice sends it) or one that is up; drop the rest. Loads are
#: big-endian, the message host-order (little-endian here): the type 16 reads as
#: 0x1000, and IFF_UP is bit 0 of the byte at offset 24.
_NEW_OR_UP_LINKS = (
    (0x28, 0, 0, 4),  # ldh [4]            nlmsg_type
    (0x15, 0, 7, 0x1000),  # jeq RTM_NEWLINK, else drop
    (0x30, 0, 0, 16),  # ldb [16]           ifi_family
    (0x15, 0, 5, 0),  # jeq AF_UNSPEC, else drop
    (0x20, 0, 0, 28),  # ld [28]            ifi_change
    (0x15, 2, 0, 0xFFFFFFFF),  # jeq ~0: keep
    (0x30, 0, 0, 24),  # ldb [24]           ifi_flags, low byte
    (0x45, 0, 1, IFF_UP),  # jset IFF_UP, else drop
    (0x06, 0, 0, 0xFFFFFFFF),  # ret: keep all of it
    (0x06, 0, 0, 0),  # ret: drop
)


class Watcher:
    """``new_or_up_only``: the kernel hands over only the messages of links that appear or
    are up (a burst of 1,000 veths is ~7,000 link messages of ~1.7 KB, which cost this
    watcher 0.3 s of CPU, parsed in Python, on a machine of two cores the daemon and
    ``ip`` need; filtered, ~5,000, read for two attributes)."""

    def __init__(self, new_or_up_only: bool = False) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        self.sock.setsockopt(socket.SOL_SOCKET, 33, 64 << 20)  # SO_RCVBUFFORCE
        if new_or_up_only:
            code = _NEW_OR_UP_LINKS
            self._filter = ctypes.create_string_buffer(
                b"".join(struct.pack("HBBI", *insn) for insn in code)
            )
            prog = struct.pack("HL", len(code), ctypes.addressof(self._filter))
            self.sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, prog)
        self.sock.bind((0, RTMGRP_LINK | RTMGRP_IPV4_IFADDR))

    def events(self, timeout: float) -> list[tuple[float, int, int, str | None, int | None, int]]:
        """(time, type, index, ifname, master, flags) for each message of the next
        datagram (empty after timeout)."""
        self.sock.settimeout(timeout)
        out: list[tuple[float, int, int, str | None, int | None, int]] = []
        try:
            data = self.sock.recv(1 << 20)
        except TimeoutError:
            return out
        now = time.monotonic()
        off = 0
        while off + 16 <= len(data):
            length, mtype = struct.unpack_from("IH", data, off)
            if length < 16:
                break
            if mtype in (RTM_NEWLINK, RTM_DELLINK):
                _fam, _pad, _type, index, flags, _change = struct.unpack_from(
                    "BBHiII", data, off + 16
                )
                name, master = None, None
                a = off + 32
                while a + 4 <= off + length:
                    alen, atype = struct.unpack_from("HH", data, a)
                    if alen < 4:
                        break
                    if atype == IFLA_IFNAME:
                        name = data[a + 4 : a + alen].split(b"\0", 1)[0].decode()
                    elif atype == IFLA_MASTER:
                        master = struct.unpack_from("I", data, a + 4)[0]
                    a += (alen + 3) & ~3
                out.append((now, mtype, index, name, master, flags))
            elif mtype == RTM_NEWADDR:
                index = struct.unpack_from("BBBBI", data, off + 16)[4]
                out.append((now, mtype, index, None, None, 0))
            off += (length + 3) & ~3
        return out


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))] if ordered else float("nan")


def ifindex(name: str) -> int:
    return socket.if_nametoindex(name)


def until(
    w: Watcher,
    done: Callable[[tuple[float, int, int, str | None, int | None, int]], bool],
    timeout: float,
) -> float | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for ev in w.events(max(0.01, deadline - time.monotonic())):
            if done(ev):
                return ev[0]
    return None


def attach_single(count: int, bridge: str, prefix: str) -> dict[str, object]:
    """Create interfaces one by one; time from the kernel announcing each to it being
    enslaved to the bridge and up (both as seen by this watcher)."""
    w = Watcher()
    br = ifindex(bridge)
    lat = []
    for i in range(count):
        name = f"{prefix}{i}"
        subprocess.run(
            ["ip", "link", "add", name, "type", "veth", "peer", "name", f"p{prefix}{i}"], check=True
        )
        seen: float | None = None
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            evs = w.events(0.5)
            hit = False
            for t, mtype, _idx, ifn, master, flags in evs:
                if mtype != RTM_NEWLINK or ifn != name:
                    continue
                if seen is None:
                    seen = t
                if master == br and flags & IFF_UP:
                    lat.append(t - seen)
                    hit = True
                    break
            if hit:
                break
        else:
            raise SystemExit(f"{name} was not attached within 5 s")
    lat.sort()
    return {
        "n": len(lat),
        "p50_ms": lat[len(lat) // 2] * 1000,
        "p99_ms": lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000,
        "max_ms": lat[-1] * 1000,
    }


def attach_burst(count: int, bridge: str, prefix: str) -> dict[str, object]:
    """1,000 veth pairs from one ``ip -batch``: time until the last is attached, as a
    ratio to the time the batch took."""
    w = Watcher(new_or_up_only=True)
    br = ifindex(bridge)
    with tempfile.NamedTemporaryFile("w", suffix=".batch", delete=False) as f:
        for i in range(count):
            f.write(f"link add {prefix}{i} type veth peer name p{prefix}{i}\n")
        path = f.name
    attached: set[str] = set()
    born: dict[str, float] = {}
    delays: list[float] = []
    t0 = time.monotonic()
    proc = subprocess.Popen(["ip", "-batch", path])
    t_batch = None
    at_batch_end = 0
    deadline = t0 + 30
    last = t0
    while len(attached) < count and time.monotonic() < deadline:
        for t, mtype, _idx, ifn, master, flags in w.events(0.2):
            if mtype != RTM_NEWLINK or ifn is None or not ifn.startswith(prefix):
                continue
            born.setdefault(ifn, t)
            if master == br and flags & IFF_UP and ifn not in attached:
                attached.add(ifn)
                delays.append(t - born[ifn])
                last = t
        if t_batch is None and proc.poll() is not None:
            t_batch = time.monotonic()
            at_batch_end = len(attached)
    proc.wait()
    if t_batch is None:
        t_batch = time.monotonic()
    os.unlink(path)
    batch_s = t_batch - t0
    total_s = last - t0
    ports = subprocess.run(
        ["ip", "-o", "link", "show", "master", bridge], capture_output=True, text=True, check=True
    ).stdout
    in_kernel = sum(1 for line in ports.splitlines() if f": {prefix}" in line)
    return {
        "n": count,
        "attached": len(attached),
        "in_kernel": in_kernel,
        "batch_s": batch_s,
        "last_attached_s": total_s,
        "ratio": total_s / batch_s,
        "attached_at_batch_end": at_batch_end,
        "delay_p50_ms": pct(delays, 0.5) * 1000,
        "delay_p99_ms": pct(delays, 0.99) * 1000,
    }


def repair_bridge(bridge: str, ports: int) -> dict[str, object]:
    """Delete the bridge; time until it is back with its address and all its ports."""
    w = Watcher()
    t0 = time.monotonic()
    subprocess.run(["ip", "link", "del", bridge], check=True)
    new_index: int | None = None
    enslaved: set[int] = set()
    have_addr = False
    deadline = t0 + 10
    done_at = None
    while time.monotonic() < deadline and done_at is None:
        for t, mtype, idx, ifn, master, _flags in w.events(0.2):
            if mtype == RTM_NEWLINK and ifn == bridge:
                new_index = idx
            elif mtype == RTM_NEWLINK and new_index is not None and master == new_index:
                enslaved.add(idx)
            elif mtype == RTM_NEWADDR and idx == new_index:
                have_addr = True
            if new_index is not None and have_addr and len(enslaved) >= ports:
                done_at = t
                break
    if done_at is None:
        raise SystemExit(f"bridge not repaired in 10 s (addr={have_addr}, ports={len(enslaved)})")
    return {"ports": ports, "repair_ms": (done_at - t0) * 1000}


def connect_p50(host: str, port: int, count: int) -> dict[str, object]:
    """Sequential TCP connects through a forward; p50 of the connect time."""
    times = []
    for _ in range(count):
        s = socket.socket()
        t0 = time.perf_counter()
        s.connect((host, port))
        times.append(time.perf_counter() - t0)
        s.close()
    times.sort()
    return {"n": count, "p50_us": times[count // 2] * 1e6, "p90_us": times[int(count * 0.9)] * 1e6}


def accept_forever(addr: str, port: int) -> None:
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((addr, port))
    srv.listen(4096)
    print("ready", flush=True)
    while True:
        c, _ = srv.accept()
        c.close()


def drift(host: str, port: int, breaker: list[str], timeout: float = 10) -> dict[str, object]:
    """Break the firewall with ``breaker``; time until a connect through the forward
    succeeds again (the daemon notices and repairs), within ``timeout`` seconds."""
    t0 = time.monotonic()
    subprocess.run(breaker, check=True, timeout=60)
    broke = time.monotonic()
    back = until_reachable(host, port, timeout, t0)
    return {**back, "breaker_ms": (broke - t0) * 1000}


def until_reachable(
    host: str, port: int, timeout: float, t0: float | None = None
) -> dict[str, object]:
    """Time until a TCP connect through the forward succeeds again."""
    t0 = time.monotonic() if t0 is None else t0
    while time.monotonic() - t0 < timeout:
        s = socket.socket()
        s.settimeout(0.05)
        try:
            s.connect((host, port))
            return {"back_ms": (time.monotonic() - t0) * 1000}
        except OSError:
            time.sleep(0.002)
        finally:
            s.close()
    raise SystemExit("not reachable again")


if __name__ == "__main__":
    kind, *args = sys.argv[1:]
    if kind == "single":
        result = attach_single(int(args[0]), args[1], args[2])
    elif kind == "burst":
        result = attach_burst(int(args[0]), args[1], args[2])
    elif kind == "repair":
        result = repair_bridge(args[0], int(args[1]))
    elif kind == "connect":
        result = connect_p50(args[0], int(args[1]), int(args[2]))
    elif kind == "serve":
        accept_forever(args[0], int(args[1]))
        raise SystemExit(0)
    elif kind == "drift":  # drift HOST PORT [--timeout S] BREAKER...
        timeout = 10.0
        if args[2] == "--timeout":
            timeout, args = float(args[3]), [*args[:2], *args[4:]]
        result = drift(args[0], int(args[1]), args[2:], timeout)
    else:
        raise SystemExit(f"unknown measurement {kind}")
    print(json.dumps(result))
