"""The host's links as the kernel announced them: one cache, fed by the event source.

Filled by a dump right after the event socket subscribed (so nothing is missed), then
kept by every link event. Attach rules pick their candidates from it, and check each
with the kernel right before acting (the cache may lag behind).
"""

from __future__ import annotations

from collections.abc import Iterator

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
