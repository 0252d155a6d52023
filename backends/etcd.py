"""The cluster's store: etcd v3, through etcd3aio, behind netagent's own small interface.

The cluster room (``agent/cluster.py``) needs seven things of etcd: a lease (grant, keep
alive, revoke), a key created only if absent and a key replaced only if unchanged
(transactions on ``create_revision`` / ``mod_revision``), a listing of a prefix with its
revision, and a watch of the prefix from a revision. :class:`ClusterStore` is that, and
nothing more, so the library under it can be replaced (or vendored) without touching
the room, and the room is tested against :class:`~netagent.backends.fakeetcd.FakeStore`.

Why etcd3aio 0.3.0 and what to know about it: ``docs/cluster.md``. The quirks handled
here: every unary call has a deadline (etcd3aio retries transient errors within it);
its service attributes are None until ``connect()``; a watch can end with a non-
transient error (``INTERNAL``, "RST_STREAM" from a member stopped with SIGTERM) or a
compaction, which :meth:`Etcd3Store.watch` reports as :class:`StoreError` /
:class:`Compacted` so the room lists again; a watch is iterated under
``contextlib.aclosing`` so leaving it cancels its gRPC stream at once; a channel over
several TLS endpoints checks one server name for all (``tls_server_name``); endpoints
must be IP addresses (etcd3aio dials ``ipv4:a:p,b:p``), so host names are resolved
here, once, and the first becomes the TLS name. ``import etcd3aio`` costs ~120 ms
(grpc): it is imported by the daemon only, when a cluster is configured.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol
from urllib.parse import urlsplit

from netagent.agent.errors import InvalidArgument

if TYPE_CHECKING:
    from etcd3aio import Etcd3Client

#: seconds one unary call may take, retries included
CALL_TIMEOUT = 5.0


class StoreError(Exception):
    """etcd did not answer (unreachable, no quorum, a deadline), or refused."""


class Compacted(StoreError):
    """A watch's start revision was compacted away: list again."""


@dataclass(frozen=True)
class KeyValue:
    key: str
    value: bytes
    lease: int = 0
    create_revision: int = 0
    mod_revision: int = 0


@dataclass(frozen=True)
class Event:
    kind: Literal["put", "delete"]
    kv: KeyValue


class ClusterStore(Protocol):
    """What the cluster room asks of etcd."""

    async def grant(self, ttl: int) -> int:
        """A new lease of ``ttl`` seconds: its ID."""
        ...

    async def keepalive(self, lease: int) -> int:
        """Renew once: the TTL etcd answers (0 or less: the lease is gone)."""
        ...

    async def revoke(self, lease: int) -> None: ...

    async def list_prefix(self, prefix: str) -> tuple[int, list[KeyValue]]:
        """The keys under ``prefix`` and the store's revision of that reading."""
        ...

    async def create(self, key: str, value: bytes, lease: int) -> bool:
        """Put only if the key does not exist (``create_revision == 0``)."""
        ...

    async def replace(self, key: str, value: bytes, lease: int, mod_revision: int) -> bool:
        """Put only if the key is as it was read (``mod_revision`` unchanged)."""
        ...

    def watch(self, prefix: str, start_revision: int) -> AsyncIterator[list[Event]]:
        """Changes under ``prefix`` from ``start_revision`` on, a batch per response;
        ends by raising (:class:`Compacted`, :class:`StoreError`)."""
        ...

    async def close(self) -> None: ...


@dataclass(frozen=True)
class Endpoints:
    """``--cluster-endpoints`` made usable: ``ip:port`` targets, whether TLS, the TLS
    server name."""

    targets: tuple[str, ...]
    tls: bool
    server_name: str | None


def parse_endpoints(urls: Sequence[str]) -> Endpoints:
    """``http://A:2379,https://B:2379``: one scheme for all (one channel), host names
    resolved to IPv4 addresses once (gRPC's ``ipv4:`` target takes addresses only)."""
    if not urls:
        raise InvalidArgument("--cluster-endpoints: give at least one etcd URL")
    schemes = set()
    targets = []
    first_host: str | None = None
    for url in urls:
        parts = urlsplit(url if "://" in url else f"http://{url}")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise InvalidArgument(f"etcd endpoint {url!r}: give http://ADDR:PORT or https://...")
        schemes.add(parts.scheme)
        host = parts.hostname
        first_host = first_host or host
        try:
            port = parts.port or 2379
            infos = socket.getaddrinfo(host, port, socket.AF_INET, socket.SOCK_STREAM)
        except (OSError, ValueError) as exc:
            raise InvalidArgument(f"etcd endpoint {url!r}: {exc}") from None
        targets.append(f"{infos[0][4][0]}:{port}")
    if len(schemes) != 1:
        raise InvalidArgument("etcd endpoints mix http and https; use one scheme for all")
    tls = schemes == {"https"}
    return Endpoints(tuple(targets), tls, first_host if tls else None)


def _kv(item: Any) -> KeyValue:
    return KeyValue(
        key=item.key.decode(errors="replace"),
        value=bytes(item.value),
        lease=int(item.lease),
        create_revision=int(item.create_revision),
        mod_revision=int(item.mod_revision),
    )


