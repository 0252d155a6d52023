"""The transport: a real ``Server`` on a Unix socket in ``tmp_path`` in front of a stub of
the API. No root: the peer is this process's own user, which the policy lets change
things ("rw"), and SO_PEERCRED names it."""

from __future__ import annotations

import json
import os
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, cast

import anyio
import pytest
import structlog.testing
from anyio.abc import SocketStream
from anyio.streams.buffered import BufferedByteReceiveStream

from netagent.agent import protocol
from netagent.agent.access import Policy
from netagent.agent.api import Counters, Peer, Service
from netagent.agent.bus import EventBus
from netagent.agent.errors import NotFound
from netagent.agent.transport import Server

from ..support.wait import LIMIT, until


class StubApi:
    """What the server needs of the API: ``handle``. Records who asked."""

    def __init__(self) -> None:
        self.peers: list[Peer] = []

    async def handle(self, op: str, args: Mapping[str, object], peer: Peer) -> Any:
        self.peers.append(peer)
        if op == "echo":
            return {"args": dict(args)}
        if op == "missing":
            raise NotFound("there is nothing of that name")
        if op == "crash":
            raise RuntimeError("a bug")
        raise AssertionError(f"the stub has no op {op}")


class Running:
    def __init__(self, path: Path, server: Server, api: StubApi) -> None:
        self.path = path
        self.server = server
        self.api = api
        self.bus = server.bus
        self.counters = server.counters

    @asynccontextmanager
    async def client(self) -> AsyncIterator[Client]:
        with anyio.fail_after(LIMIT):
            stream = await anyio.connect_unix(self.path)
        try:
            yield Client(stream)
        finally:
            await stream.aclose()


class Client:
    def __init__(self, stream: SocketStream) -> None:
        self.stream = stream
        self.reader = BufferedByteReceiveStream(stream)

    async def send(self, data: bytes) -> None:
        await self.stream.send(data)

    async def reply(self) -> dict[str, Any]:
        """The next line the server sends, as JSON."""
        with anyio.fail_after(LIMIT):
            line = await self.reader.receive_until(b"\n", 1 << 20)
        msg: dict[str, Any] = json.loads(line)
        return msg

    async def hung_up(self) -> bool:
        """True once the server has closed the connection (with nothing more said)."""
        try:
            with anyio.fail_after(LIMIT):
                extra = await self.reader.receive()
        except (anyio.EndOfStream, anyio.BrokenResourceError, ConnectionError):
            return True
        raise AssertionError(f"the server said more: {extra!r}")


@asynccontextmanager
async def serving(tmp_path: Path, client_timeout: float = 5.0) -> AsyncIterator[Running]:
    api = StubApi()
    server = Server(cast(Service, api), Policy(None, None), EventBus(), Counters(), client_timeout)
    path = tmp_path / "netagent.sock"
    listener = await anyio.create_unix_listener(path)
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(server.serve, listener)
        try:
            yield Running(path, server, api)
        finally:
            tg.cancel_scope.cancel()


def request(op: str, req_id: object = None, **args: object) -> bytes:
    return protocol.encode({"v": 1, "id": req_id, "op": op, "args": args})


# ---- framing ------------------------------------------------------------------------
async def test_one_reply_per_line_in_order(tmp_path: Path) -> None:
    async with serving(tmp_path) as srv, srv.client() as c:
        await c.send(request("echo", 1, a=1) + b"\n  \n" + request("echo", "two"))
        first, second = await c.reply(), await c.reply()
        assert first == {"v": 1, "id": 1, "ok": True, "result": {"args": {"a": 1}}}
        assert (second["id"], second["ok"]) == ("two", True)
        # a request in pieces is still one request
        line = request("echo", 3, b=2)
        await c.send(line[:7])
        await anyio.sleep(0.01)
        await c.send(line[7:])
        assert (await c.reply())["result"] == {"args": {"b": 2}}
        # mistakes are answered, and the connection goes on
        await c.send(b"{not json\n")
        assert (await c.reply())["error"]["code"] == 1001
        await c.send(protocol.encode({"v": 2, "id": 4, "op": "echo"}))
        assert (await c.reply())["error"]["code"] == 1002
        await c.send(request("missing", 5))
        assert (await c.reply())["error"] == {
            "code": 3001,
            "name": "not-found",
            "message": "there is nothing of that name",
        }
        await c.send(request("crash", 6))
        crash = await c.reply()
        assert (crash["id"], crash["error"]["code"]) == (6, 5001)
        await c.send(request("echo", 7))
        assert (await c.reply())["id"] == 7
    peer = srv.api.peers[0]
    assert (peer.pid, peer.uid, peer.gid, peer.access) == (
        os.getpid(),
        os.getuid(),
        os.getgid(),
        "rw",
    )
    assert srv.counters.requests == 6  # the two lines that are no request are not counted


async def test_what_the_fast_encoder_refuses_is_answered_all_the_same(tmp_path: Path) -> None:
    """JSON allows an integer id of any size and a lone surrogate escaped in a string;
    orjson refuses both. The reply goes out (through the standard library) and the
    connection stays (found by the socket fuzzer: the daemon hung up mid-batch)."""
    async with serving(tmp_path) as srv, srv.client() as c:
        big = -1006612061296566206464
        await c.send(b'{"v": 1, "id": %d, "op": "echo", "args": {}}\n' % big)
        assert (await c.reply())["id"] == big
        await c.send(b'{"v": 1, "id": 2, "op": "echo", "args": {"s": "\\ud800"}}\n')
        echoed = await c.reply()
        assert (echoed["id"], echoed["result"]) == (2, {"args": {"s": "\ud800"}})
        await c.send(request("echo", 3))
        assert (await c.reply())["id"] == 3


