"""``netfilter.KeptSocket``: one socket across calls, a new one after a failure, fresh
sequence numbers (no root: opening a netfilter socket needs no privilege)."""

from __future__ import annotations

import socket

import pytest

from netagent.backends.netfilter import OPEN, KeptSocket, PortIds


def test_the_socket_is_kept_and_a_failure_inside_closes_it() -> None:
    kept = KeptSocket(1.0)
    try:
        with kept.held() as first:
            pass
        with kept.held() as again:
            assert again is first  # kept across calls
        with pytest.raises(OSError, match="did not answer"), kept.held() as sock:
            raise OSError("the kernel did not answer")
        assert sock.fileno() == -1  # closed with what it left unread
        with kept.held() as other:
            assert other is not first and other.fileno() != -1
    finally:
        kept.close()


def test_sequence_numbers_are_fresh_and_never_zero() -> None:
    kept = KeptSocket(1.0)
    assert kept.next_seqs(3) == 1 and kept.next_seqs() == 4
    kept._seq = 0xFFFFFFFF - 2
    assert kept.next_seqs(5) == 1  # wrapped before it would pass 32 bits


def test_an_open_socket_s_port_id_is_known_until_it_closes() -> None:
    """``netfilter.OPEN`` holds a kept socket's port id while it is open; a follower is
    told when it goes while the socket is still open (its number not free yet)."""
    told: list[tuple[frozenset[int], bool]] = []
    kept = KeptSocket(1.0)
    current: list[socket.socket] = []

    def follow(ids: frozenset[int]) -> None:
        told.append((ids, bool(current) and current[0].fileno() != -1))  # open then?

    OPEN.follow(follow)
    try:
        assert told == [(frozenset(), False)]
        with kept.held() as sock:
            current.append(sock)
            portid = sock.getsockname()[0]
        assert told[-1][0] == frozenset({portid})
        kept.close()
        assert told[-1] == (frozenset(), True)  # told before the close
        assert current[0].fileno() == -1
    finally:
        OPEN.unfollow(follow)
        kept.close()
    with kept.held():
        pass  # nobody follows now: nothing is told
    kept.close()
    assert len(told) == 3


def test_followers_see_every_open_socket() -> None:
    ids = PortIds()
    seen: list[frozenset[int]] = []
    ids.add(7)
    ids.follow(seen.append)
    ids.add(9)
    ids.remove(7)
    ids.remove(7)  # not there: the same set again
    ids.unfollow(seen.append)
    ids.add(11)
    assert seen == [frozenset({7}), frozenset({7, 9}), frozenset({9}), frozenset({9})]
