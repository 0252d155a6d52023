"""A packet walked through the host's firewalls as the kernel would, on paper.

Every base chain registered at a hook runs, lowest priority first, whichever table or
tool it belongs to: an accept ends only its own chain, a drop (or reject) anywhere ends
the packet. Within a chain, rules are taken in order, jumps followed, returns honoured,
and a chain's end means its policy (base chains) or a return (others).

What the walk cannot know (a match it does not understand, such as ``-m addrtype``, or
a packet field left open) makes a rule *maybe* match. A drop that only maybe matches is
reported as such and the walk goes on as if it did not match, so a verdict is "certain"
only when every match on its path was understood. Used by ``doctor`` (does something
drop the bridges' or forwards' traffic?), ``show`` and ``explain`` (the path, step by
step). Pure: it reads :class:`~netagent.backends.hostfw.HostFirewall` only.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from netagent.backends.hostfw import Chain, HostFirewall, Rule

YES, NO, MAYBE = "yes", "no", "maybe"
TERMINAL = frozenset({"ACCEPT", "DROP", "REJECT", "DNAT", "SNAT", "MASQUERADE", "REDIRECT"})
DROPS = frozenset({"DROP", "REJECT"})
#: how deep jumps are followed (a loop in someone's rules must not hang us)
MAX_DEPTH = 16


@dataclass(frozen=True)
class Packet:
    family: int
    proto: str
    dport: int | None = None
    iif: str | None = None
    oif: str | None = None
    saddr: str | None = None
    daddr: str | None = None
    #: conntrack states and statuses it has: NEW, ESTABLISHED, RELATED, DNAT, SNAT
    states: frozenset[str] = frozenset({"NEW"})


@dataclass
class Outcome:
    """What one base chain did to the packet."""

    chain: Chain
    verdict: str  # ACCEPT (the chain let it on), DROP, REJECT, DNAT, ...
    #: the rule that decided (None: the chain's policy or end)
    rule: Rule | None
    #: where the deciding rule is (the chain jumped to)
    where: Chain
    certain: bool
    path: list[str] = field(default_factory=list)
    #: drops on the way that only maybe matched
    maybe_drops: list[tuple[Chain, Rule]] = field(default_factory=list)
    #: accepts (or jumps) skipped because they only maybe matched: a drop after them
    #: is not certain
    maybe_passed: list[tuple[Chain, Rule]] = field(default_factory=list)


def _iface(pattern: str, name: str | None) -> str:
    if name is None:
        return MAYBE
    if pattern.endswith(("+", "*")):
        return YES if name.startswith(pattern[:-1]) else NO
    return YES if name == pattern else NO


def _addr(spec: str, addr: str | None) -> str:
    if addr is None:
        return MAYBE
    try:
        return YES if ipaddress.ip_address(addr) in ipaddress.ip_network(spec, False) else NO
    except ValueError:
        return MAYBE


def _flip(result: str, neg: bool) -> str:
    if not neg or result == MAYBE:
        return result
    return NO if result == YES else YES


def match(rule: Rule, pkt: Packet) -> str:
    """yes / no / maybe: does the rule match the packet?"""
    results = []
    if rule.proto not in (None, "all", "0"):
        results.append(YES if rule.proto == pkt.proto else NO)
    if rule.dports:
        if pkt.dport is None:
            results.append(MAYBE)
        else:
            results.append(YES if any(lo <= pkt.dport <= hi for lo, hi in rule.dports) else NO)
    for have, name in ((rule.iif, pkt.iif), (rule.oif, pkt.oif)):
        if have is not None:
            results.append(_flip(_iface(have[0], name), have[1]))
    for spec, addr in ((rule.daddr, pkt.daddr), (rule.saddr, pkt.saddr)):
        if spec is not None:
            results.append(_flip(_addr(spec[0], addr), spec[1]))
    if rule.ctstate is not None:
        wanted, neg = rule.ctstate
        results.append(_flip(YES if wanted & pkt.states else NO, neg))
    if NO in results:
        return NO
    if rule.unknown or MAYBE in results:
        return MAYBE
    return YES


def _walk(
    chain: Chain, pkt: Packet, siblings: dict[str, Chain], out: Outcome, depth: int, sure: bool
) -> tuple[str, Rule | None, Chain] | None:
    """The terminal verdict reached in ``chain`` (and what it jumped to), or None when
    it returned / fell off its end."""
    for n, rule in enumerate(chain.rules, 1):
        m = match(rule, pkt)
        if m == NO:
            continue
        how = "" if m == YES else " (maybe)"
        if rule.verdict in ("JUMP", "GOTO") and rule.target in siblings and depth < MAX_DEPTH:
            out.path.append(f"{chain.name} rule {n}: {rule.text} -> {rule.target}{how}")
            found = _walk(siblings[rule.target], pkt, siblings, out, depth + 1, sure and m == YES)
            if found is not None:
                return found
            if rule.verdict == "GOTO":
                return None
            continue
        if rule.verdict in DROPS and m == MAYBE:
            out.maybe_drops.append((chain, rule))
            out.path.append(f"{chain.name} rule {n}: {rule.text}: {rule.verdict} (maybe)")
            continue
        if m == MAYBE and rule.verdict is not None:
            out.maybe_passed.append((chain, rule))
        if rule.verdict == "RETURN" and m == YES:
            out.path.append(f"{chain.name} rule {n}: RETURN")
            return None
        if rule.verdict in TERMINAL and m == YES:
            out.path.append(f"{chain.name} rule {n}: {rule.text}: {rule.verdict}")
            out.certain = sure and not (rule.verdict in DROPS and out.maybe_passed)
            return rule.verdict, rule, chain
    return None


def through(fw: HostFirewall, base: Chain, pkt: Packet) -> Outcome:
    """What one base chain does to the packet."""
    out = Outcome(base, "ACCEPT", None, base, certain=True)
    if base.family is not None and base.family != pkt.family:
        return out
    found = _walk(base, pkt, fw.table_of(base), out, 0, True)
    if found is not None:
        out.verdict, out.rule, out.where = found
        return out
    out.verdict = base.policy or "ACCEPT"
    out.certain = not out.maybe_passed
    out.path.append(f"{base.name}: end of chain, policy {out.verdict}")
    return out


def _used(fw: HostFirewall, hook: str) -> tuple[bool, ...]:
    """Which of a packet's fields (proto, dport, iif, oif, saddr, daddr, states) some rule
    of the tables at ``hook`` matches on: a field no rule reads cannot change a walk."""
    used = [False] * 7
    tables = {id(t): t for t in (fw.table_of(base) for base in fw.base(hook))}
    for chains in tables.values():
        for chain in chains.values():
            for r in chain.rules:
                used[0] |= r.proto not in (None, "all", "0")
                used[1] |= bool(r.dports)
                used[2] |= r.iif is not None
                used[3] |= r.oif is not None
                used[4] |= r.saddr is not None
                used[5] |= r.daddr is not None
                used[6] |= r.ctstate is not None
    return tuple(used)


def at_hook(fw: HostFirewall, hook: str, pkt: Packet) -> list[Outcome]:
    """Every base chain at ``hook``, in order, until one drops the packet. Walks are
    kept with the snapshot (:meth:`~HostFirewall.kept`), by the packet's fields that some
    rule there reads: after a reading, 10,000 forwards to one bridge that differ only in
    ports no rule matches on are one walk, not 10,000. The outcomes are shared: read-only."""
    walks = fw.kept(f"walks at {hook}")
    used = walks.get("fields")
    if used is None:
        used = walks["fields"] = _used(fw, hook)
    fields = (pkt.proto, pkt.dport, pkt.iif, pkt.oif, pkt.saddr, pkt.daddr, pkt.states)
    key = (pkt.family, *(v if u else None for v, u in zip(fields, used, strict=True)))
    got = walks.get(key)
    if got is None:
        got = walks[key] = _at_hook(fw, hook, pkt)
    return got


def _at_hook(fw: HostFirewall, hook: str, pkt: Packet) -> list[Outcome]:
    outcomes = []
    for base in fw.base(hook):
        if base.family is not None and base.family != pkt.family:
            continue
        outcome = through(fw, base, pkt)
        outcomes.append(outcome)
        if outcome.verdict in DROPS:
            break
    return outcomes


def dropped(outcomes: list[Outcome]) -> Outcome | None:
    for outcome in outcomes:
        if outcome.verdict in DROPS:
            return outcome
    return None
