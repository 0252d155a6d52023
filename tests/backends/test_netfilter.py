"""``netfilter.KeptSocket``: one socket across calls, a new one after a failure, fresh
sequence numbers (no root: opening a netfilter socket needs no privilege)."""

from __future__ import annotations

import pytest

from netagent.backends.netfilter import KeptSocket


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
