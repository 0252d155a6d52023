"""The host's links as the kernel announced them: one cache, fed by the event source.

Filled by a dump right after the event socket subscribed (so nothing is missed), then
kept by every link event. Attach rules pick their candidates from it, and right before
acting they bring it up to date (:meth:`LinkCache.catch_up`) or, when that cannot be,
ask the kernel for each link (the cache may lag behind).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable, Iterator

from netagent.backends.netlink import Link


class LinkCache:
    def __init__(self) -> None:
        self._by_index: dict[int, Link] = {}
        self._by_name: dict[str, int] = {}
        #: True once a dump has filled it
        self.ready = False
        #: interfaces carrying addresses the host uses: index -> packed addresses
        self.addressed: dict[int, set[bytes]] = {}
        #: what the attach rules last decided for an interface: index -> (rule key,
        #: attached?, why it was left alone)
        self.verdicts: dict[int, tuple[str, bool, str | None]] = {}
        #: what feeds it (the event source, ``agent/events.py``): handles every event
        #: queued so far and says whether the cache is then up to date
        self.feed: Callable[[], Awaitable[bool]] | None = None

    async def catch_up(self) -> bool:
        """True when the cache now holds every change the kernel has announced; False
        when nothing can say so (no feed, events lost): ask the kernel instead."""
        return self.feed is not None and await self.feed()

    def reset(self, links: list[Link]) -> None:
        self._by_index = {lk.index: lk for lk in links}
        self._by_name = {lk.name: lk.index for lk in links}
        self.ready = True

    def update(self, link: Link) -> Link | None:
        """Record a link as announced; returns what was known before."""
        old = self._by_index.get(link.index)
        if old is not None and old.name != link.name and self._by_name.get(old.name) == old.index:
            del self._by_name[old.name]
        self._by_index[link.index] = link
        self._by_name[link.name] = link.index
        if link.peer is not None and link.kind == "veth":
            # the kernel announces a new pair's second end first, when its peer does not
            # exist yet (``p0@NONE``), and does not announce it again once it does: its
            # peer is learned from the first end's announcement (a lookup would say it)
            other = self._by_index.get(link.peer)
            if (
                other is not None
                and other.kind == "veth"
                and other.peer is None
                and other.link_netnsid is None
            ):
                self._by_index[other.index] = dataclasses.replace(other, peer=link.index)
        return old

    def address_changed(self, index: int, address: bytes, deleted: bool) -> None:
        held = self.addressed.setdefault(index, set())
        if deleted:
            held.discard(address)
        else:
            held.add(address)
        if not held:
            del self.addressed[index]

    def remove(self, index: int) -> Link | None:
        self.addressed.pop(index, None)
        self.verdicts.pop(index, None)
        old = self._by_index.pop(index, None)
        if old is not None and self._by_name.get(old.name) == index:
            del self._by_name[old.name]
        if old is not None and old.peer is not None:
            # the other end stays only when this one moved to another namespace
            other = self._by_index.get(old.peer)
            if other is not None and other.peer == index:
                self._by_index[other.index] = dataclasses.replace(other, peer=None)
        return old

    def get(self, index: int | None) -> Link | None:
        return None if index is None else self._by_index.get(index)

    def named(self, name: str) -> Link | None:
        index = self._by_name.get(name)
        return None if index is None else self._by_index.get(index)

    def foreign_name(self, ns: str | None, name: str, key: str) -> bool:
        """A host interface of that name exists and was not made for ``key``."""
        if ns is not None:
            return False  # only the host's interfaces are in the cache
        link = self.named(name)
        return link is not None and not link.belongs_to(key)

    def __iter__(self) -> Iterator[Link]:
        return iter(list(self._by_index.values()))

    def __len__(self) -> int:
        return len(self._by_index)
