"""The transport: the socket's framing, limits and clients.

A task per connection, each checked (SO_PEERCRED, ``agent/access.py``) and bounded in
time, so a silent, slow or hostile client holds up nobody but itself. One JSON object
per line in, one per line out (``agent/protocol.py``); ``events`` streams. What a
request means is the API's business (``agent/api.py``); one log line per request.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from typing import Any

import anyio
import orjson
import structlog
from anyio.abc import SocketStream
from anyio.streams.buffered import BufferedByteReceiveStream

from . import protocol
from .access import Policy, peer_credentials
from .api import Counters, Peer, Service
from .bus import EventBus
from .errors import (
    BadRequest,
    Internal,
    NetagentError,
    PermissionDenied,
    RequestTimeout,
    RequestTooLarge,
)
from .probe import NOOP, Probe

log = structlog.get_logger("netagent")


def encode(msg: dict[str, Any]) -> bytes:
    """One reply line. orjson: ``show`` of 2,000 intents is ~600 KB of JSON, 16 ms with
    the standard library, ~1.5 ms with orjson (the CLI decodes it with the standard
    library: it is JSON, newlines in strings escaped). What orjson refuses and JSON
    allows (an integer id beyond 64 bits, a lone surrogate echoed from a request) goes
    through the standard library: every reply is sent, never the connection dropped."""
    try:
        return orjson.dumps(msg) + b"\n"
    except TypeError:
        return json.dumps(msg, separators=(",", ":"), default=str).encode() + b"\n"


class Server:
    """The command server: a task per connection, each checked (SO_PEERCRED) and bounded
    in time, so a silent, slow or hostile client holds up nobody but itself."""

    def __init__(
        self,
        api: Service,
        policy: Policy,
        bus: EventBus,
        counters: Counters,
        client_timeout: float,
        probe: Probe = NOOP,
    ) -> None:
        self.api = api
        self.probe = probe
        self.policy = policy
        self.bus = bus
        self.counters = counters
        self.client_timeout = client_timeout
        self.max_clients = self._max_clients()

    @staticmethod
    def _max_clients() -> int:
        """Connections served at once: what the fd limit allows, less a reserve for the
        work itself (nft/ip pipes, namespace sockets, the journal)."""
        import resource

        soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft == resource.RLIM_INFINITY:
            return 65536
        return max(16, soft - 128)

    async def serve(self, listener: anyio.abc.SocketListener) -> None:
        """Accept connections until cancelled. A failing accept (EMFILE: every fd taken)
        is retried, not raised: anyio's ``serve`` would take the whole daemon down."""
        failing = False
        async with anyio.create_task_group() as tg:
            while True:
                try:
                    stream = await listener.accept()
                except anyio.BrokenResourceError as exc:
                    if not failing:
                        log.warning(
                            "accepting connections fails; retrying",
                            error=str(exc.__cause__ or exc),
                            clients=self.counters.clients,
                        )
                    failing = True
                    await anyio.sleep(0.1)
                    continue
                failing = False
                tg.start_soon(self.serve_connection, stream)

    async def serve_connection(self, stream: SocketStream) -> None:
        self.counters.clients += 1
        try:
            _big_send_buffer(stream)
            pid, uid, gid, groups = peer_credentials(stream)
            with structlog.contextvars.bound_contextvars(peer_uid=uid, peer_pid=pid):
                try:
                    await self._serve(stream, pid, uid, gid, groups)
                except* (
                    anyio.BrokenResourceError,
                    anyio.ClosedResourceError,
                    anyio.EndOfStream,
                    ConnectionError,
                ):
                    pass  # the client went away
                except* TimeoutError:
                    self.counters.timeouts += 1
                    log.info(
                        "client did not read its replies in time; disconnected",
                        timeout_s=self.client_timeout,
                    )
                except* Exception:
                    log.exception("connection failed")
        except OSError:
            log.exception("cannot read the peer's credentials; connection dropped")
        finally:
            self.counters.clients -= 1
            with contextlib.suppress(Exception):
                await stream.aclose()

    async def _send(self, stream: SocketStream, msg: dict[str, Any]) -> None:
        """A reply; a client that does not read it within client_timeout is dropped."""
        with anyio.fail_after(self.client_timeout):
            await stream.send(encode(msg))

    async def _send_last(
        self, stream: SocketStream, err: NetagentError, req_id: Any = None
    ) -> None:
        """A last error reply before hanging up: best effort, never waits long."""
        grace = min(1.0, self.client_timeout)
        with contextlib.suppress(Exception), anyio.move_on_after(grace):
            await stream.send(encode(protocol.reply_error(req_id, err)))

    async def _refuse(self, stream: SocketStream, err: NetagentError) -> None:
        """Answer the first request with ``err`` and hang up. The request is read first
        (briefly, at most 64 KiB): closing on a client that is still sending would give
        it EPIPE instead of the reason."""
        req_id: Any = None
        grace = min(1.0, self.client_timeout)
        with contextlib.suppress(Exception), anyio.move_on_after(grace):
            line = await BufferedByteReceiveStream(stream).receive_until(b"\n", 1 << 16)
            with contextlib.suppress(Exception):
                req_id = protocol.parse_request(line)[0]
        await self._send_last(stream, err, req_id)

    async def _serve(
        self, stream: SocketStream, pid: int, uid: int, gid: int, groups: frozenset[int] | None
    ) -> None:
        if self.counters.clients > self.max_clients:
            log.warning(
                "too many clients; connection refused",
                clients=self.counters.clients - 1,
                limit=self.max_clients,
            )
            await self._refuse(
                stream,
                Internal(
                    f"netagent is serving {self.counters.clients - 1} clients, its limit; "
                    "try again shortly"
                ),
            )
            return
        access = self.policy.access_for(uid, gid, groups)
        if access is None:
            self.counters.refused += 1
            log.warning(
                "connection refused: not root and not in an allowed group",
                peer_gid=gid,
                socket_group=self.policy.socket_group,
                readonly_group=self.policy.readonly_group,
            )
            await self._refuse(stream, PermissionDenied(self.policy.refusal(uid, pid)))
            return
        peer = Peer(pid, uid, gid, access)
        reader = BufferedByteReceiveStream(stream)
        while True:
            try:
                with anyio.fail_after(self.client_timeout):
                    # +1: a line of exactly MAX_LINE bytes must not trip the limit before
                    # its newline arrives; a longer one that came in the same chunk as
                    # its newline is caught below
                    line = await reader.receive_until(b"\n", protocol.MAX_LINE + 1)
                if len(line) > protocol.MAX_LINE:
                    raise anyio.DelimiterNotFound(protocol.MAX_LINE)
            except anyio.IncompleteRead:
                if reader.buffer.strip():
                    await self._send_last(
                        stream,
                        BadRequest(
                            "the request ended without a newline; end each JSON object with \\n"
                        ),
                    )
                return  # the client hung up
            except anyio.DelimiterNotFound:
                log.info("request too large; disconnected", limit=protocol.MAX_LINE)
                await self._send_last(
                    stream,
                    RequestTooLarge(
                        f"request is over {protocol.MAX_LINE} bytes; send one JSON object per "
                        "line, each smaller than that"
                    ),
                )
                return
            except TimeoutError:
                self.counters.timeouts += 1
                log.info(
                    "no complete request in time; disconnected",
                    timeout_s=self.client_timeout,
                    pending_bytes=len(reader.buffer),
                )
                await self._send_last(
                    stream,
                    RequestTimeout(f"no complete request within {self.client_timeout:g}s"),
                )
                return
            if not line.strip():
                continue
            if await self._one(stream, line, peer):
                return

    async def _one(self, stream: SocketStream, line: bytes, peer: Peer) -> bool:
        """Answer one request; True when the connection is done (event stream ended)."""
        t0 = time.perf_counter()
        req_id: Any = None
        op = "?"
        said: dict[str, Any] = {}  # the request's log line: written once it is answered
        try:
            try:
                req_id, op, args = protocol.parse_request(line)
            except RecursionError:  # json's C decoder on deeply nested arrays
                raise BadRequest("request nests too deeply; send a flat JSON object") from None
            self.counters.requests += 1
            if op != "events":
                result = await self.api.handle(op, args, peer)
                reply = protocol.reply_ok(req_id, result)
                seconds = time.perf_counter() - t0
                self.probe.request(op, "ok", seconds)
                said = {
                    "op": op,
                    "ok": True,
                    "changed": result.get("changed") if isinstance(result, dict) else None,
                    "duration_ms": round(seconds * 1000, 2),
                }
        except NetagentError as exc:
            reply = protocol.reply_error(req_id, exc)
            seconds = time.perf_counter() - t0
            self.probe.request(op, exc.name, seconds)
            said = {
                "op": op,
                "ok": False,
                "code": exc.code,
                "error": exc.message,
                "duration_ms": round(seconds * 1000, 2),
            }
        except Exception as exc:
            log.exception("request failed", op=op)
            reply = protocol.reply_error(req_id, Internal(f"internal error: {exc}"))
            self.probe.request(op, Internal.name, time.perf_counter() - t0)
        else:
            if op == "events":
                # outside the handlers above: a watcher that stops reading, or hangs up,
                # ends its connection the way any client's does (serve_connection), not
                # as a failed request with a traceback
                await self._events(stream, req_id, args)
                return True
        try:
            await self._send(stream, reply)
        finally:
            if said:  # after the answer: the client does not wait for its formatting
                log.info("request", **said)
        return False

    async def _events(self, stream: SocketStream, req_id: Any, args: dict[str, Any]) -> None:
        bus = self.bus
        watcher = bus.subscribe()
        watcher.push(
            {
                "ts": time.time(),
                "type": "watching",
                "message": f"watching netagent (pid {os.getpid()})",
            }
        )
        try:
            await self._send(stream, protocol.reply_ok(req_id, {"streaming": True}))
            async with anyio.create_task_group() as tg:

                async def watch_eof() -> None:
                    # the watcher hangs up: stop streaming
                    with contextlib.suppress(Exception):
                        while await stream.receive():
                            pass
                    tg.cancel_scope.cancel()

                tg.start_soon(watch_eof)
                while True:
                    for event in await watcher.next_batch():
                        await self._send(stream, {"v": protocol.VERSION, "event": event})
        finally:
            bus.unsubscribe(watcher)


#: a connection's send buffer: a ``show`` of 2,200 intents (~600 KB) goes out in one
#: write instead of a write per ~200 KB (the default), each waiting for the loop
SEND_BUFFER = 4 << 20
SO_SNDBUFFORCE = 32


def _big_send_buffer(stream: SocketStream) -> None:
    import socket as _socket

    from anyio.abc import SocketAttribute

    sock = stream.extra(SocketAttribute.raw_socket, None)  # noqa: S610  (anyio, not Django)
    if sock is None:
        return
    try:
        sock.setsockopt(_socket.SOL_SOCKET, SO_SNDBUFFORCE, SEND_BUFFER)
    except OSError:  # without CAP_NET_ADMIN: as large as net.core.wmem_max allows
        with contextlib.suppress(OSError):
            sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_SNDBUF, SEND_BUFFER)
