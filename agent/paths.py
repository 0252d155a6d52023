"""Paths netagent trusts: the socket directory, the state directory and their files.

Root acts on what it finds there: it answers on the socket, truncates and locks ``lock``,
replays ``journal.jsonl``. Whoever else may write one of those directories (or a
directory above it) can swap the socket for a listener of their own, plant ``lock`` as a
symbolic link to a root-owned file, or append a journal line with a valid checksum. So
the daemon refuses to start unless each of them, and every directory above them, is
owned by root (or the daemon's own user) and writable by nobody else, naming the path and
the command that fixes it. Inside, no symbolic link is ever followed: entries are looked
at with ``lstat`` relative to a directory file descriptor (``openat``-style, so a
directory renamed meanwhile cannot redirect a later step) and opened with
``O_NOFOLLOW``; new files are made with ``O_EXCL`` and renamed into place.

Write permission is read from the mode and from the POSIX ACL (``system.posix_acl_access``:
a named user or group entry can grant write while the mode's group bits show only the
ACL mask). A directory above with the sticky bit (``/tmp``) is accepted: there nobody may
rename or remove an entry they do not own, and the entry below it is checked in turn.
"""

from __future__ import annotations

import contextlib
import errno
import grp
import os
import pwd
import stat
import struct
from collections.abc import Collection, Iterator
from pathlib import Path

from .errors import UntrustedPath

#: tags of a POSIX ACL entry (linux/posix_acl_xattr.h)
_ACL_USER, _ACL_GROUP_OBJ, _ACL_GROUP, _ACL_MASK = 0x02, 0x04, 0x08, 0x10
_ACL_WRITE = 0x02
_NOFOLLOW = os.O_NOFOLLOW | os.O_CLOEXEC


def trusted_uids() -> frozenset[int]:
    """Root, and the daemon's own user (a daemon run as a service user with
    capabilities owns its directories)."""
    return frozenset({0, os.geteuid()})


def _user(uid: int) -> str:
    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid {uid}"


def _group(gid: int) -> str:
    try:
        return f"group {grp.getgrgid(gid).gr_name} ({gid})"
    except KeyError:
        return f"group {gid}"


def _acl(target: int | str) -> tuple[list[tuple[int, int]], bool] | None:
    """The access ACL's write grants: the named entries that grant write after the mask
    (tag, id), and whether the owning group may write (its entry and the mask; the mode's
    group bits show only the mask). None without an ACL."""
    try:
        if isinstance(target, int):
            raw = os.getxattr(target, "system.posix_acl_access")
        else:
            raw = os.getxattr(target, "system.posix_acl_access", follow_symlinks=False)
    except OSError:
        return None  # no ACL (ENODATA), or a file system without them (EOPNOTSUPP)
    entries = [struct.unpack_from("<HHI", raw, off) for off in range(4, len(raw) - 7, 8)]
    mask = next((perm for tag, perm, _ in entries if tag == _ACL_MASK), 0x07)
    named = [
        (tag, ident)
        for tag, perm, ident in entries
        if tag in (_ACL_USER, _ACL_GROUP) and perm & mask & _ACL_WRITE
    ]
    group = any(tag == _ACL_GROUP_OBJ and perm & mask & _ACL_WRITE for tag, perm, _ in entries)
    return named, group


def problem(
    st: os.stat_result,
    acl_target: int | str,
    groups: Collection[int] = (0,),
    sticky_ok: bool = False,
) -> tuple[str, str] | None:
    """What makes an entry untrusted, and the fix as a command template (``{path}``), or
    None. ``groups``: groups that may have write permission; ``sticky_ok``: a directory
    above the one netagent uses, where the sticky bit keeps others from replacing what
    they do not own."""
    if st.st_uid not in trusted_uids():
        return (
            f"is owned by {_user(st.st_uid)}, not root",
            "chown root:root {path}",
        )
    if sticky_ok and stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_ISVTX:
        return None
    if st.st_mode & stat.S_IWOTH:
        return ("is writable by everyone", "chmod o-w {path}")
    acl = _acl(acl_target)
    named, group_writes = acl if acl is not None else ([], bool(st.st_mode & stat.S_IWGRP))
    if group_writes and st.st_gid not in groups:
        return (f"is writable by {_group(st.st_gid)}", "chmod g-w {path}")
    for tag, ident in named:
        if tag == _ACL_USER and ident not in trusted_uids():
            return (
                f"has an ACL entry that lets {_user(ident)} write it",
                f"setfacl -x u:{ident} {{path}}",
            )
        if tag == _ACL_GROUP and ident not in groups:
            return (
                f"has an ACL entry that lets {_group(ident)} write it",
                f"setfacl -x g:{ident} {{path}}",
            )
    return None


_STEER = "whoever can write there could make root act on files of their choosing"


def untrusted(
    path: Path | str, what: str, why: str, fix: str, rationale: str = _STEER
) -> UntrustedPath:
    """The refusal: ``what`` names the path's role ("the state directory"), or ends in
    ``:`` for a path named by its relation ("a directory above the state directory:")."""
    label = f"{what} {path}" if not what.endswith(":") else f"{path} ({what[:-1]})"
    return UntrustedPath(
        f"refusing to start: {label} {why}; {rationale}. Fix it with "
        f"`{fix.format(path=path)}` (and check what is in it), then start again",
        path=str(path),
    )


def wrong_type(path: Path | str, what: str, st: os.stat_result, kind: str) -> UntrustedPath:
    return untrusted(
        path,
        what,
        f"is {describe_type(st)}, not a {kind}",
        "mv {path} {path}.aside",
        "netagent does not use it, and changes nothing, while it is there",
    )


