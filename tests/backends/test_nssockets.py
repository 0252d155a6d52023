"""The per-namespace socket cache (``backends/nssockets.py``): a socket is reused only in
the namespace it was opened in, and one let go of is closed only after its linger (a
request of another task may still wait on it), then for sure. No root."""

from __future__ import annotations

import anyio
import pytest

from netagent.agent.errors import BackendFailed
from netagent.backends.nssockets import NsSockets, ip_tool


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