async def test_a_request_over_the_limit_is_answered_and_disconnected(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(protocol, "MAX_LINE", 1000)
    async with serving(tmp_path) as srv:
        async with srv.client() as c:
            # exactly at the limit: served
            line = request("echo", 1, pad="")
            exact = line[:-2] + b" " * (1000 - len(line) + 1) + b"}\n"
            assert len(exact) == 1001
            await c.send(exact)
            assert (await c.reply())["ok"] is True
        for data in (b'{"op": "echo", "pad": "' + b"x" * 3000, b"[" + b" " * 1500 + b"]\n"):
            async with srv.client() as c:
                await c.send(data)
                reply = await c.reply()
                assert reply["error"]["code"] == 1004
                assert "over 1000 bytes" in reply["error"]["message"]
                assert await c.hung_up()
        await until(lambda: srv.counters.clients == 0, "connections closed")


async def test_a_half_line_at_hang_up_is_answered(tmp_path: Path) -> None:
    async with serving(tmp_path) as srv:
        async with srv.client() as c:
            await c.send(request("echo", 1).rstrip(b"\n"))
            await c.stream.send_eof()
            reply = await c.reply()
            assert reply["error"]["code"] == 1001
            assert "without a newline" in reply["error"]["message"]
            assert await c.hung_up()
        async with srv.client() as c:  # hanging up with nothing pending: no reply
            await c.stream.send_eof()
            assert await c.hung_up()
    assert srv.api.peers == []


async def test_a_silent_client_is_cut_at_the_timeout(tmp_path: Path) -> None:
    async with serving(tmp_path, client_timeout=0.2) as srv:
        for first in (b"", b'{"op": "ec'):  # nothing at all, or half a request
            async with srv.client() as c:
                t0 = time.monotonic()
                if first:
                    await c.send(first)
                reply = await c.reply()
                waited = time.monotonic() - t0
                assert reply["error"]["code"] == 1005
                assert reply["error"]["message"] == "no complete request within 0.2s"
                assert 0.2 <= waited < 2.0
                assert await c.hung_up()
        assert srv.counters.timeouts == 2
        # a client that keeps talking is not cut: the limit is per request
        async with srv.client() as c:
            for n in range(4):
                await c.send(request("echo", n))
                assert (await c.reply())["id"] == n
                await anyio.sleep(0.1)
        assert srv.counters.timeouts == 2


async def test_too_many_clients_are_told_so(tmp_path: Path) -> None:
    async with serving(tmp_path) as srv:
        srv.server.max_clients = 1
        async with srv.client() as first:
            await first.send(request("echo", 1))
            assert (await first.reply())["ok"] is True
            async with srv.client() as second:
                await second.send(request("echo", 2))
                reply = await second.reply()
                assert (reply["id"], reply["error"]["code"]) == (2, 5001)
                assert "its limit" in reply["error"]["message"]
                assert await second.hung_up()
            await first.send(request("echo", 3))
            assert (await first.reply())["id"] == 3


# ---- events -------------------------------------------------------------------------
async def test_events_streams_what_the_bus_publishes_until_the_client_hangs_up(
    tmp_path: Path,
) -> None:
    async with serving(tmp_path) as srv:
        srv.bus.publish("attached", "before anyone watched")
        async with srv.client() as c:
            await c.send(request("events", 9))
            assert await c.reply() == {"v": 1, "id": 9, "ok": True, "result": {"streaming": True}}
            watching = await c.reply()
            assert watching["event"]["type"] == "watching"
            assert len(srv.bus.watchers) == 1
            srv.bus.publish("attached", "tap0 attached to v-net-0", ifname="tap0")
            srv.bus.publish("error", "br/x: failed")
            one, two = await c.reply(), await c.reply()
            assert one["v"] == 1 and one["event"]["ifname"] == "tap0"
            assert (one["event"]["type"], two["event"]["type"]) == ("attached", "error")
        # the client hung up: the stream stops and the watcher is gone
        await until(lambda: not srv.bus.watchers, "the watcher unsubscribed")
        await until(lambda: srv.counters.clients == 0, "the connection closed")
        srv.bus.publish("attached", "nobody watches this")
    assert srv.api.peers == []  # events is the transport's, never the API's


async def test_a_watcher_that_stops_reading_is_dropped_quietly(tmp_path: Path) -> None:
    """A ``ctl events`` watcher that stops reading is cut at the client timeout: counted,
    logged once at info, never as an error with a traceback; the others go on."""
    async with serving(tmp_path, client_timeout=0.2) as srv:
        with structlog.testing.capture_logs() as logs:
            async with srv.client() as silent, srv.client() as reading:
                for c, n in ((silent, 1), (reading, 2)):
                    await c.send(request("events", n))
                    assert (await c.reply())["result"] == {"streaming": True}
                    assert (await c.reply())["event"]["type"] == "watching"
                # until the silent one's socket buffers are full (they are large: a
                # reply of a megabyte goes in one write), then its send waits and is cut
                pad = "x" * 16384
                n = 0
                while srv.counters.timeouts == 0:
                    assert n < 20_000, "the silent watcher was never cut"
                    srv.bus.publish("attached", f"event {n}", pad=pad)
                    while (await reading.reply())["event"]["message"] != f"event {n}":
                        pass
                    n += 1
                    if n % 64 == 0:
                        await anyio.sleep(0.01)
                await until(lambda: len(srv.bus.watchers) == 1, "its watcher gone")
                srv.bus.publish("error", "still streaming")
                assert (await reading.reply())["event"]["message"] == "still streaming"
    errors = [e for e in logs if e["log_level"] in ("error", "critical", "exception")]
    assert errors == []
    cut = [e for e in logs if "did not read" in e["event"]]
    assert len(cut) == 1 and cut[0]["log_level"] == "info"
