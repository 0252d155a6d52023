"""An in-memory :class:`~netagent.backends.firewall.FirewallBackend` for tests without root.

It keeps what a real backend would have installed: each forward by its key with its
destination, and the per-bridge rules (hairpin, masquerade) by their text. It holds the
contract of ``docs/backends.md`` the way the real backends do:

* :meth:`FakeFirewall.plan` and :meth:`FakeFirewall.plan_update` are pure (a batch of
  operations, computed from their arguments only);
* :meth:`FakeFirewall.apply` is one transaction: every operation is checked against what
  is installed, and if one does not fit (deleting a forward that is not there or points
  elsewhere, adding one whose key holds another destination, anything at all while the
  table is gone) nothing is changed and ``BackendFailed`` is raised, as ``nft`` refuses
  the whole script. So an update planned from a stale picture fails, and the reconciler
  falls back to observing and planning whole;
* :meth:`FakeFirewall.purge` removes everything and says what it removed.

``dump()`` prints what is installed, one sorted line each, so a test compares text, like
knftables' fake. Faults are injected like ``FakeNetlink``'s: :meth:`FakeFirewall.fail`
makes the next call of ``observe``, ``apply``, ``purge`` or ``present`` raise, and
:meth:`FakeFirewall.hang` makes it never answer. :meth:`FakeFirewall.drop_forward` and
:meth:`FakeFirewall.drop_table` play someone else changing the rules (drift).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from netagent.agent import intents as I
from netagent.agent.errors import BackendFailed

from .faults import Faults
from .firewall import Batch, Counts, FirewallBackend, FirewallSpec, VxlanGuard

Verb = Literal["create", "add", "delete", "add-rule", "delete-rule"]


@dataclass(frozen=True)
class Op:
    """One operation of a batch: a forward added or deleted (``what`` is its key), a
    bridge rule added or deleted (``what`` is its text), or the table created."""

    verb: Verb
    what: str = ""
    forward: I.Forward | None = None


@dataclass(frozen=True)
class FakePayload:
    """What :meth:`FakeFirewall.apply` runs: ``full`` from ``plan``, ``update`` from
    ``plan_update``."""

    kind: Literal["full", "update"]
    ops: tuple[Op, ...] = ()


@dataclass(frozen=True)
class FakeRuleset:
    """What :meth:`FakeFirewall.observe` returns: a copy, never the live state."""

    present: bool = False
    forwards: dict[str, I.Forward] = field(default_factory=dict)
    rules: frozenset[str] = frozenset()


def bridge_rules(br: I.Bridge) -> list[str]:
    """The rules a bridge needs, in text that names everything they depend on (a bridge
    readdressed to another subnet needs other rules, not the same ones kept)."""
    out = []
    for addr in br.addresses:
        out.append(f"hairpin {br.key} {addr.network}")
        if br.masquerade:
            out.append(f"masquerade {br.key} {addr.network} oifname != {br.name}")
    return out


def vxlan_rules(guard: VxlanGuard | None) -> list[str]:
    """The VXLAN port's guard, one line per peer allowed, and the masquerade of
    forwarded connections leaving through the device."""
    if guard is None:
        return []
    out = [f"vxlan-guard udp/{guard.port} drop unless a peer", f"vxlan-dnat {guard.device}"]
    return out + [f"vxlan-peer {ip}" for ip in sorted(guard.peers)]


def _forward_line(fwd: I.Forward) -> str:
    return f"forward {fwd.key}: {fwd.describe()}"


class FakeFirewall(Faults, FirewallBackend[FakeRuleset, FakePayload]):
    name = "fake"
    update_reads_forwards = False  # as nftables: an update is the changed forwards alone

    def __init__(self, calls: list[tuple[Any, ...]] | None = None) -> None:
        Faults.__init__(self)
        #: whether the table exists (a real backend's ``inet netagent``)
        self.table = False
        self.forwards: dict[str, I.Forward] = {}
        self.rules: set[str] = set()
        #: every call that reads or changes the rules, in order; pass ``FakeNetlink.calls``
        #: to see the firewall's calls and the links' in one order
        self.calls = calls if calls is not None else []
        #: what each forward's rule has counted, as a test sets it (``carry``); a
        #: forward installed anew starts at nothing, as a new map element does
        self.hits: dict[str, tuple[int, int]] = {}

    # ---- test controls --------------------------------------------------------------
    def drop_forward(self, key: str) -> None:
        """Someone else deleted a forward's rule (an ``nft delete element``)."""
        del self.forwards[key]
        self.hits.pop(key, None)

    def carry(self, key: str, packets: int = 1, octets: int = 60) -> None:
        """Traffic went through an installed forward (its counter moves)."""
        p, b = self.hits.get(key, (0, 0))
        self.hits[key] = (p + packets, b + octets)

    def drop_table(self) -> None:
        """Someone else deleted the whole table (``nft flush ruleset``)."""
        self.table = False
        self.forwards.clear()
        self.rules.clear()
        self.hits.clear()

    def dump(self) -> str:
        """What is installed, one line each, sorted."""
        lines = [_forward_line(f) for f in self.forwards.values()]
        lines += [f"rule {r}" for r in self.rules]
        return "\n".join(sorted(lines))

    # ---- the backend ----------------------------------------------------------------
    @classmethod
    def probe(cls) -> tuple[bool, str]:
        return True, "in memory"

    async def observe(self) -> FakeRuleset:
        await self._fault("observe")
        self.calls.append(("fw.observe",))
        return FakeRuleset(self.table, dict(self.forwards), frozenset(self.rules))

    def plan(self, spec: FirewallSpec, observed: FakeRuleset) -> Batch[FakePayload]:
        want = {f.key: f for f in spec.forwards}
        want_rules = {r for br in spec.bridges for r in bridge_rules(br)}
        want_rules.update(vxlan_rules(spec.vxlan))
        if not observed.present:
            ops = [Op("create")]
            ops += [Op("add", k, f) for k, f in sorted(want.items())]
            ops += [Op("add-rule", r) for r in sorted(want_rules)]
            step = f"create table ({len(want)} forwards, {len(want_rules)} rules)"
            return Batch([step], FakePayload("full", tuple(ops)), rebuild=True)
        ops = []
        for key, have in sorted(observed.forwards.items()):
            if want.get(key) != have:
                ops.append(Op("delete", key, have))
        touched = set()
        for key, fwd in sorted(want.items()):
            if observed.forwards.get(key) != fwd:
                ops.append(Op("add", key, fwd))
                touched.add(key)
        ops += [Op("delete-rule", r) for r in sorted(observed.rules - want_rules)]
        ops += [Op("add-rule", r) for r in sorted(want_rules - observed.rules)]
        payload = FakePayload("full", tuple(ops))
        return Batch(_steps(ops), payload, touched=frozenset(touched))

    def plan_update(
        self, spec: FirewallSpec, added: list[I.Forward], removed: list[I.Forward]
    ) -> Batch[FakePayload]:
        ops = [Op("delete", f.key, f) for f in removed] + [Op("add", f.key, f) for f in added]
        return Batch(
            _steps(ops),
            FakePayload("update", tuple(ops)),
            touched=frozenset(f.key for f in added),
        )

    def plan_guard(
        self, spec: FirewallSpec, added: set[str], removed: set[str]
    ) -> Batch[FakePayload]:
        ops = [Op("delete-rule", f"vxlan-peer {ip}") for ip in sorted(removed)]
        ops += [Op("add-rule", f"vxlan-peer {ip}") for ip in sorted(added)]
        return Batch(_steps(ops), FakePayload("update", tuple(ops)))

    async def apply(self, batch: Batch[FakePayload]) -> None:
        await self._fault("apply")
        if batch.payload is None or not batch.payload.ops:
            return
        payload = batch.payload
        self.calls.append(("fw.apply", payload.kind, tuple(batch.steps)))
        table, forwards, rules = self.table, dict(self.forwards), set(self.rules)
        for op in payload.ops:
            if op.verb == "create":
                table = True
                continue
            if not table:
                raise BackendFailed(f"fake firewall: no table for {op.verb} {op.what}")
            if op.verb == "add":
                assert op.forward is not None
                have = forwards.get(op.what)
                if have is not None and have != op.forward:
                    raise BackendFailed(
                        f"fake firewall: {op.what} exists as {have.describe()}; "
                        f"cannot add {op.forward.describe()}"
                    )
                if forwards.get(op.what) != op.forward:
                    self.hits.pop(op.what, None)
                forwards[op.what] = op.forward
            elif op.verb == "delete":
                have = forwards.get(op.what)
                if have is None or have != op.forward:
                    found = "not installed" if have is None else f"installed as {have.describe()}"
                    raise BackendFailed(f"fake firewall: cannot delete {op.what}: {found}")
                del forwards[op.what]
            elif op.verb == "add-rule":
                if op.what in rules:
                    raise BackendFailed(f"fake firewall: rule {op.what!r} is there already")
                rules.add(op.what)
            else:
                if op.what not in rules:
                    raise BackendFailed(f"fake firewall: no rule {op.what!r} to delete")
                rules.discard(op.what)
        self.table, self.forwards, self.rules = table, forwards, rules

    async def counters(self, forwards: Sequence[I.Forward]) -> dict[str, Counts] | None:
        await self._fault("counters")
        return {
            f.key: self.hits.get(f.key, (0, 0)) for f in forwards if self.forwards.get(f.key) == f
        }

    async def purge(self) -> list[str]:
        await self._fault("purge")
        self.calls.append(("fw.purge",))
        if not self.table:
            return []
        removed = self.dump()
        self.drop_table()
        return [f"deleted table ({len(removed.splitlines())} entries)"]

    async def present(self) -> bool:
        """Whether anything of the backend's exists (``docs/backends.md``)."""
        await self._fault("present")
        return self.table


def _steps(ops: Iterable[Op]) -> list[str]:
    out = []
    for op in ops:
        if op.forward is not None:
            out.append(f"{op.verb} {_forward_line(op.forward)}")
        else:
            out.append(f"{op.verb} {op.what}".rstrip())
    return out