def _chain(path: Path) -> Iterator[Path]:
    """The directories above ``path``, lexically and after resolving links: a link on
    the way is trusted only as far as the directory holding it, its target is checked
    on its own."""
    seen: set[Path] = set()
    for start in (path, Path(os.path.realpath(path))):
        for parent in start.parents:
            if parent not in seen:
                seen.add(parent)
                yield parent


def check_ancestors(path: Path, what: str) -> None:
    for parent in _chain(path):
        label = f"a directory above the {what}:"
        try:
            st = os.stat(parent)
        except OSError as exc:
            raise untrusted(
                parent, label, f"cannot be looked at ({exc.strerror})", "ls -ld {path}"
            ) from None
        bad = problem(st, str(parent), sticky_ok=True)
        if bad is not None:
            raise untrusted(parent, label, *bad)


def check_dir(path: Path, what: str, groups: Collection[int] = (0,)) -> Path:
    """A directory netagent keeps files in (the state dir, the socket's directory): a
    directory with a trusted owner that nobody else may write, nor any directory above
    it. It may itself be a link an administrator made (``/var/lib/netagent`` moved to
    another disk): the link is as safe as the directory holding it, and its target is
    checked the same way. Returns the real path; raises :class:`UntrustedPath` naming
    the path and the fix."""
    path = Path(os.path.abspath(path))
    real = Path(os.path.realpath(path))
    try:
        st = os.stat(real)
    except OSError as exc:
        raise untrusted(
            path,
            what,
            f"cannot be looked at ({exc.strerror})",
            "ls -ld {path}",
            "netagent needs it as a directory",
        ) from None
    if not stat.S_ISDIR(st.st_mode):
        raise wrong_type(path, what, st, "directory")
    bad = problem(st, str(real), groups)
    if bad is not None:
        raise untrusted(real, what, *bad)
    check_ancestors(path, what)
    return real


class TrustedDir:
    """A checked directory, held open: every later step is relative to its descriptor,
    so the checked directory is the one used even if a path above is renamed."""

    def __init__(self, path: Path, what: str, groups: Collection[int] = (0,)) -> None:
        self.path = Path(os.path.abspath(path))
        self.what = what
        self.groups = tuple(groups)
        real = check_dir(self.path, what, groups)
        self.fd = os.open(real, os.O_RDONLY | os.O_DIRECTORY | _NOFOLLOW)
        bad = problem(os.fstat(self.fd), self.fd, groups)
        if bad is not None:  # replaced between the check and the open
            os.close(self.fd)
            raise untrusted(self.path, what, *bad)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> TrustedDir:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- looking ----------------------------------------------------------------------
    def lstat(self, name: str) -> os.stat_result | None:
        """The entry itself (never what a link points to), None when there is none."""
        try:
            return os.stat(name, dir_fd=self.fd, follow_symlinks=False)
        except FileNotFoundError:
            return None

    def check(self, name: str, what: str, kind: str = "file") -> os.stat_result | None:
        """An entry netagent will use: not a link, of the right kind (``file`` or
        ``dir``), trusted owner, nobody else may write it. None when it is absent."""
        st = self.lstat(name)
        if st is None:
            return None
        path = self.path / name
        if stat.S_ISLNK(st.st_mode):
            target = os.readlink(name, dir_fd=self.fd)
            raise untrusted(
                path,
                what,
                f"is a symbolic link (to {target}); netagent never follows links in the "
                f"{self.what}",
                "rm {path}",
            )
        want = stat.S_ISDIR if kind == "dir" else stat.S_ISREG
        if not want(st.st_mode):
            raise wrong_type(path, what, st, kind)
        bad = problem(st, str(path), self.groups)
        if bad is not None:
            raise untrusted(path, what, *bad)
        return st

    def names(self) -> list[str]:
        return os.listdir(self.fd)

    # ---- opening ----------------------------------------------------------------------
    def open(self, name: str, flags: int, what: str, mode: int = 0o600) -> int:
        """``openat(dir, name, flags | O_NOFOLLOW)``, then the same checks on what was
        opened (a regular file, trusted owner, nobody else may write it)."""
        try:
            fd = os.open(name, flags | _NOFOLLOW, mode, dir_fd=self.fd)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.EISDIR):  # a link, a directory
                self.check(name, what)
            raise
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise wrong_type(self.path / name, what, st, "file")
        bad = problem(st, fd, self.groups)
        if bad is not None:
            os.close(fd)
            raise untrusted(self.path / name, what, *bad)
        return fd

    def read(self, name: str, what: str) -> bytes | None:
        """A whole file's bytes, None when it does not exist."""
        try:
            fd = self.open(name, os.O_RDONLY, what)
        except FileNotFoundError:
            return None
        try:
            chunks = []
            while chunk := os.read(fd, 1 << 20):
                chunks.append(chunk)
            return b"".join(chunks)
        finally:
            os.close(fd)

    def write_new(self, name: str, data: bytes, what: str) -> None:
        """Write ``name`` as a new file (``O_EXCL``: never through what someone left
        there), fsynced."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=self.fd)  # a stale temp file (unlink never follows)
        fd = self.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, what)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)

    def replace(self, src: str, dst: str) -> None:
        os.replace(src, dst, src_dir_fd=self.fd, dst_dir_fd=self.fd)

    def write_atomic(self, name: str, data: bytes, what: str) -> None:
        """Temp file + fsync + rename + fsync of the directory: the old or the new
        content after a crash, never a mix."""
        tmp = name + ".tmp"
        self.write_new(tmp, data, what)
        self.replace(tmp, name)
        self.fsync()

    def fsync(self) -> None:
        os.fsync(self.fd)


def describe_type(st: os.stat_result) -> str:
    mode = st.st_mode
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISFIFO(mode):
        return "a named pipe"
    if stat.S_ISREG(mode):
        return "a file"
    return "a device or other special file"
