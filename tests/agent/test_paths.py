"""Untrusted paths, as far as a test needs no second user: modes, ACLs, links and wrong
kinds of files in the state dir and the socket's directory (no root). Ownership by
another user is in ``tests/service/test_untrusted_paths.py``."""

from __future__ import annotations

import os
import socket
import stat
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from netagent.agent import errors as E
from netagent.agent import paths as P
from netagent.agent.config import Config
from netagent.agent.kinds import default_kinds
from netagent.agent.kinds.namespace import Claims
from netagent.agent.listen import bind_socket, lock_state_dir
from netagent.agent.main import check_state_extras
from netagent.agent.store import StateStore


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A private directory with a short path (a socket path must fit in 108 bytes)."""
    d = Path(tempfile.mkdtemp(prefix="na-paths-"))
    try:
        yield d
    finally:
        for root, dirs, names in os.walk(d, topdown=False):
            for n in names:
                os.unlink(os.path.join(root, n))
            for n in dirs:
                p = os.path.join(root, n)
                os.unlink(p) if os.path.islink(p) else os.rmdir(p)
        os.rmdir(d)


def test_a_state_dir_others_may_write_is_refused(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    os.chmod(state, 0o702)
    with pytest.raises(E.UntrustedPath, match=r"state directory .*/state is writable by everyone"):
        lock_state_dir(str(state))
    assert not (state / "lock").exists()
    if os.geteuid() == 0:
        os.chown(state, -1, 65534)  # a group that is not root's
    os.chmod(state, 0o720)
    with pytest.raises(E.UntrustedPath, match=r"is writable by group") as exc:
        StateStore(state, default_kinds()).load()
    assert f"`chmod g-w {state}`" in exc.value.message
    assert exc.value.exit_status == 6


def test_a_directory_above_that_others_may_write_is_refused(tmp_path: Path) -> None:
    above = tmp_path / "open"
    above.mkdir()
    os.chmod(above, 0o777)
    with pytest.raises(E.UntrustedPath, match=r"open \(a directory above the state directory\)"):
        lock_state_dir(str(above / "state"))
    # with the sticky bit (as /tmp) nobody may replace what is not theirs: accepted
    os.chmod(above, 0o1777)
    os.close(lock_state_dir(str(above / "state")))


def test_an_acl_entry_granting_write_is_refused(tmp_path: Path) -> None:
    """The mode says 0770 root:root, but a named user may write through the ACL."""
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    entries = [
        (0x01, 7, 0xFFFFFFFF),
        (0x02, 7, 54321),
        (0x04, 5, 0xFFFFFFFF),
        (0x10, 7, 0xFFFFFFFF),
        (0x20, 0, 0xFFFFFFFF),
    ]
    acl = struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)
    try:
        os.setxattr(state, "system.posix_acl_access", acl)
    except OSError as why:
        pytest.skip(f"no POSIX ACLs here: {why.strerror}")
    os.chmod(state, 0o700 | (os.stat(state).st_mode & 0o070))
    with pytest.raises(E.UntrustedPath, match=r"ACL entry that lets uid 54321 write it") as exc:
        lock_state_dir(str(state))
    assert f"setfacl -x u:54321 {state}" in exc.value.message


def test_a_planted_lock_link_is_never_followed(tmp_path: Path) -> None:
    precious = tmp_path / "precious"
    precious.write_text("root's own file\n")
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    (state / "lock").symlink_to(precious)
    with pytest.raises(E.UntrustedPath, match=r"lock is a symbolic link \(to .*precious\)") as exc:
        lock_state_dir(str(state))
    assert f"`rm {state / 'lock'}`" in exc.value.message
    assert precious.read_text() == "root's own file\n"


@pytest.mark.parametrize("name", ["journal.jsonl", "state.json", "state.json.prev"])
def test_a_state_file_that_is_a_link_is_refused(tmp_path: Path, name: str) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_bytes(b"")
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    (state / name).symlink_to(elsewhere)
    with pytest.raises(E.UntrustedPath, match=rf"{name} is a symbolic link"):
        StateStore(state, default_kinds()).load()


def test_a_journal_others_may_write_is_refused(tmp_path: Path) -> None:
    store = StateStore(tmp_path, default_kinds())
    store.load()
    store.close()
    os.chmod(tmp_path / "journal.jsonl", 0o606)
    with pytest.raises(E.UntrustedPath, match=r"journal\.jsonl is writable by everyone"):
        StateStore(tmp_path, default_kinds()).load()


def test_claims_and_the_marker_are_checked(tmp_path: Path) -> None:
    (tmp_path / "claims").mkdir(mode=0o700)
    check_state_extras(tmp_path)
    (tmp_path / "claims" / "ns-theirs").symlink_to("/etc/hostname")
    with pytest.raises(E.UntrustedPath, match=r"ns-theirs is a symbolic link"):
        check_state_extras(tmp_path)
    # and a link there claims nothing: their namespace is never taken for netagent's
    assert Claims(tmp_path / "claims").claimed("theirs") is False
    Claims(tmp_path / "claims").claim("mine")
    assert Claims(tmp_path / "claims").claimed("mine") is True
    (tmp_path / "claims" / "ns-theirs").unlink()
    (tmp_path / "firewall-backend").symlink_to("/etc/hostname")
    with pytest.raises(E.UntrustedPath, match=r"firewall-backend is a symbolic link"):
        check_state_extras(tmp_path)


def config(sock: Path) -> Config:
    return Config(socket=str(sock), state_dir="/nonexistent", socket_group=None)


def test_a_socket_directory_others_may_write_is_refused(short_dir: Path) -> None:
    os.chmod(short_dir, 0o777)
    with pytest.raises(E.UntrustedPath, match=r"socket directory .* is writable by everyone"):
        bind_socket(config(short_dir / "s.sock"))
    assert not (short_dir / "s.sock").exists()


def test_a_link_at_the_socket_path_is_refused(short_dir: Path) -> None:
    (short_dir / "s.sock").symlink_to(short_dir / "theirs.sock")
    with pytest.raises(E.UntrustedPath, match=r"the socket .*s\.sock is a symbolic link"):
        bind_socket(config(short_dir / "s.sock"))


def test_a_stale_socket_of_the_daemon_is_replaced(short_dir: Path) -> None:
    path = short_dir / "s.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # left by a daemon that died
    sock, owned = bind_socket(config(path))
    try:
        assert owned == path and stat.S_ISSOCK(os.lstat(path).st_mode)
        assert stat.S_IMODE(os.lstat(path).st_mode) == 0o660
    finally:
        sock.close()


def test_describe_what_is_not_a_file(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo")
    assert P.describe_type(os.lstat(tmp_path / "fifo")) == "a named pipe"
    d = P.TrustedDir(tmp_path, "state directory")
    try:
        with pytest.raises(E.UntrustedPath, match=r"fifo is a named pipe, not a file"):
            d.check("fifo", "state file")
    finally:
        d.close()
