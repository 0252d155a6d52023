"""What the backend remembers between calls, kept out of the planners.

Reading 10,000 rules back costs ~0.3 s (``iptables-save`` plus parsing), and building
the chains 10,000 forwards want ~25 ms; a periodic pass over an unchanged table should
cost neither. :class:`ObservationCache` holds two things:

* the **observation**, stamped with the nf_tables generation it is valid at (see
  ``genid.py``). ``observe()`` answers from it while the generation has not moved, and
  ``apply()`` advances it with the batch's effects when the generation moved by exactly
  one commit per restore file (nobody else committed in between). With it goes
  ``in_sync``: the desired state the table is then exactly (a full plan applied against
  this very observation, or an update of such a state).
* the **wanted chains** of the last desired state a full plan was made for, advanced
  through updates that follow from it. They depend on the desired state alone, not on
  the table, so they stay valid across someone else's change (and with legacy
  iptables, where the generation does not exist): the full plan after drift compares
  against them instead of rebuilding 10,000 rules.

Both reach ``plan`` only as hints on the observation it is given (``Observed.in_sync``,
``Observed.wanted``); ``plan`` stores nothing. Nothing here runs a program.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..firewall import FirewallSpec
from .restore import RestorePayload
from .rules import Chains, Wanted, is_update_of
from .save import FamilyObserved, Observed


@dataclass(frozen=True)
class Pending:
    """An apply under way: the generation before it, and the observation valid then."""

    generation: int | None
    known: Observed | None


class ObservationCache:
    """``generation`` reads the nf_tables generation (None: unknown, nothing is kept)."""

    def __init__(self, generation: Callable[[], int | None]) -> None:
        self.read_generation = generation
        #: the generation ``observed`` is valid at
        self.generation: int | None = None
        self.observed: Observed | None = None
        self.wanted: Wanted | None = None

    def lookup(self) -> tuple[int | None, Observed | None]:
        """(the generation now, the observation if it is still valid). Shared, not a
        copy: read-only for everyone."""
        now = self.read_generation()
        if now is not None and self.observed is not None and now == self.generation:
            return now, self.observed
        return now, None

    def read(
        self,
        before: int | None,
        families: dict[int, FamilyObserved],
        filt: FamilyObserved | None = None,
    ) -> Observed:
        """A fresh read of the table, begun at generation ``before``: remembered if the
        generation did not move while the families were read one after the other. It
        carries the wanted chains, never ``in_sync`` (nothing is known about it yet)."""
        obs = Observed(families, wanted=self.wanted, filter=filt)
        if before is not None and self.read_generation() == before:
            self.generation, self.observed = before, obs
        else:
            self.forget()
        return obs

    def forget(self) -> None:
        """The table may have changed in a way not known here (the wanted chains stay:
        they do not depend on the table)."""
        self.generation = self.observed = None

    def begin(self, payload: RestorePayload) -> Pending:
        """Before the batch's files run: note what was valid, forget it (a failure
        leaves nothing stale behind), and take the batch's wanted chains."""
        now = self.read_generation()
        known = self.observed if now is not None and now == self.generation else None
        self.forget()
        self._advance_wanted(payload)
        return Pending(now, known)

    def commit(self, pending: Pending, payload: RestorePayload) -> None:
        """After every file of the batch ran: the observation advanced by their effects,
        when the generation moved by exactly one commit per file (each file is a real
        change: one transaction)."""
        if pending.generation is None or pending.known is None:
            return
        now = self.read_generation()
        files = len(payload) + (payload.filter_text is not None)
        if now != pending.generation + files:
            return
        families = dict(pending.known.families)
        for version, _text in payload.files():
            effect = payload.effects.get(version)
            if effect is None:
                return
            after = effect.after(families.get(version, FamilyObserved()))
            if after is None:
                return
            families[version] = after
        in_sync = self._in_sync(pending.known, payload)
        filt = pending.known.filter
        if payload.filter_text is not None:
            filt = payload.filter_after
        self.generation = now
        self.observed = Observed(families, in_sync=in_sync, wanted=self.wanted, filter=filt)

    @staticmethod
    def _in_sync(before: Observed, payload: RestorePayload) -> FirewallSpec | None:
        """The spec the table is exactly the desired state of once ``payload`` is in."""
        if payload.changes is None:
            # a full plan rewrote everything that differed from what it was planned on
            return payload.spec if payload.basis is before else None
        added, removed = payload.changes
        synced = before.in_sync
        if synced is not None and is_update_of(synced, payload.spec, added, removed):
            return payload.spec
        return None

    def _advance_wanted(self, payload: RestorePayload) -> None:
        if payload.changes is None:
            if payload.wanted is not None:
                self.wanted = payload.wanted
            return
        old = self.wanted
        added, removed = payload.changes
        if old is None or not is_update_of(old.spec, payload.spec, added, removed):
            self.wanted = None
            return
        # the update's effects on the old wanted chains are the new wanted chains
        chains: dict[int, Chains] = dict(old.chains)
        for version, effect in payload.effects.items():
            if version not in chains:
                self.wanted = None
                return
            now = effect.after_chains(chains[version])
            if now is None:
                self.wanted = None
                return
            chains[version] = now
        self.wanted = Wanted(payload.spec, chains)
