"""Named network namespaces made and removed in the daemon, as ``ip netns add/del`` do.

``ip netns add`` is a child process of a ~150 MB daemon: ~3-5 ms of a ~9 ms ``ns add``
here. Its work is four system calls, done here the way iproute2 does them
(``ip/ipnetns.c``):

1. make the namespace directory a shared mount point (bind it onto itself first if it
   is not a mount point), so a namespace bound in it shows in every mount namespace
   that shares it;
2. create the name's file with ``O_EXCL``: of two creators of one name (someone's
   ``ip netns add`` racing ours) exactly one wins, and the other gets ``EEXIST``;
3. ``unshare(CLONE_NEWNET)`` in a short-lived thread of its own (the call changes only
   the calling thread, and that thread ends, so no thread of the daemon is left in the
   new namespace);
4. bind ``/proc/thread-self/ns/net`` onto the file (``/proc/self`` would name the main
   thread's namespace).

The thread opens the namespace's rtnetlink socket before it ends, which spares the
first request inside a thread hop of its own. Removing is ``umount2(MNT_DETACH)`` and
``unlink``. Where a step is refused (no ``CAP_SYS_ADMIN``, a kernel without
``thread-self``), the caller falls back to the ``ip`` program.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import socket
import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

CLONE_NEWNET = 0x40000000
MS_BIND, MS_REC, MS_SHARED = 0x1000, 0x4000, 1 << 20
MNT_DETACH = 2

_libc: ctypes.CDLL | None = None


def _c() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(source: str, target: str, flags: int) -> int:
    libc = _c()
    return int(libc.mount(source.encode(), target.encode(), b"none", flags, None))


def in_own_thread(name: str, work: Callable[[], T]) -> T:
    """``work()`` in a short-lived thread of its own, which ends with it: what it does to
    its thread (``unshare``, ``setns``: they change the calling thread only) ends there.
    Its result, or what it raised."""
    result: list[T | BaseException] = []

    def run() -> None:
        try:
            result.append(work())
        except BaseException as exc:
            result.append(exc)

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    thread.join()
    got = result[0]
    if isinstance(got, BaseException):
        raise got
    return got


def enter(path: str) -> None:
    """The calling thread into the network namespace bound at ``path``."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        _check(_c().setns(fd, CLONE_NEWNET), f"setns {path}")
    finally:
        os.close(fd)


#: held while the directory is made a mount point: two namespaces made at once (a wave of
#: them, ``agent/waves.py``) would bind it twice, the second mount hiding the first's
_SHARING = threading.Lock()


def share_dir(directory: str) -> None:
    """The namespace directory as a shared mount point (what ``ip netns add`` makes)."""
    with _SHARING:
        _share_dir(directory)


def _share_dir(directory: str) -> None:
    os.makedirs(directory, mode=0o755, exist_ok=True)
    if _mount("", directory, MS_SHARED | MS_REC) == 0:
        return
    if ctypes.get_errno() != errno.EINVAL:  # EINVAL: not a mount point yet
        _check(-1, f"making {directory} a shared mount")
    _check(_mount(directory, directory, MS_BIND | MS_REC), f"binding {directory}")
    _check(_mount("", directory, MS_SHARED | MS_REC), f"making {directory} a shared mount")


#: the defaults every interface made in a namespace of netagent's takes: coming up, it
#: announces its addresses (a gratuitous ARP, an unsolicited neighbour advertisement),
#: so a re-created veth is reachable at once and no per-interface sysctl is needed
ANNOUNCE_DEFAULTS = {
    "net/ipv4/conf/default/arp_notify": "1",
    "net/ipv6/conf/default/ndisc_notify": "1",
}


def announce_by_default() -> bool:
    """Set :data:`ANNOUNCE_DEFAULTS` in the calling thread's network namespace (its
    /proc/sys/net); False when one cannot be (IPv6 disabled, say)."""
    ok = True
    for key, value in ANNOUNCE_DEFAULTS.items():
        try:
            with open(f"/proc/sys/{key}", "w") as f:
                f.write(value)
        except OSError:
            ok = False
    return ok


def add(path: str) -> socket.socket:
    """A new network namespace bound at ``path``, and a rtnetlink socket inside it; its
    interfaces announce themselves (:data:`ANNOUNCE_DEFAULTS`). FileExistsError when the
    name is taken (by anyone, at any moment)."""
    share_dir(os.path.dirname(path))
    fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0)
    os.close(fd)

    def make() -> socket.socket:
        _check(_c().unshare(CLONE_NEWNET), "unshare(CLONE_NEWNET)")
        own = f"/proc/self/task/{threading.get_native_id()}/ns/net"
        _check(_mount(own, path, MS_BIND), f"binding the new namespace to {path}")
        announce_by_default()
        # SOCK_DGRAM (netlink takes it as SOCK_RAW): pyroute2 takes fileno= only so
        return socket.socket(
            socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE
        )

    try:
        return in_own_thread("netagent-netns", make)
    except BaseException:
        _c().umount2(path.encode(), MNT_DETACH)
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise


def delete(path: str) -> None:
    """Unbind and remove a namespace's name (``ip netns del``); the kernel frees the
    namespace once nothing else holds it."""
    if _c().umount2(path.encode(), MNT_DETACH) != 0:
        err = ctypes.get_errno()
        if err == errno.ENOENT:
            raise FileNotFoundError(err, f"namespace {path} does not exist")
        if err != errno.EINVAL:  # EINVAL: not mounted (a half-made name): unlink it
            raise OSError(err, f"unmounting {path}: {os.strerror(err)}")
    os.unlink(path)
