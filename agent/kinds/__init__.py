"""The registry of intent kinds: everything that iterates kinds asks here.

A kind is one module in this package (see ``base.py`` for what it declares); adding one
means adding its module, listing it in :func:`default_kinds`, declaring its requests in
``agent/ops.py`` (which also gives it its CLI command) and its tests.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from ..errors import InvalidArgument
from .base import Intent, Kind


class Registry:
    def __init__(self, kinds: Iterable[Kind[Any]]) -> None:
        self._kinds = sorted(kinds, key=lambda k: k.order)
        self._by_name: dict[str, Kind[Any]] = {}
        self._by_prefix: dict[str, Kind[Any]] = {}
        for kind in self._kinds:
            for name in (kind.name, *kind.aliases):
                self._by_name[name] = kind
            self._by_prefix[kind.key_prefix] = kind

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

    def firewall_follows(self, keys: Iterable[str]) -> bool:
        """Whether every key of a firewall kind among ``keys`` is of a kind whose
        firewall part follows its kernel steps (peers coming, moving or going: their
        route is there, or gone, ~1-2 ms sooner), and there is one."""
        found = False
        for key in keys:
            kind = self.of_key(key)
            if kind is None or not kind.firewall:
                continue
            if not kind.firewall_follows:
                return False
            found = True
        return found

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
