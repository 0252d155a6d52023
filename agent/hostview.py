"""What ``doctor`` reads from the host, in one snapshot: the other firewalls
(``backends/hostfw.py``), sockets listening on ports (sock_diag), the sysctls that
make or break a path, and which firewall managers run.

Reading the firewalls means starting ``iptables-*-save`` programs: all of it runs in a
worker thread, with a time limit on each program. The snapshot is pure data afterwards:
``agent/doctor.py`` checks it without touching anything.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from netagent.backends import hostfw, sockdiag

#: /proc/net files: (protocol, family, the state that means "listening or bound")
SOCKET_FILES = (
    ("tcp", 4, "/proc/net/tcp", "0A"),
    ("tcp", 6, "/proc/net/tcp6", "0A"),
    ("udp", 4, "/proc/net/udp", "07"),
    ("udp", 6, "/proc/net/udp6", "07"),
)
#: firewall managers recognized by their process name
MANAGERS = {"firewalld": "firewalld", "ufw": "ufw"}


@dataclass(frozen=True)
class Listener:
    proto: str
    family: int
    address: str
    port: int
    inode: int


@dataclass
class HostView:
    firewall: hostfw.HostFirewall
    listeners: list[Listener] = field(default_factory=list)
    #: sysctl path (``net/ipv4/ip_forward``) -> value, those read
    sysctls: dict[str, str] = field(default_factory=dict)
    #: socket inode -> (pid, process name), for listeners on forwarded ports only
    owners: dict[int, tuple[int, str]] = field(default_factory=dict)
    #: firewall managers running (firewalld, ufw) by process name
    managers: set[str] = field(default_factory=set)
    #: the interface of the IPv4 default route (where outside traffic comes in)
    uplink: str | None = None
    #: when it was read (time.time()) and how long it took
    at: float = 0.0
    ms: float = 0.0


def _hex_address(text: str, family: int) -> str:
    import ipaddress
    import struct

    raw = bytes.fromhex(text)
    if family == 4:
        return str(ipaddress.IPv4Address(struct.pack("<I", struct.unpack(">I", raw)[0])))
    words = struct.unpack(">4I", raw)
    return str(ipaddress.IPv6Address(b"".join(struct.pack("<I", w) for w in words)))


def read_listeners() -> list[Listener]:
    """Listening TCP sockets and bound UDP ones of this network namespace: by sock_diag
    (``backends/sockdiag.py``, a fraction of a millisecond), by ``/proc/net`` where the
    kernel has no sock_diag for a family (about 5 ms a file: it walks the whole
    connection table)."""
    try:
        return [Listener(*b) for b in sockdiag.bound_sockets()]
    except OSError:
        return _proc_listeners()


def listeners_now(proto: str, family: int) -> list[Listener]:
    """:func:`read_listeners` of one protocol and IP version, by sock_diag alone, with a
    short time limit, for the event loop itself (one dump, ~25 us); OSError when
    sock_diag cannot answer (read them all in a thread then)."""
    return [Listener(*b) for b in sockdiag.bound_sockets(timeout=0.2, only=(proto, family))]


def _proc_listeners() -> list[Listener]:
    out: list[Listener] = []
    for proto, family, path, state in SOCKET_FILES:
        try:
            with open(path) as f:
                lines = f.readlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if len(parts) < 10 or parts[3] != state:
                continue
            addr, _, port = parts[1].partition(":")
            try:
                where = _hex_address(addr, family)
                out.append(Listener(proto, family, where, int(port, 16), int(parts[9])))
            except ValueError:
                continue
    return out


def socket_owners(inodes: set[int], deadline: float) -> dict[int, tuple[int, str]]:
    """inode -> (pid, process name), by the ``socket:[inode]`` links in /proc/*/fd;
    stops at ``deadline`` (time.monotonic()) with what it found."""
    found: dict[int, tuple[int, str]] = {}
    if not inodes:
        return found
    wanted = {f"socket:[{i}]": i for i in inodes}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or time.monotonic() > deadline:
            continue
        try:
            fds = os.listdir(f"/proc/{entry.name}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{entry.name}/fd/{fd}")
            except OSError:
                continue
            inode = wanted.get(target)
            if inode is not None and inode not in found:
                try:
                    with open(f"/proc/{entry.name}/comm") as f:
                        name = f.read().strip()
                except OSError:
                    name = "?"
                found[inode] = (int(entry.name), name)
        if len(found) == len(inodes):
            break
    return found


def running_managers() -> set[str]:
    found: set[str] = set()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/comm") as f:
                name = f.read().strip()
        except OSError:
            continue
        if name in MANAGERS:
            found.add(MANAGERS[name])
    return found


def default_route_interface() -> str | None:
    """The interface of the IPv4 default route (/proc/net/route: destination 0)."""
    try:
        with open("/proc/net/route") as f:
            for line in f.readlines()[1:]:
                parts = line.split()
                if len(parts) > 7 and parts[1] == "00000000" and parts[7] == "00000000":
                    return parts[0]
    except OSError:
        pass
    return None


def read_sysctls(paths: Iterable[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for path in paths:
        try:
            with open(f"/proc/sys/{path}") as f:
                out[path] = f.read().strip()
        except OSError:
            continue
    return out


def gather(
    sysctls: list[str],
    ports: set[tuple[str, int]],
    nft_list: Callable[[str], str | None] | None = None,
    owner_budget: float = 0.5,
) -> HostView:
    """The whole snapshot (blocking: run it in a worker thread). ``ports``: the
    (protocol, port) pairs forwarded, whose listeners are named with their pid."""
    t0 = time.monotonic()
    view = HostView(hostfw.read(nft_list))
    view.listeners = read_listeners()
    view.sysctls = read_sysctls(sysctls)
    hit = {lst.inode for lst in view.listeners if (lst.proto, lst.port) in ports}
    view.owners = socket_owners(hit, time.monotonic() + owner_budget)
    view.managers = running_managers()
    view.uplink = default_route_interface()
    view.at = time.time()
    view.ms = round((time.monotonic() - t0) * 1000, 1)
    return view
