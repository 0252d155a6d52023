"""The per-namespace socket cache (``backends/nssockets.py``): a socket is reused only in
the namespace it was opened in, and one let go of is closed only after its linger (a
request of another task may still wait on it), then for sure. No root."""

from __future__ import annotations

import os
from pathlib import Path

import anyio
import pytest

from netagent.agent.errors import BackendFailed
from netagent.backends.nssockets import Namespaces, NsSockets, ip_tool


class Sock:
    def __init__(self) -> None:
        self.closed = False

    def close(self) -> None:
        self.closed = True


def test_a_socket_is_reused_only_in_the_namespace_it_was_opened_in() -> None:
    cache = NsSockets(linger=60)
    sock = Sock()
    cache.keep("red", (1, 10), sock)
    assert cache.get("red", (1, 10)) is sock
    assert cache.get("red", (1, 11)) is None  # deleted and made again: another namespace
    assert cache.get("red", None) is None
    assert cache.get("blue", (1, 10)) is None


def test_a_socket_let_go_of_is_closed_after_its_linger_not_before() -> None:
    async def main() -> None:
        cache = NsSockets(linger=0.2)
        old, new = Sock(), Sock()
        cache.keep("red", (1, 10), old)
        cache.keep("red", (1, 11), new)  # the name now names another namespace
        assert cache.get("red", (1, 11)) is new
        await anyio.sleep(0.05)
        assert not old.closed
        with anyio.fail_after(5):
            while not old.closed:
                await anyio.sleep(0.02)
        assert not new.closed

    anyio.run(main)


def test_a_namespace_gone_already_keeps_no_socket() -> None:
    cache = NsSockets(linger=0)
    sock = Sock()
    cache.keep("red", None, sock)
    assert cache.get("red", None) is None
    cache.forget("other")  # closes what is due
    assert sock.closed


def test_close_closes_kept_and_retired_sockets() -> None:
    cache = NsSockets(linger=60)
    kept, retired = Sock(), Sock()
    cache.keep("red", (1, 10), kept)
    cache.retire(retired)
    cache.close()
    assert kept.closed and retired.closed


def test_ip_tool_failures_say_what_the_program_said() -> None:
    with pytest.raises(BackendFailed, match="exit 1"):
        anyio.run(ip_tool, ["false"])
    with pytest.raises(FileExistsError):
        anyio.run(
            ip_tool, ["sh", "-c", "echo 'Cannot create namespace file: File exists' >&2; exit 1"]
        )


def test_namespaces_are_their_files_and_a_replaced_one_is_another(tmp_path: Path) -> None:
    """``Namespaces`` on plain files standing in for nsfs bind mounts: names, identity,
    and the descriptor a veth's peer is moved with refused when the name now points at
    another file than the one the plug was checked against."""
    spaces = Namespaces(tmp_path / "netns", 1.0, lambda raw: raw)
    assert spaces.names() == [] and not spaces.exists("red")
    (tmp_path / "netns").mkdir()
    (tmp_path / "netns" / "red").write_text("")
    (tmp_path / "netns" / "blue").write_text("")
    assert spaces.names() == ["blue", "red"] and spaces.exists("red")
    assert spaces.path(str(tmp_path / "netns" / "red")) == tmp_path / "netns" / "red"
    ident = spaces.identity("red")
    assert ident is not None and spaces.identity("green") is None
    fd = spaces.open_checked("red", ident)
    os.close(fd)
    # another file under the same name (the old one kept: its inode is not reused)
    (tmp_path / "netns" / "red").rename(tmp_path / "red.old")
    (tmp_path / "netns" / "red").write_text("")
    assert spaces.identity("red") != ident
    with pytest.raises(FileNotFoundError, match="another namespace"):
        spaces.open_checked("red", ident)
    assert not spaces.announcing("red")
