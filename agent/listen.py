"""Where the daemon listens, and the lock that keeps it alone on its state dir.

The socket is passed in by systemd (``LISTEN_FDS``, ``netagent.socket``) or bound here,
0660 from the start, owned by root and the socket group; a read-only group gets a POSIX
ACL entry. A second daemon on the same socket or state dir stops before it touches
anything.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
import struct
from pathlib import Path

import structlog

from . import sdnotify
from .access import group_gid
from .config import Config
from .errors import Internal, StateCorrupt
from .paths import TrustedDir, check_dir, trusted_uids, untrusted

log = structlog.get_logger("netagent.listen")


def grant_socket_access(path: str, gid: int) -> None:
    """Let a second group (the read-only one) connect to the 0660 socket: a POSIX ACL
    entry ``group:GID:rw-`` (connect(2) needs write permission on a socket file). The mode
    stays 0660; written as the ``system.posix_acl_access`` xattr, so no setfacl needed."""
    undefined = 0xFFFFFFFF
    entries = [  # (tag, perm, id), sorted by tag as the kernel requires
        (0x01, 6, undefined),  # ACL_USER_OBJ rw
        (0x04, 6, undefined),  # ACL_GROUP_OBJ rw
        (0x08, 6, gid),  # ACL_GROUP gid rw
        (0x10, 6, undefined),  # ACL_MASK rw
        (0x20, 0, undefined),  # ACL_OTHER ---
    ]
    acl = struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)
    try:
        os.setxattr(path, "system.posix_acl_access", acl)
    except OSError as exc:
        log.warning(
            "cannot let the read-only group reach the socket (no POSIX ACLs here?); "
            "its members will get 'permission denied'",
            socket=path,
            gid=gid,
            error=exc.strerror,
        )


def bind_socket(config: Config) -> tuple[socket.socket, Path | None]:
    """The listening socket, and the path to remove at exit (None when systemd owns it).

    Passed in by systemd (LISTEN_FDS, netagent.socket: SocketMode=0660, SocketGroup=) or
    bound here: created 0660 from the start (umask during bind), owner root, group
    ``socket_group``; the read-only group, if any, gets an ACL entry."""
    readonly_gid = group_gid(config.readonly_group)
    admin_gid = group_gid(config.socket_group)
    passed = sdnotify.listen_fds(unset_environment=True)
    if passed:
        if len(passed) > 1:
            log.warning("systemd passed several sockets; using the first", fds=passed)
        try:
            sock = socket.socket(fileno=passed[0])
        except OSError as exc:
            raise Internal(
                f"fd {passed[0]} from systemd (LISTEN_FDS) is not a socket: {exc.strerror}"
            ) from None
        listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
        if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM or not listening:
            sock.detach()
            raise Internal(
                f"fd {passed[0]} from systemd is not a listening Unix stream "
                "socket; netagent.socket needs ListenStream=/run/netagent/netagent.sock"
            )
        name = sock.getsockname()
        where = name if isinstance(name, str) and name.startswith("/") else None
        if where:
            try:
                check_dir(Path(where).parent, "socket directory", (0, admin_gid or 0))
            except BaseException:
                sock.detach()  # systemd's socket: not ours to close
                raise
        if where and readonly_gid is not None and readonly_gid != admin_gid:
            grant_socket_access(where, readonly_gid)
        if where and where != config.socket:
            log.warning(
                "the socket systemd passed is not the configured one",
                passed=where,
                configured=config.socket,
            )
        log.info("using the socket systemd passed in", fd=passed[0], socket=where or repr(name))
        return sock, None
    path = Path(config.socket)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    groups = (0,) if admin_gid is None else (0, admin_gid)
    with TrustedDir(path.parent, "socket directory", groups) as sockdir:
        return _bind_in(sockdir, path, config, admin_gid, readonly_gid)


def _check_stale(sockdir: TrustedDir, path: Path) -> None:
    """What is at the socket's path before binding: nothing, or a socket a daemon of
    root's left (removed). A link, or a socket someone else made (their listener would
    answer root's requests), stops the start."""
    st = sockdir.lstat(path.name)
    if st is None:
        return
    if stat.S_ISLNK(st.st_mode):
        target = os.readlink(path.name, dir_fd=sockdir.fd)
        raise untrusted(path, "the socket", f"is a symbolic link (to {target})", "rm {path}")
    if not stat.S_ISSOCK(st.st_mode):
        raise Internal(f"{path} exists and is not a socket; remove it or choose another --socket")
    if st.st_uid not in trusted_uids():
        raise untrusted(
            path,
            "the socket",
            f"was made by uid {st.st_uid}, not by root",
            "rm {path}",
            "a listener of theirs there would answer root's requests",
        )
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(5)
        probe.connect(str(path))
        raise Internal(f"another netagent is already listening on {path}")
    except (ConnectionRefusedError, FileNotFoundError):
        with contextlib.suppress(FileNotFoundError):  # left by a daemon that died
            os.unlink(path.name, dir_fd=sockdir.fd)
    finally:
        probe.close()


def _bind_in(
    sockdir: TrustedDir,
    path: Path,
    config: Config,
    admin_gid: int | None,
    readonly_gid: int | None,
) -> tuple[socket.socket, Path | None]:
    _check_stale(sockdir, path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    old_umask = os.umask(0o117)
    try:
        sock.bind(str(path))
    except OSError as exc:
        sock.close()
        raise Internal(f"cannot listen on {path}: {exc.strerror or exc}") from None
    finally:
        os.umask(old_umask)
    try:
        # created by this process: owner = its uid, group = its gid
        made = os.stat(path.name, dir_fd=sockdir.fd, follow_symlinks=False)
        if admin_gid is not None and made.st_gid != admin_gid:
            # needs CAP_CHOWN unless the daemon is in the group (systemd: Group=netagent)
            try:
                os.chown(path.name, -1, admin_gid, dir_fd=sockdir.fd, follow_symlinks=False)
            except PermissionError:
                raise Internal(
                    f"cannot give {path} the group {config.socket_group!r}: run "
                    "the daemon with that group (Group=) or CAP_CHOWN"
                ) from None
        os.chmod(path, 0o660)
        if readonly_gid is not None and readonly_gid != admin_gid:
            grant_socket_access(str(path), readonly_gid)
        sock.listen(1024)
    except BaseException:
        sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path.name, dir_fd=sockdir.fd)
        raise
    return sock, path


def lock_state_dir(state_dir: str) -> int:
    """One daemon per state dir: a second one would interleave journal lines.

    A POSIX record lock (lockf), not flock: it belongs to this process only, so a child
    process (``ip``, ``nft``) never inherits it and keeps it held after ``kill -9``; the
    kernel drops it the moment the process dies. The state dir is checked first (nobody
    but root may write it), and the lock is opened without following a link: a planted
    ``lock`` link to a root-owned file would otherwise be truncated."""
    import fcntl

    directory = Path(state_dir)
    if not os.path.lexists(directory):
        directory.mkdir(parents=True, mode=0o700)
    lock = directory / "lock"
    with TrustedDir(directory, "state directory") as d:
        st = d.lstat(lock.name)
        if st is not None and stat.S_ISDIR(st.st_mode):
            raise StateCorrupt(
                f"{lock} is a directory, not netagent's lock file; nothing was changed: "
                f"move it away (`mv {lock} {lock}.aside`) and start again",
                file=str(lock),
            )
        fd = d.open(lock.name, os.O_RDWR | os.O_CREAT, "lock file")
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
        os.close(fd)
        raise Internal(
            f"another netagent (pid {holder or '?'}) is using the state dir "
            f"{directory}; stop it first"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd
