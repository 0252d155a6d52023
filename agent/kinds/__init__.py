"""The registry of intent kinds: everything that iterates kinds asks here.

A kind is one module in this package (see ``base.py`` for what it declares); adding one
means adding its module, listing it in :func:`default_kinds`, declaring its requests in
``agent/ops.py`` (which also gives it its CLI command) and its tests.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from ..errors import InvalidArgument
from .base import Intent, Kind

#: up to this many keys, :meth:`Registry.split` looks each up
FEW_KEYS = 16


class Registry:
    def __init__(self, kinds: Iterable[Kind[Any]]) -> None:
        self._kinds = sorted(kinds, key=lambda k: k.order)
        self._by_name: dict[str, Kind[Any]] = {}
        self._by_prefix: dict[str, Kind[Any]] = {}
        for kind in self._kinds:
            for name in (kind.name, *kind.aliases):
                self._by_name[name] = kind
            self._by_prefix[kind.key_prefix] = kind
        #: the names of the kinds whose changes reach the firewall
        self.firewall_names = frozenset(k.name for k in self._kinds if k.firewall)
        #: the names of the kinds that may have to ask the kernel before a change
        self.looking_names = frozenset(k.name for k in self._kinds if k.may_look)

    def __iter__(self) -> Iterator[Kind[Any]]:
        return iter(self._kinds)

    def get(self, name: str) -> Kind[Any] | None:
        """A kind by its name or an older alias."""
        return self._by_name.get(name)

    def of(self, intent: Intent) -> Kind[Any]:
        return self._by_name[intent.kind]

    def of_key(self, key: str) -> Kind[Any] | None:
        return self._by_prefix.get(key.partition("/")[0])

    def order_of_key(self, key: str) -> int:
        kind = self.of_key(key)
        return kind.order if kind is not None else len(self._kinds)

    def split(self, keys: Iterable[str]) -> list[tuple[Kind[Any] | None, list[str]]]:
        """``keys`` by kind, in the kinds' order, each kind's sorted; those of no kind
        (the reconciler's own) last, with None. Sorted once, then cut at each kind's
        prefix: a pass of 10,000 keys costs no Python call per key (a few keys are
        looked up one by one: cheaper than the cuts)."""
        ordered = sorted(keys)
        if len(ordered) <= FEW_KEYS:
            by: dict[Kind[Any] | None, list[str]] = {}
            for key in ordered:
                by.setdefault(self.of_key(key), []).append(key)
            few: list[tuple[Kind[Any] | None, list[str]]] = [
                (kind, by[kind]) for kind in self._kinds if kind in by
            ]
            return [*few, (None, by[None])] if None in by else few
        found: dict[str, list[str]] = {}
        cuts: list[tuple[int, int]] = []
        for kind in self._kinds:
            lo = bisect.bisect_left(ordered, kind.key_prefix + "/")
            hi = bisect.bisect_left(ordered, kind.key_prefix + "0", lo)  # "0" follows "/"
            found[kind.name] = ordered[lo:hi]
            cuts.append((lo, hi))
        rest: list[str] = []
        if sum(hi - lo for lo, hi in cuts) < len(ordered):  # the few keys between cuts
            at = 0
            for lo, hi in sorted(cuts):
                rest += ordered[at:lo]
                at = hi
            rest += ordered[at:]
            for key in rest[:]:
                owner = self.of_key(key)  # a kind's prefix alone: before its other keys
                if owner is not None:
                    found[owner.name].insert(0, key)
                    rest.remove(key)
        parts: list[tuple[Kind[Any] | None, list[str]]] = [
            (kind, found[kind.name]) for kind in self._kinds if found[kind.name]
        ]
        if rest:
            parts.append((None, rest))
        return parts

    def in_order(
        self, parts: list[tuple[Kind[Any] | None, list[str]]], reverse: bool = False
    ) -> list[str]:
        """The keys of :meth:`split` in realize order (by kind, then key; kinds of one
        order together), or in removal order (``reverse``: by kind backwards, then key)."""
        last = len(self._kinds)
        by_order: dict[int, list[str]] = {}
        for kind, keys in parts:
            order = kind.order if kind is not None else last
            held = by_order.get(order)
            if held is None:
                by_order[order] = keys
            else:
                by_order[order] = sorted([*held, *keys])
        out: list[str] = []
        for order in sorted(by_order, reverse=reverse):
            out += by_order[order]
        return out

    @staticmethod
    def firewall_follows(parts: list[tuple[Kind[Any] | None, list[str]]]) -> bool:
        """Whether every key of a firewall kind among the keys of :meth:`split` is of a
        kind whose firewall part follows its kernel steps (peers coming, moving or
        going: their route is there, or gone, ~1-2 ms sooner), and there is one."""
        kinds = [kind for kind, _keys in parts if kind is not None and kind.firewall]
        return bool(kinds) and all(kind.firewall_follows for kind in kinds)

    def sort_key(self, intent: Intent) -> tuple[int, str]:
        return self._by_name[intent.kind].order, intent.key

    def from_dict(self, d: object) -> Intent:
        """An intent from its persisted form (older kind names accepted)."""
        if not isinstance(d, Mapping):
            raise InvalidArgument("an intent must be a JSON object")
        name = d.get("kind")
        kind = self.get(name) if isinstance(name, str) else None
        if kind is None:
            known = ", ".join(k.name for k in self._kinds)
            raise InvalidArgument(f"unknown intent kind {name!r}; known: {known}")
        try:
            intent: Intent = kind.from_dict(d)
        except TypeError as exc:
            raise InvalidArgument(f"{name}: {exc}") from None
        return intent


def default_kinds() -> Registry:
    from .attach import AttachKind
    from .attachment import AttachmentKind
    from .bridge import BridgeKind
    from .forward import ForwardKind
    from .namespace import NamespaceKind
    from .peer import PeerKind
    from .plug import PlugKind
    from .vxlan import VxlanKind
    from .wire import WireKind

    return Registry(
        [
            NamespaceKind(),
            BridgeKind(),
            AttachKind(),
            PlugKind(),
            WireKind(),
            ForwardKind(),
            VxlanKind(),
            PeerKind(),
            AttachmentKind(),
        ]
    )
