"""Reading ``iptables-save -t nat``: netagent's chains and jumps, and nothing else.

``iptables-save`` prints the whole table; every line that is not ours is dropped as it is
read. Checked with iptables 1.8.9 in both its nf_tables and legacy flavours: the same
save format.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

from ..firewall import FirewallSpec
from .rules import BUILTIN_CHAINS, PREFIX, Chains, Rule, Wanted, jump_rule

_TOKEN = re.compile(r'"((?:[^"\\]|\\.)*)"|(\S+)')
_UNESCAPE = re.compile(r"\\(.)")


def split_rule(text: str) -> list[str]:
    """Split a line of iptables-save the way iptables-restore does: whitespace separates,
    double quotes group (the comment match quotes its text, with ``\\"`` inside).
    A regular expression, not :mod:`shlex`: it is ten times faster, and a host with
    10,000 forwards has 20,000 lines to read on every pass."""
    out = []
    for quoted, bare in _TOKEN.findall(text):
        out.append(bare if bare else _UNESCAPE.sub(r"\1", quoted))
    return out


@dataclass
class FamilyObserved:
    """What of ours exists in one family's nat table."""

    #: each NETAGENT-* chain and its rules, in order
    chains: Chains = field(default_factory=dict)
    #: (built-in chain, NETAGENT-* target) -> how many of our exact jump rules
    jumps: Counter[tuple[str, str]] = field(default_factory=Counter)

    @property
    def present(self) -> bool:
        return bool(self.chains) or bool(self.jumps)


@dataclass
class Observed:
    """One :class:`FamilyObserved` per family this backend manages here (4, maybe 6).

    The two hints are never read from the table: the observation cache (``cache.py``)
    attaches what it knows, so that planning needs neither to rebuild nor to compare
    10,000 rules. ``in_sync``: these families are exactly what planning this spec wants
    (planning it finds nothing to do). ``wanted``: the chains a spec wants, already
    built. A plan that uses them returns what it would return without them (the cache's
    unit tests hold it to that); an observation made by hand has neither.
    """

    families: dict[int, FamilyObserved] = field(default_factory=dict)
    in_sync: FirewallSpec | None = None
    wanted: Wanted | None = None
    #: the IPv4 filter table's chain and jump (the VXLAN guard); None: not read
    filter: FamilyObserved | None = None

    @property
    def present(self) -> bool:
        return any(f.present for f in self.families.values()) or bool(
            self.filter is not None and self.filter.present
        )


def _is_jump(rule: Rule) -> bool:
    """Ours only if it is exactly our jump rule: someone else's jump into one of our
    chains, or a rule that merely borrows our comment, is not ours to count or delete."""
    return bool(rule) and rule[-1].startswith(PREFIX) and rule == jump_rule(rule[-1])


def parse_save(text: str, table: str = "nat") -> FamilyObserved:
    """Keep, from ``iptables-save -t nat`` (or ``-t filter``) output, our chains and our
    jump rules only; every other line is dropped as soon as it is read."""
    obs = FamilyObserved()
    in_nat = False
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("*"):
            in_nat = line == f"*{table}"
        elif not in_nat:
            continue
        elif line == "COMMIT":
            in_nat = False
        elif line.startswith(":"):
            name = line[1:].split(maxsplit=1)[0]
            if name.startswith(PREFIX):
                obs.chains.setdefault(name, [])
        elif line.startswith("-A "):
            tokens = split_rule(line)
            if len(tokens) < 2:
                continue
            chain, rule = tokens[1], tuple(tokens[2:])
            if chain.startswith(PREFIX):
                obs.chains.setdefault(chain, []).append(rule)
            elif chain in BUILTIN_CHAINS and _is_jump(rule):
                obs.jumps[(chain, rule[-1])] += 1
    return obs


def parse_filter(text: str) -> FamilyObserved:
    """From ``iptables-save -t filter``: the one chain netagent owns there
    (NETAGENT-INPUT, the VXLAN guard) and our jumps to it. Any other NETAGENT-* chain in
    the filter table is someone else's lookalike, never touched."""
    from .rules import CHAIN_INPUT

    obs = parse_save(text, "filter")
    chains = {c: r for c, r in obs.chains.items() if c == CHAIN_INPUT}
    jumps = Counter({k: n for k, n in obs.jumps.items() if k[1] == CHAIN_INPUT})
    return FamilyObserved(chains, jumps)
