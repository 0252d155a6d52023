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
from .rules import BUILTIN_CHAINS, COMMENT_PREFIX, PREFIX, Chains, Rule, Wanted, jump_rule, our_name

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
    #: ``NETAGENT-*`` chains that are not ours (no rule carries our mark, and the name is
    #: not one netagent gives): chain -> how many rules; never written, never deleted
    foreign: dict[str, int] = field(default_factory=dict)
    #: our chains that someone else's rule jumps to: chain -> those rules (as
    #: ``-A CHAIN ...`` text); such a chain is emptied, never deleted (``-X`` would fail)
    referenced: dict[str, list[str]] = field(default_factory=dict)

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


def _marked(rule: Rule) -> bool:
    """Does the rule carry netagent's mark (``-m comment --comment netagent:...``)?"""
    for i, word in enumerate(rule[:-1]):
        if word == "--comment" and rule[i + 1].startswith(COMMENT_PREFIX):
            return True
    return False


def _target(rule: Rule) -> str | None:
    """The chain a rule jumps or goes to (``-j``/``-g``), if any."""
    for i, token in enumerate(rule[:-1]):
        if token in ("-j", "-g", "--jump", "--goto"):
            return rule[i + 1]
    return None


def owned(name: str, rules: list[Rule]) -> bool:
    """A ``NETAGENT-*`` chain is netagent's when one of its rules carries netagent's
    mark, or when it is empty and its name is one netagent gives (a chain of ours that
    someone flushed), or when netagent's own marked jump leads to it. The prefix alone
    proves nothing: a user's ``NETAGENT-MINE`` with
    a rule of their own is theirs (issue 9, item 5)."""
    if rules:
        return any(_marked(r) for r in rules)
    return our_name(name)


def parse_save(text: str, table: str = "nat") -> FamilyObserved:
    """Keep, from ``iptables-save`` output, our chains and our jump rules in ``table``
    only; every other line is dropped as soon as it is read, except that foreign rules
    jumping into a ``NETAGENT-*`` chain are noted (so such a chain is emptied, never
    deleted) and foreign ``NETAGENT-*`` chains are counted (so they are left alone)."""
    obs = FamilyObserved()
    header = f"*{table}"
    in_table = False
    maybe: dict[str, list[Rule]] = {}
    into: list[tuple[str, str, str]] = []  # (chain of the rule, its target, its text)
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("*"):
            in_table = line == header
        elif not in_table:
            continue
        elif line == "COMMIT":
            in_table = False
        elif line.startswith(":"):
            name = line[1:].split(maxsplit=1)[0]
            if name.startswith(PREFIX):
                maybe.setdefault(name, [])
        elif line.startswith("-A "):
            tokens = split_rule(line)
            if len(tokens) < 2:
                continue
            chain, rule = tokens[1], tuple(tokens[2:])
            if chain.startswith(PREFIX):
                maybe.setdefault(chain, []).append(rule)
            elif chain in BUILTIN_CHAINS and _is_jump(rule):
                obs.jumps[(chain, rule[-1])] += 1
            elif PREFIX in line:
                target = _target(rule)
                if target is not None and target.startswith(PREFIX):
                    into.append((chain, target, line))
    jumped = {target for _builtin, target in obs.jumps}
    for name, rules in maybe.items():
        if owned(name, rules) or name in jumped:
            obs.chains[name] = rules
        else:
            obs.foreign[name] = len(rules)
            for rule in rules:
                target = _target(rule)
                if target is not None and target.startswith(PREFIX):
                    into.append((name, target, f"-A {name} {' '.join(rule)}"))
    for _chain, target, text_ in into:
        if target in obs.chains:
            obs.referenced.setdefault(target, []).append(text_)
    return obs


def only(obs: FamilyObserved, names: frozenset[str]) -> FamilyObserved:
    """What ``obs`` holds of the chains ``names`` alone (and the jumps to them): the
    filter table's chains have two keepers (the VXLAN guard here, the accepts and the
    localhost guard in ``backends/xtfilter.py``), and neither touches the other's."""
    return FamilyObserved(
        {c: r for c, r in obs.chains.items() if c in names},
        Counter({k: n for k, n in obs.jumps.items() if k[1] in names}),
        {c: n for c, n in obs.foreign.items() if c in names},
        {c: r for c, r in obs.referenced.items() if c in names},
    )


def parse_filter(text: str) -> FamilyObserved:
    """From ``iptables-save -t filter``: the chain the iptables backend owns there
    (NETAGENT-VXLAN, the VXLAN guard) and our jumps to it; the other chains of ours in
    that table are ``backends/xtfilter.py``'s, and other NETAGENT-* chains are someone
    else's lookalikes, never touched."""
    from .rules import CHAIN_VXLAN

    return only(parse_save(text, "filter"), frozenset({CHAIN_VXLAN}))
