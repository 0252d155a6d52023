"""Who may talk to the daemon: the peer's credentials from the kernel, and the policy.

Root and the daemon's own user may do anything; members of the socket group may change
things; members of the read-only group may only look; nobody else gets in. Credentials
come from SO_PEERCRED and SO_PEERGROUPS, as the kernel recorded them at connect().
"""

from __future__ import annotations

import grp
import os
import pwd
import socket
import struct

import structlog
from anyio.abc import SocketAttribute, SocketStream

log = structlog.get_logger("netagent.access")

SO_PEERCRED_LEN = struct.calcsize("3i")


def peer_credentials(stream: SocketStream) -> tuple[int, int, int, frozenset[int] | None]:
    """(pid, uid, gid, supplementary groups) of the connected process, from the kernel.

    SO_PEERCRED gives pid, uid and primary gid as of connect(); SO_PEERGROUPS (Linux 4.13)
    the supplementary groups the process really had then, the same credentials the
    socket file's permissions were checked against. Groups are None without it."""
    import errno

    sock = stream.extra(SocketAttribute.raw_socket)  # noqa: S610 - anyio, not Django
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, SO_PEERCRED_LEN)
    pid, uid, gid = struct.unpack("3i", raw)
    so_peergroups = getattr(socket, "SO_PEERGROUPS", 59)  # 59 on every Linux arch
    groups: frozenset[int] | None = None
    for size in (4 * 256, 4 * 65536):  # NGROUPS_MAX is 65536
        try:
            buf = sock.getsockopt(socket.SOL_SOCKET, so_peergroups, size)
        except OSError as exc:
            if exc.errno == errno.ERANGE:
                continue
            break
        groups = frozenset(struct.unpack(f"{len(buf) // 4}I", buf[: len(buf) // 4 * 4]))
        break
    return pid, uid, gid, groups


def group_gid(name: str | None) -> int | None:
    """The gid of a group given by name (or as a number); None when there is none."""
    if not name:
        return None
    if name.isascii() and name.isdigit():
        return int(name)
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        return None


def _user_gids(uid: int, gid: int, groups: frozenset[int] | None = None) -> set[int]:
    """Every group the peer is in: what SO_PEERGROUPS reported, else the group database."""
    if groups is not None:
        return {gid, *groups}
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        return {gid}
    return set(os.getgrouplist(user, gid))


class Policy:
    """The access a peer gets: "rw", "ro" or None."""

    def __init__(self, socket_group: str | None, readonly_group: str | None) -> None:
        self.socket_group = socket_group
        self.readonly_group = readonly_group
        self.admin_gid = group_gid(socket_group)
        self.readonly_gid = group_gid(readonly_group)
        for setting, name, gid in (
            ("socket_group", socket_group, self.admin_gid),
            ("readonly_group", readonly_group, self.readonly_gid),
        ):
            if name and gid is None:
                log.warning(
                    "group does not exist; its would-be members are refused",
                    setting=setting,
                    group=name,
                )

    def access_for(self, uid: int, gid: int, groups: frozenset[int] | None = None) -> str | None:
        """ "rw" (root, the daemon's own user, the socket group), "ro" (the read-only
        group) or None (anyone else)."""
        if uid == 0 or uid == os.getuid():
            return "rw"
        gids = _user_gids(uid, gid, groups)
        if self.admin_gid is not None and self.admin_gid in gids:
            return "rw"
        if self.readonly_gid is not None and self.readonly_gid in gids:
            return "ro"
        return None

    def refusal(self, uid: int, pid: int) -> str:
        look = f", or to {self.readonly_group!r} to look only" if self.readonly_group else ""
        return (
            f"uid {uid} (pid {pid}) may not use netagent: ask an administrator to add the "
            f"user to the group {self.socket_group!r}{look}"
        )