class Etcd3Store:
    """:class:`ClusterStore` over etcd3aio (``docs/cluster.md``: why this library)."""

    def __init__(
        self,
        endpoints: Endpoints,
        *,
        ca: str | None = None,
        cert: str | None = None,
        key: str | None = None,
        server_name: str | None = None,
    ) -> None:
        from etcd3aio import Etcd3Client

        ca_pem = chain = key_pem = None
        if endpoints.tls:
            # the CA always explicitly: this machine's environment points gRPC at the
            # system bundle (GRPC_DEFAULT_SSL_ROOTS_FILE_PATH)
            try:
                ca_pem = Path(ca or "/etc/ssl/certs/ca-certificates.crt").read_bytes()
                chain = Path(cert).read_bytes() if cert else None
                key_pem = Path(key).read_bytes() if key else None
            except OSError as exc:
                raise InvalidArgument(f"cannot read a TLS file for etcd: {exc}") from None
        self.client: Etcd3Client = Etcd3Client(
            list(endpoints.targets),
            tls_server_name=(server_name or endpoints.server_name) if endpoints.tls else None,
            ca_cert=ca_pem,
            cert_chain=chain,
            cert_key=key_pem,
        )
        self._connected = False

    async def _services(self) -> Any:
        if not self._connected:
            await self.client.connect()
            self._connected = True
        c = self.client
        assert c.kv is not None and c.lease is not None and c.watch is not None
        return c

    async def _call(self, what: str, aw: Any) -> Any:
        import grpc.aio
        from etcd3aio import EtcdError

        try:
            async with asyncio.timeout(CALL_TIMEOUT):
                return await aw
        except (TimeoutError, EtcdError, grpc.aio.AioRpcError) as exc:
            raise StoreError(f"etcd {what}: {_describe(exc)}") from None

    async def grant(self, ttl: int) -> int:
        c = await self._services()
        r = await self._call("lease grant", c.lease.grant(ttl, timeout=CALL_TIMEOUT))
        return int(r.ID)

    async def keepalive(self, lease: int) -> int:
        c = await self._services()

        async def once() -> int:
            stream = c.lease.keep_alive(lease)
            try:
                async for response in stream:
                    return int(response.TTL)
                return 0
            finally:
                stream.cancel()

        result: int = await self._call("lease keep-alive", once())
        return result

    async def revoke(self, lease: int) -> None:
        c = await self._services()
        await self._call("lease revoke", c.lease.revoke(lease, timeout=CALL_TIMEOUT))

    async def list_prefix(self, prefix: str) -> tuple[int, list[KeyValue]]:
        from etcd3aio.kv import prefix_range_end

        c = await self._services()
        r = await self._call(
            f"list {prefix}",
            c.kv.get(prefix, range_end=prefix_range_end(prefix), timeout=CALL_TIMEOUT),
        )
        return int(r.header.revision), [_kv(item) for item in r.kvs]

    async def create(self, key: str, value: bytes, lease: int) -> bool:
        c = await self._services()
        kv = c.kv
        r = await self._call(
            f"create {key}",
            kv.txn(
                [kv.txn_compare_create_revision(key, 0)],
                [kv.txn_op_put(key, value, lease=lease)],
                timeout=CALL_TIMEOUT,
            ),
        )
        return bool(r.succeeded)

    async def replace(self, key: str, value: bytes, lease: int, mod_revision: int) -> bool:
        from etcd3aio._protobuf import Compare

        c = await self._services()
        kv = c.kv
        compare = Compare(
            key=key.encode(), result=Compare.EQUAL, target=Compare.MOD, mod_revision=mod_revision
        )
        r = await self._call(
            f"replace {key}",
            kv.txn([compare], [kv.txn_op_put(key, value, lease=lease)], timeout=CALL_TIMEOUT),
        )
        return bool(r.succeeded)

    async def watch(self, prefix: str, start_revision: int) -> AsyncIterator[list[Event]]:
        import grpc.aio
        from etcd3aio import EtcdError
        from etcd3aio.kv import prefix_range_end

        c = await self._services()
        stream = c.watch.watch(
            prefix, range_end=prefix_range_end(prefix), start_revision=start_revision
        )
        try:
            async with contextlib.aclosing(stream) as responses:
                async for w in responses:
                    if w.compact_revision:
                        raise Compacted(f"revision {start_revision} was compacted")
                    if w.canceled:
                        raise StoreError(f"etcd cancelled the watch: {w.cancel_reason}")
                    events = [
                        Event("put" if ev.type == 0 else "delete", _kv(ev.kv)) for ev in w.events
                    ]
                    if events:
                        yield events
        except (EtcdError, grpc.aio.AioRpcError) as exc:
            raise StoreError(f"etcd watch: {_describe(exc)}") from None
        raise StoreError("etcd ended the watch")

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.client.close()


def _describe(exc: BaseException) -> str:
    import grpc.aio

    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    if isinstance(exc, TimeoutError):
        return f"no answer within {CALL_TIMEOUT:g} s"
    return str(exc) or type(exc).__name__
