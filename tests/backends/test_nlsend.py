"""``backends/nlsend.py`` without a kernel: the sender thread keeps the order of what is
queued, answers a refused send as the kernel answers a refused request, and runs calls
after the sends before them (no root; the real sockets: ``test_netlink_sockets.py``)."""

from __future__ import annotations

import errno
import struct
import threading
from typing import Any

import anyio
import pytest

from netagent.backends.nlsend import NLMSG_ERROR, RTM_NEWLINK, SendThread, error_answer

HDR = struct.Struct("IHHII")


def request(seq: int, body: bytes = b"\0" * 16) -> bytes:
    return HDR.pack(HDR.size + len(body), RTM_NEWLINK, 5, seq, 0) + body


class Raw:
    """A socket that records what it sent, and from which thread; refuses some."""

    def __init__(self, log: list[Any], refuse: int | None = None) -> None:
        self.log, self.refuse = log, refuse

    def send(self, data: bytes) -> int:
        self.log.append(("sent", HDR.unpack_from(data)[3], threading.current_thread().name))
        if self.refuse is not None:
            raise OSError(self.refuse, "refused")
        return len(data)


class Sock:
    """The pyroute2 socket's side: what it was answered."""

    def __init__(self) -> None:
        self.answers: list[bytes] = []

    def enqueue(self, data: bytes, addr: object) -> None:
        self.answers.append(data)


def test_an_error_answer_is_what_the_kernel_sends() -> None:
    req = request(7, b"x" * 20)
    answer = error_answer(req, errno.EEXIST)
    length, mtype, _flags, seq, _pid = HDR.unpack_from(answer)
    assert (length, mtype, seq) == (len(answer), NLMSG_ERROR, 7)
    assert struct.unpack_from("i", answer, HDR.size)[0] == -errno.EEXIST
    assert answer[HDR.size + 4 :] == req  # the request echoed whole


async def test_the_thread_keeps_the_order_and_answers_a_refused_send() -> None:
    log: list[Any] = []
    sender = SendThread()
    try:
        sock = Sock()
        sender.send(sock, Raw(log), request(1))
        sender.send(sock, Raw(log, refuse=errno.EMSGSIZE), request(2))
        sender.then(log.append, ("then", 0, threading.current_thread().name))

        def answer() -> int:
            log.append(("call", 0, ""))
            return 42

        assert await sender.call(answer) == 42
        with anyio.fail_after(5):
            while not sock.answers:  # the answer is given on the loop, soon after
                await anyio.sleep(0.001)
        assert [e[:2] for e in log] == [("sent", 1), ("sent", 2), ("then", 0), ("call", 0)]
        assert {e[2] for e in log if e[0] == "sent"} == {"netagent-nlsend"}
        assert len(sock.answers) == 1
        assert HDR.unpack_from(sock.answers[0])[3] == 2
        assert struct.unpack_from("i", sock.answers[0], HDR.size)[0] == -errno.EMSGSIZE
    finally:
        sender.close()


async def test_a_call_raises_what_its_function_raised_and_a_bug_does_not_stop_the_thread() -> None:
    sender = SendThread()
    try:

        def missing() -> None:
            raise FileNotFoundError(errno.ENOENT, "no such sysctl")

        with pytest.raises(FileNotFoundError):
            await sender.call(missing)
        sender.then(lambda: 1 / 0)  # logged, and the thread goes on
        assert await sender.call(lambda: "still here") == "still here"
    finally:
        sender.close()
