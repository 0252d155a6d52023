"""What an intent kind declares, once: the rest of netagent asks the kind, never the type.

A kind (namespace, bridge, plug, wire, attach rule, forward, ...) is one module with:

* its intent: a small frozen, validated value with a stable ``key``;
* its requests (``agent/ops.py``) and how they change the desired state (:meth:`Kind.add`,
  :meth:`Kind.delete`), validated against it before anything is recorded;
* what it depends on (:meth:`Kind.needs`: keys that, when desired, come first, and whose
  repair brings it back too), the kernel names it owns (:meth:`Kind.names`), the
  addresses it places (:meth:`Kind.addresses`), the namespaces whose events concern it;
* how it is ensured, inspected and removed in the kernel, through the netlink protocol
  (``backends/netlink.py``) in a :class:`Context`.

The desired state, the reconciler, the event source, ``show``, ``apply`` and ``purge``
iterate kinds through the registry (``agent/kinds/__init__.py``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Protocol, TypeVar, overload

from ..errors import InvalidArgument, NameTaken
from ..values import IPInterface

if TYPE_CHECKING:
    from netagent.backends.netlink import Link, Netlink

    from ..bus import EventBus
    from ..linkcache import LinkCache
    from ..schema import Request
    from ..state import DesiredState
    from .namespace import Claims


class Intent(Protocol):
    """What every intent value offers (each kind's frozen dataclass)."""

    kind: ClassVar[str]

    @property
    def key(self) -> str: ...

    def to_dict(self) -> dict[str, Any]: ...

    def describe(self) -> str: ...


IntentT = TypeVar("IntentT", bound=Intent)
V = TypeVar("V")


class cached(Generic[V]):
    """``functools.cached_property`` without Python 3.11's lock: its first read took
    ~4.5 us (an ``apply`` of 10,000 forwards reads ``key`` and ``family`` of each new
    one: ~90 ms of ~150 under a profiler, ~25 ms without), this one ~0.5. Intents are
    frozen values built in one thread; two threads computing the same value at once
    would only compute it twice."""

    def __init__(self, fn: Callable[[Any], V]) -> None:
        self.fn = fn
        self.name = fn.__name__
        self.__doc__ = fn.__doc__

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    @overload
    def __get__(self, obj: None, owner: type | None = None) -> cached[V]: ...
    @overload
    def __get__(self, obj: object, owner: type | None = None) -> V: ...
    def __get__(self, obj: object | None, owner: type | None = None) -> V | cached[V]:
        if obj is None:
            return self
        value = self.fn(obj)
        obj.__dict__[self.name] = value  # read from the instance from now on
        return value


#: (namespace name or None for the host, segment key, address): where an intent puts an
#: address. The segment is what must not hold one address twice (a bridge, a wire).
Placed = tuple[str | None, str, IPInterface]
#: (namespace name or None for the host, interface name)
OwnedName = tuple[str | None, str]


@dataclass
class Context:
    """What a kind's kernel steps work with. ``state`` is the committed desired state."""

    net: Netlink
    state: DesiredState
    bus: EventBus
    links: LinkCache
    #: namespaces being made (``agent/kinds/namespace.py``)
    claims: Claims = field(default_factory=lambda: _no_claims())
    #: forward key -> why the firewall backend refused it (``agent/fwsync.py``)
    refused: dict[str, str] = field(default_factory=dict)
    #: keys quarantined on load (``agent/quarantine.py``): acknowledged, so what carries
    #: their mark in the kernel is not an orphan
    quarantined: Collection[str] = field(default_factory=frozenset)


def _no_claims() -> Claims:
    from .namespace import Claims

    return Claims(None)


#: what a kind may say of an intent for the desired state's index
RELATIONS = ("needs", "names", "addresses", "namespaces", "index")


class Kind(ABC, Generic[IntentT]):
    #: the kind's one name: in documents, ops (``<name>.add``) and the CLI
    name: ClassVar[str]
    #: older names still read in persisted state and ``apply`` documents
    aliases: ClassVar[tuple[str, ...]] = ()
    #: the first word of its keys (``plug/red/v-net-0``); kernel marks carry keys
    key_prefix: ClassVar[str]
    #: realize order (removal runs in reverse)
    order: ClassVar[int]
    #: its changes reach the firewall (the spec is built from these kinds)
    firewall: ClassVar[bool] = False
    #: its firewall part is an element of a guard (the VXLAN port's accepted peers): in a
    #: pass of such changes alone, the firewall follows their kernel steps, not leads
    firewall_follows: ClassVar[bool] = False
    #: shown in ``status``' summary as "N <plural>" when set
    plural: ClassVar[str | None] = None
    #: False for a kind with no kernel steps of its own (the firewall realizes it): the
    #: reconciler then asks only :meth:`refused`
    has_steps: ClassVar[bool] = True
    #: its intents' ensures may run at once, those that share no namespace and no name
    #: (``agent/waves.py``: their waits on the kernel overlap)
    at_once: ClassVar[bool] = False
    #: the relations it declares (of ``needs``, ``names``, ``addresses``, ``namespaces``,
    #: ``index``: those it overrides); the others are empty for each of its intents and
    #: the desired state does not ask them (set for each kind by ``__init_subclass__``)
    relations: ClassVar[frozenset[str]] = frozenset()
    #: whether :meth:`must_look` can ever say yes (a kind that owns no names and keeps
    #: the default never has to ask the kernel before a change is recorded)
    may_look: ClassVar[bool] = False

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        cls.relations = frozenset(r for r in RELATIONS if getattr(cls, r) is not getattr(Kind, r))
        cls.may_look = "names" in cls.relations or cls.must_look is not Kind.must_look

    # ---- the persisted form ---------------------------------------------------------
    @abstractmethod
    def from_dict(self, d: Mapping[str, Any]) -> IntentT:
        """The intent from its ``to_dict()`` form (persisted state). Strict."""

    def key_of(self, d: Mapping[str, Any]) -> str | None:
        """The key of a persisted intent that :meth:`from_dict` refuses (recorded by an
        older netagent, quarantined on load): worked out from the raw fields, without
        validating them. None when it cannot be (a stand-in key is used)."""
        return None

    # ---- relations, asked by the desired state and the reconciler --------------------
    def needs(self, intent: IntentT) -> tuple[str, ...]:
        """Keys that, when they are desired, are realized first and whose repair brings
        this one back too."""
        return ()

    def names(self, intent: IntentT) -> tuple[OwnedName, ...]:
        """Interface names it owns: never given to anything else, never taken from
        someone else."""
        return ()

    def addresses(self, intent: IntentT) -> tuple[Placed, ...]:
        return ()

    def namespaces(self, intent: IntentT) -> tuple[str, ...]:
        """Named namespaces it acts in: their events concern it."""
        return ()

    def label(self, intent: IntentT) -> str:
        """A short name in messages ("v-net-0" for a bridge, "red" for a plug)."""
        return intent.key

    def index(self, intent: IntentT) -> Iterable[tuple[str, Hashable]]:
        """Extra lookups of the kind's own (``state.lookup(name, value)``)."""
        return ()

    def drifted(self, intent: IntentT, link: Link, links: LinkCache) -> bool:
        """A host interface the intent owns was announced changed: is it no longer as
        the intent wants? (Only then is the key repaired: netagent's own changes
        announce themselves too.) Deleted interfaces are always repaired."""
        return False

    def unmet(self, state: DesiredState, intent: IntentT) -> list[str]:
        """What it hangs on that the desired state no longer has (after a prune)."""
        return []

    def prunable(self, intent: IntentT) -> bool:
        """May ``apply --prune`` remove it when the document does not name it? Not what
        a container runtime holds (an attachment, its port mappings): a document of
        people's intents cannot name those."""
        return True

    # ---- requests -------------------------------------------------------------------
    @abstractmethod
    def add(self, state: DesiredState, req: Request) -> IntentT:
        """The intent a request asks for, checked against the desired state (raise to
        refuse). The caller records it."""

    @abstractmethod
    def delete(self, state: DesiredState, req: Request) -> list[str]:
        """The keys a removal request names (raise NotFound when there are none)."""

    def details(self, ctx: Context, intent: IntentT) -> dict[str, Any]:
        """More for ``show`` (what an attach rule took and left alone ...)."""
        return {}

    def rows(self, ctx: Context) -> list[dict[str, Any]]:
        """The ``<kind>.list`` answer."""
        return [i.to_dict() for i in ctx.state.of_kind(self.name)]

    # ---- the kernel -----------------------------------------------------------------
    def must_look(self, ctx: Context, intent: IntentT) -> bool:
        """Whether :meth:`check_free` has to ask the kernel (something of the intent's
        names exists); when not, it is known free without a wait."""
        return any(
            ctx.net.host_index(ifname) is not None if ns is None else ctx.net.ns_exists(ns)
            for ns, ifname in self.names(intent)
        )

    async def check_free(self, ctx: Context, intent: IntentT) -> None:
        """Before a new intent is recorded: it must not name what exists and is not
        netagent's. A namespace, bridge or interface someone else made is never taken
        over (the same NameTaken as on the repair path)."""
        for ns, ifname in self.names(intent):
            if ns is None and ctx.net.host_index(ifname) is None:
                continue  # the common case, without a netlink round trip
            if ns is not None and not ctx.net.ns_exists(ns):
                continue
            link = await ctx.net.link(ns, ifname)
            if link is not None and not link.belongs_to(intent.key):
                where = f"{ns}:{ifname}" if ns else ifname
                raise NameTaken(
                    f"{where} exists and was not made by netagent for this; it is left "
                    f"alone: remove it, or choose another name{self.rename_hint}"
                )

    #: how to pick another name, in the NameTaken message (``" (--ifname)"``)
    rename_hint: ClassVar[str] = ""

    async def ensure(self, ctx: Context, intent: IntentT, old: IntentT | None) -> list[str]:
        """Make the kernel hold the intent; observe first, act only on the difference;
        return what was done (empty: it was in place). ``old``: the intent this one
        replaces, when it was updated."""
        return []

    async def inspect(self, ctx: Context, intent: IntentT) -> list[str]:
        """What is missing for the intent (empty: in place). Changes nothing."""
        return []

    def refused(self, ctx: Context, intent: IntentT) -> str | None:
        """For a kind without steps: why it cannot be in place (None: it is)."""
        return None

    async def remove(self, ctx: Context, intent: IntentT) -> list[str]:
        """Remove what the intent made, and nothing that is not netagent's."""
        return []

    async def released(self, ctx: Context, intent: IntentT) -> None:
        """Called after a removal: let go of what was kept open for it."""


class Actions:
    """What an ensure did (or, in a dry run, would do)."""

    def __init__(self, dry_run: bool = False) -> None:
        self.dry_run = dry_run
        self.done: list[str] = []

    def add(self, what: str) -> bool:
        """Record an action; True when it should really be carried out."""
        self.done.append(what)
        return not self.dry_run


def want(d: Mapping[str, Any], name: str) -> Any:
    """A field of a persisted intent, or a clear error naming it."""
    if name not in d:
        raise InvalidArgument(f"{d.get('kind', 'intent')}: missing field {name!r}")
    return d[name]
