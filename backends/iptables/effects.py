"""What a restore file does to a family's chains, so that the state after it can be
known without reading the table again.

``iptables-restore --noflush`` semantics this mirrors (iptables 1.8.9, both flavours):
declaring ``:CHAIN - [0:0]`` creates the chain or flushes it; ``-D`` deletes the first
rule that matches exactly and fails the whole file when none does; ``-A`` to a chain that
does not exist fails; ``-X`` deletes a chain. A file that fails changes nothing.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from .rules import Chains, Rule
from .save import FamilyObserved


@dataclass
class Effect:
    """What a restore file does to one family: chains it writes whole (their rules) or
    deletes (None), rules it deletes from or appends to others, and by how much it
    changes the count of each of our jumps. Applied to what was there, it gives what is
    there after."""

    chains: dict[str, list[Rule] | None] = field(default_factory=dict)
    deletes: dict[str, list[Rule]] = field(default_factory=dict)
    appends: dict[str, list[Rule]] = field(default_factory=dict)
    jumps: Counter[tuple[str, str]] = field(default_factory=Counter)

    def after(self, have: FamilyObserved) -> FamilyObserved | None:
        """None when the file could not have succeeded on ``have``. Builds new dicts and
        lists; ``have`` and this effect are left as they are (both may be shared)."""
        chains = dict(have.chains)
        for name, rules in self.chains.items():
            if rules is None:
                chains.pop(name, None)
            else:
                chains[name] = rules
        for name, rules in self.deletes.items():
            left = list(chains.get(name, ()))
            for rule in rules:
                if rule not in left:
                    return None
                left.remove(rule)  # -D deletes the first rule that matches
            chains[name] = left
        for name, rules in self.appends.items():
            if name not in chains:
                return None
            chains[name] = [*chains[name], *rules]
        jumps = Counter(have.jumps)
        for key, delta in self.jumps.items():
            jumps[key] += delta
            if jumps[key] < 0:
                return None
            if not jumps[key]:
                del jumps[key]
        return FamilyObserved(chains, jumps)

    def after_chains(self, chains: Chains) -> Chains | None:
        """The same for chains alone (the jumps left aside): what an update does to the
        chains a desired state wants."""
        now = self.after(FamilyObserved(chains))
        return None if now is None else now.chains
