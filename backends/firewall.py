"""The firewall backend interface and the registry that finds backends by name.

A backend realizes a :class:`FirewallSpec` (the forwards and the bridges' NAT needs) in
rules it owns, and nothing else. The reconciler calls, in this order:

``probe()``
    classmethod: is this backend usable on this host? ``(ok, why)``.
``observe()``
    read only what the backend owns; returns an opaque observation.
``plan(spec, observed)``
    **pure**: desired + observed -> a :class:`Batch` (empty when nothing differs).
``plan_update(spec, added, removed)``
    **pure**: the smaller batch for forwards added/removed since the last sync, applied
    without observing first; if it fails the reconciler falls back to observe + plan.
``apply(batch)``
    one transaction.
``purge()``
    remove everything the backend owns (and nothing else).

Third-party backends register under the entry point group ``netagent.firewall_backends``
(``name = "package.module:Class"``) and are then selectable with ``--firewall name``.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, ClassVar

from netagent.agent import intents as I
from netagent.agent.errors import BackendUnavailable, InvalidArgument

ENTRY_POINT_GROUP = "netagent.firewall_backends"
BUILTIN: dict[str, str] = {
    "nftables": "netagent.backends.nftables:NftablesBackend",
    "iptables": "netagent.backends.iptables:IptablesBackend",
}
#: the order ``--firewall auto`` tries
AUTO_ORDER = ("nftables", "iptables")


@dataclass(frozen=True)
class FirewallSpec:
    """What the firewall must do: forwards in, masquerade/hairpin for bridges."""

    forwards: tuple[I.Forward, ...] = ()
    bridges: tuple[I.Bridge, ...] = ()


@dataclass
class Batch:
    """A transaction a backend will run, with a human description of each step."""

    steps: list[str] = field(default_factory=list)
    payload: Any = None
    full: bool = False

    @property
    def empty(self) -> bool:
        return not self.steps


class FirewallBackend(ABC):
    name: ClassVar[str]
    #: text in an ``nft monitor`` line that means the change touched what this backend
    #: owns (see ``agent/fwwatch.py``)
    monitor_markers: ClassVar[tuple[str, ...]] = ()

    @classmethod
    @abstractmethod
    def probe(cls) -> tuple[bool, str]: ...

    @abstractmethod
    async def observe(self) -> Any: ...

    @abstractmethod
    def plan(self, spec: FirewallSpec, observed: Any) -> Batch: ...

    @abstractmethod
    def plan_update(
        self, spec: FirewallSpec, added: list[I.Forward], removed: list[I.Forward]
    ) -> Batch: ...

    @abstractmethod
    async def apply(self, batch: Batch) -> None: ...

    @abstractmethod
    async def purge(self) -> list[str]: ...

    @abstractmethod
    async def present(self) -> bool:
        """Does anything of ours exist (used when switching backends)?"""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release what the backend holds open."""


def _load(ref: str) -> type[FirewallBackend]:
    module, _, attr = ref.partition(":")
    cls = getattr(importlib.import_module(module), attr)
    if not (isinstance(cls, type) and issubclass(cls, FirewallBackend)):
        raise TypeError(f"{ref} is not a FirewallBackend")
    return cls


def available() -> dict[str, str]:
    """Backend name -> "module:Class", built-ins first, then entry points."""
    found = dict(BUILTIN)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        found.setdefault(ep.name, ep.value)
    return found


def get_backend(name: str) -> type[FirewallBackend]:
    refs = available()
    if name not in refs:
        raise InvalidArgument(
            f"unknown firewall backend {name!r}; known: {', '.join(sorted(refs))}, auto"
        )
    return _load(refs[name])


def choose_backend(name: str) -> tuple[type[FirewallBackend], str]:
    """Resolve ``--firewall``: a name, or ``auto``. Returns the class and why it was chosen."""
    if name != "auto":
        cls = get_backend(name)
        ok, why = cls.probe()
        if not ok:
            raise BackendUnavailable(f"firewall backend {name} is not usable here: {why}")
        return cls, f"{name} requested"
    reasons: list[str] = []
    for candidate in AUTO_ORDER:
        cls = get_backend(candidate)
        ok, why = cls.probe()
        if ok:
            tail = f" ({'; '.join(reasons)})" if reasons else ""
            return cls, f"auto: {candidate} is usable: {why}{tail}"
        reasons.append(f"{candidate} not usable: {why}")
    raise BackendUnavailable("no firewall backend is usable: " + "; ".join(reasons))
