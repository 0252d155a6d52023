"""An in-memory :class:`~netagent.backends.etcd.ClusterStore` for tests without etcd.

It keeps what etcd 3.4 would for the calls the cluster room makes: one revision counter
bumped by every put and delete, keys with their lease and create/mod revisions, leases
that expire (``expire``, or ``tick`` past their TTL) and take their keys with them,
transactions on ``create_revision`` / ``mod_revision``, and watches that see every change
after their start revision (earlier history is kept, so a watch from an old revision
catches up; ``compact`` makes such a watch fail with :class:`Compacted`, as etcd does).

Faults: ``down = True`` makes every call raise :class:`StoreError` and ends the running
watches the same way (etcd unreachable); ``fail_next(op)`` makes the next call of one op
raise. Several rooms (hosts) may share one ``FakeStore``: it is the cluster.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace

import anyio
from anyio.streams.memory import MemoryObjectSendStream

from .etcd import Compacted, Event, KeyValue, StoreError


@dataclass
class _Lease:
    ttl: int
    expires: float
    keys: set[str] = field(default_factory=set)


class FakeStore:
    def __init__(self) -> None:
        self.now = 0.0  # seconds; moved by ``tick``
        self.revision = 1
        self.keys: dict[str, KeyValue] = {}
        self.leases: dict[int, _Lease] = {}
        self.history: list[tuple[int, Event]] = []
        self.compacted = 0
        self.down = False
        self._ids = itertools.count(0x1000)
        self._faults: dict[str, list[BaseException]] = {}
        self._watchers: list[tuple[str, MemoryObjectSendStream[list[Event] | BaseException]]] = []
        #: every call, in order: (op, argument)
        self.calls: list[tuple[str, object]] = []

    # ---- test controls --------------------------------------------------------------
    def fail_next(self, op: str, exc: BaseException | None = None) -> None:
        self._faults.setdefault(op, []).append(exc or StoreError(f"fake: {op} failed"))

    def set_down(self, down: bool) -> None:
        """etcd unreachable (every call fails, watches end) or back."""
        self.down = down
        if down:
            for _prefix, send in self._watchers:
                send.send_nowait(StoreError("fake: etcd is unreachable"))

    def tick(self, seconds: float) -> None:
        """Time passes: leases not kept alive within their TTL expire."""
        self.now += seconds
        for lease_id, lease in list(self.leases.items()):
            if lease.expires <= self.now:
                self._drop_lease(lease_id)

    def expire(self, lease_id: int) -> None:
        self._drop_lease(lease_id)

    def compact(self) -> None:
        self.compacted = self.revision
        self.history = [(r, e) for r, e in self.history if r > self.compacted]

    def put(self, key: str, value: bytes, lease: int = 0) -> None:
        """A write by someone else (a simulated host)."""
        self._put(key, value, lease)

    def delete(self, key: str) -> None:
        self._delete(key)

    # ---- internals ------------------------------------------------------------------
    def _check(self, op: str, arg: object = None) -> None:
        self.calls.append((op, arg))
        queue = self._faults.get(op)
        if queue:
            raise queue.pop(0)
        if self.down:
            raise StoreError(f"fake: etcd is unreachable ({op})")

    def _emit(self, event: Event) -> None:
        self.history.append((self.revision, event))
        for prefix, send in self._watchers:
            if event.kv.key.startswith(prefix):
                send.send_nowait([event])

    def _put(self, key: str, value: bytes, lease: int) -> None:
        if lease and lease not in self.leases:
            raise StoreError(f"etcdserver: requested lease not found ({lease})")
        self.revision += 1
        old = self.keys.get(key)
        if old is not None and old.lease in self.leases:
            self.leases[old.lease].keys.discard(key)
        kv = KeyValue(
            key, value, lease, old.create_revision if old else self.revision, self.revision
        )
        self.keys[key] = kv
        if lease:
            self.leases[lease].keys.add(key)
        self._emit(Event("put", kv))

    def _delete(self, key: str) -> None:
        old = self.keys.pop(key, None)
        if old is None:
            return
        self.revision += 1
        self._emit(Event("delete", replace(old, value=b"", mod_revision=self.revision)))

    def _drop_lease(self, lease_id: int) -> None:
        lease = self.leases.pop(lease_id, None)
        if lease is not None:
            for key in sorted(lease.keys):
                self._delete(key)

    # ---- the store ------------------------------------------------------------------
    async def grant(self, ttl: int) -> int:
        self._check("grant", ttl)
        lease_id = next(self._ids)
        self.leases[lease_id] = _Lease(ttl, self.now + ttl)
        return lease_id

    async def keepalive(self, lease: int) -> int:
        self._check("keepalive", lease)
        held = self.leases.get(lease)
        if held is None:
            return 0
        held.expires = self.now + held.ttl
        return held.ttl

    async def revoke(self, lease: int) -> None:
        self._check("revoke", lease)
        if lease not in self.leases:
            raise StoreError("etcdserver: requested lease not found")
        self._drop_lease(lease)

    async def list_prefix(self, prefix: str) -> tuple[int, list[KeyValue]]:
        self._check("list", prefix)
        return self.revision, [kv for k, kv in sorted(self.keys.items()) if k.startswith(prefix)]

    async def create(self, key: str, value: bytes, lease: int) -> bool:
        self._check("create", key)
        if key in self.keys:
            return False
        self._put(key, value, lease)
        return True

    async def replace(self, key: str, value: bytes, lease: int, mod_revision: int) -> bool:
        self._check("replace", key)
        old = self.keys.get(key)
        if old is None or old.mod_revision != mod_revision:
            return False
        self._put(key, value, lease)
        return True

    async def watch(self, prefix: str, start_revision: int) -> AsyncIterator[list[Event]]:
        self._check("watch", start_revision)
        if start_revision <= self.compacted:
            raise Compacted(f"revision {start_revision} was compacted")
        send, receive = anyio.create_memory_object_stream[list[Event] | BaseException](math.inf)
        for rev, event in self.history:
            if rev >= start_revision and event.kv.key.startswith(prefix):
                send.send_nowait([event])
        entry = (prefix, send)
        self._watchers.append(entry)
        try:
            async with receive:
                async for item in receive:
                    if isinstance(item, BaseException):
                        raise item
                    yield item
        finally:
            self._watchers.remove(entry)
            send.close()

    async def close(self) -> None:
        self.calls.append(("close", None))
