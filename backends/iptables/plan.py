"""The planners: desired state + observation -> a batch of restore files. Pure: the
same arguments give the same batch, and nothing is stored anywhere.

A full plan (:func:`plan_full`) writes whole the chains that differ and nothing else;
an update (:func:`plan_update`) appends and deletes single rules in the port blocks the
changed forwards live in, by their exact text, without an observation. Speed comes from
the observation's hints (``Observed.in_sync``, ``Observed.wanted``, set by the cache in
``cache.py``), never from a memo here.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from netagent.agent import intents as I
from netagent.agent.errors import BackendFailed, BackendUnavailable

from ..firewall import Batch, FirewallSpec, VxlanGuard
from .effects import Effect
from .restore import RestorePayload, chain_lines, restore_text, rule_line
from .rules import (
    CHAIN_POST,
    CHAIN_VXLAN,
    ENTRY_CHAINS,
    ENTRY_RULES,
    HOOKS,
    MAX_DETAIL,
    PATH_CHAINS,
    WIDTHS,
    Chains,
    Leaf,
    Rule,
    Wanted,
    describe,
    dnat_rules,
    forwards_below,
    guard_rules,
    jump_rule,
    jump_text,
    leaf_chains,
    leaf_name,
    leaves_of,
    plural,
    same_spec,
    spec_families,
    tree_above,
)
from .save import FamilyObserved, Observed

#: per family, the restore program's name (for the refusal below)
RESTORE_PROGRAMS = {4: "iptables-restore", 6: "ip6tables-restore"}


def check_families(spec: FirewallSpec, families: Iterable[int]) -> None:
    """Refuse a desired state with IPv6 content where there is no ip6tables (or the
    kernel has no IPv6): it could only fail later, half applied."""
    missing = spec_families(spec) - set(families)
    if missing:
        raise BackendUnavailable(
            f"the iptables backend cannot serve IPv{min(missing)} here "
            f"({RESTORE_PROGRAMS.get(min(missing), 'the restore program')} is missing or "
            "the kernel lacks that family); remove those forwards/addresses or use "
            "--firewall nftables"
        )


def check_names(version: int, want: Chains, have: FamilyObserved) -> None:
    """A chain netagent needs whose name someone else's chain has (its rules carry no
    netagent mark) is never flushed or taken over: the plan is refused, naming it."""
    taken = sorted(set(want) & set(have.foreign))
    if taken:
        raise BackendFailed(
            f"chain {taken[0]} (ipv{version}) exists and is not netagent's (its "
            f"{plural(have.foreign[taken[0]], 'rule')} carry no netagent mark); netagent "
            "needs that name: rename or remove that chain"
        )


def _dedup(steps: list[str]) -> list[str]:
    return list(dict.fromkeys(steps))


def _rule_steps(adds: list[Rule], dels: list[Rule], version: int) -> list[str]:
    # PREROUTING and OUTPUT carry the same entry rules: say each change once
    add, gone = list(dict.fromkeys(adds)), list(dict.fromkeys(dels))
    if len(add) + len(gone) > MAX_DETAIL:
        # a line per rule helps nobody at 10,000 forwards, and describing them costs time
        return [f"add {plural(len(add), 'rule')}, delete {len(gone)} (ipv{version})"]
    return _dedup([f"delete {describe(r)}" for r in gone] + [f"add {describe(r)}" for r in add])


@dataclass
class FamilyPlan:
    lines: list[str] = field(default_factory=list)
    steps: list[str] = field(default_factory=list)
    #: a jump into our chains is added, or an entry chain or NETAGENT-DNAT is written:
    #: every forward's path (``Batch.rebuild``)
    rebuild: bool = False
    #: the port-block chains written whole: the forwards in them (``Batch.touched``)
    blocks: set[str] = field(default_factory=set)
    effect: Effect = field(default_factory=Effect)


def plan_family(version: int, want: Chains, have: FamilyObserved) -> FamilyPlan:
    """The restore lines and steps that turn ``have`` into ``want`` for one family.
    Unchanged chains are left out of the file, so they are neither flushed nor
    rewritten."""
    out = FamilyPlan()
    decls: list[str] = []
    body: list[str] = []
    tail: list[str] = []
    adds: list[Rule] = []
    dels: list[Rule] = []
    wanted_jumps = {(builtin, chain) for builtin, chain in HOOKS}
    # jumps first: a jump into a chain we delete below must be gone before the chain.
    # Deleting a duplicate or stale jump leaves every forward's path as it is.
    for (builtin, target), count in sorted(have.jumps.items()):
        extra = count - 1 if (builtin, target) in wanted_jumps else count
        for _ in range(extra):
            body.append(rule_line("-D", builtin, jump_rule(target)))
        if extra:
            out.effect.jumps[(builtin, target)] -= extra
            what = "duplicate " if (builtin, target) in wanted_jumps else ""
            out.steps.append(f"delete {what}{jump_text(builtin, target, version)}")
    check_names(version, want, have)
    for chain in sorted(set(have.chains) - set(want)):
        # an owned chain this version no longer uses: flush (declare) it, then delete it
        # (the chain that jumped to it is rewritten below, without the jump). One that a
        # rule not of ours jumps to is only emptied: ``-X`` would fail the whole file
        # ("CHAIN_DEL ... busy") and with it every other change
        if chain in have.referenced:
            if have.chains[chain]:
                decls.append(f":{chain} - [0:0]")
                out.steps.append(f"empty chain {chain} (ipv{version}; someone else jumps to it)")
                out.effect.chains[chain] = []
                dels += have.chains[chain]
            continue
        decls.append(f":{chain} - [0:0]")
        tail.append(f"-X {chain}")
        out.steps.append(f"delete chain {chain} (ipv{version})")
        out.effect.chains[chain] = None
        dels += have.chains[chain]
    for chain, rules in want.items():
        old = have.chains.get(chain)
        # order within our chains does not matter: forwards never overlap (the desired
        # state refuses that), the blocks of one level are disjoint, and the POSTROUTING
        # rules all masquerade; comparing as multisets lets appends stand
        if old:
            if old is rules or old == rules:
                continue
            wanted, had = Counter(rules), Counter(old)
            if wanted == had:
                continue
            adds += (wanted - had).elements()
            dels += (had - wanted).elements()
        elif old is not None and not rules:
            continue
        else:
            adds += rules  # a chain created or emptied (``iptables -F``): all of it
        if chain in PATH_CHAINS:
            out.rebuild = True
        elif chain != CHAIN_POST:
            out.blocks.add(chain)
        decls.append(f":{chain} - [0:0]")
        body += chain_lines(chain, rules)
        out.effect.chains[chain] = rules
        verb = "create" if old is None else "rewrite"
        out.steps.append(f"{verb} chain {chain} (ipv{version}, {plural(len(rules), 'rule')})")
    for builtin, chain in HOOKS:
        if not have.jumps.get((builtin, chain)):
            # first, so the host's own rules further down cannot pre-empt the forwards
            tail.append(rule_line("-I", builtin, jump_rule(chain), position=1))
            out.steps.append(f"add {jump_text(builtin, chain, version)}")
            out.effect.jumps[(builtin, chain)] += 1
            out.rebuild = True
    out.lines = decls + body + tail
    out.steps += _rule_steps(adds, dels, version)
    return out


def plan_full(
    spec: FirewallSpec, observed: Observed, families: tuple[int, ...]
) -> Batch[RestorePayload]:
    """Families whose chains and jumps are as wanted contribute nothing; the others get
    one restore file that rewrites just the chains that differ. A family missing from
    ``observed`` is planned as if nothing of ours were there.

    The payload is there even when nothing differs (no file in it): applying it tells
    the observation cache that this table is ``spec``'s. Only an observation the cache
    already marks ``in_sync`` with ``spec`` gives a batch without a payload."""
    check_families(spec, families)
    if observed.in_sync is not None and same_spec(spec, observed.in_sync):
        return Batch()
    hint = observed.wanted
    wanted = hint if hint is not None and hint.serves(spec, families) else Wanted.of(spec, families)
    payload = RestorePayload(spec, basis=observed, wanted=wanted)
    steps: list[str] = []
    rebuild = False
    touched: set[str] = set()
    for version in families:
        have = observed.families.get(version, FamilyObserved())
        fplan = plan_family(version, wanted.chains[version], have)
        if fplan.lines:
            payload[str(version)] = restore_text(fplan.lines)
            payload.effects[version] = fplan.effect
            steps += fplan.steps
            rebuild |= fplan.rebuild
            touched |= forwards_below(wanted.chains[version], fplan.blocks)
    if 4 in families:
        lines, fsteps, after = plan_filter(spec.vxlan, observed.filter or FamilyObserved())
        if lines:
            payload.filter_text = restore_text(lines, "filter")
            payload.filter_after = after
            steps += fsteps
    return Batch(steps=steps, payload=payload, rebuild=rebuild, touched=frozenset(touched))


GUARD_JUMP = ("INPUT", CHAIN_VXLAN)


def plan_filter(
    guard: VxlanGuard | None, have: FamilyObserved
) -> tuple[list[str], list[str], FamilyObserved]:
    """The IPv4 filter table's part: NETAGENT-VXLAN (the VXLAN guard) and the jump to it
    first in INPUT, or neither without a VXLAN device. (restore lines, steps, what of
    ours the table holds after them); no lines when it is as wanted."""
    want = {CHAIN_VXLAN: guard_rules(guard)} if guard is not None else {}
    after = FamilyObserved(want, Counter({GUARD_JUMP: 1}) if guard is not None else Counter())
    decls: list[str] = []
    jumps: list[str] = []
    body: list[str] = []
    tail: list[str] = []
    steps: list[str] = []
    for (builtin, target), count in sorted(have.jumps.items()):
        keep = 1 if guard is not None and (builtin, target) == GUARD_JUMP else 0
        for _ in range(count - keep):
            jumps.append(rule_line("-D", builtin, jump_rule(target)))
            steps.append(f"delete {jump_text(builtin, target, 4)}")
    for chain in sorted(set(have.chains) - set(want)):
        decls.append(f":{chain} - [0:0]")
        tail.append(f"-X {chain}")
        steps.append(f"delete chain {chain} (ipv4 filter)")
    for chain, rules in want.items():
        if have.chains.get(chain) == rules:
            continue
        decls.append(f":{chain} - [0:0]")
        body += chain_lines(chain, rules)
        verb = "create" if chain not in have.chains else "rewrite"
        steps.append(f"{verb} chain {chain} (ipv4 filter, {plural(len(rules) - 1, 'VXLAN peer')})")
    if guard is not None and not have.jumps.get(GUARD_JUMP):
        tail.append(rule_line("-I", "INPUT", jump_rule(CHAIN_VXLAN), position=1))
        steps.append(f"add {jump_text('INPUT', CHAIN_VXLAN, 4)}")
    return decls + jumps + body + tail, steps, after


def plan_update(
    spec: FirewallSpec,
    added: list[I.Forward],
    removed: list[I.Forward],
    families: tuple[int, ...],
) -> Batch[RestorePayload]:
    """The added forwards' rules appended to their port blocks, the removed ones'
    deleted, one ``iptables-restore --noflush`` per family: a change costs about the
    same with 10 forwards or 10,000. See :func:`plan_update_family`; if the table is not
    as this assumes, applying fails and nothing changes. It never writes the path every
    forward shares (no ``rebuild``) and writes the added forwards' rules (``touched``)."""
    if not added and not removed:
        return Batch()
    check_families(spec, families)
    payload = RestorePayload(spec, changes=(list(added), list(removed)))
    if sum(f.count for f in [*added, *removed]) > MAX_DETAIL:
        steps = [f"delete {plural(len(removed), 'forward')}, add {len(added)}"]
    else:
        steps = [f"delete {describe(r)}" for f in removed for r in dnat_rules(f)]
        steps += [f"add {describe(r)}" for f in added for r in dnat_rules(f)]
    for version in sorted({f.family for f in [*added, *removed]}):
        fplan = plan_update_family(version, spec, added, removed)
        payload[str(version)] = restore_text(fplan.lines)
        payload.effects[version] = fplan.effect
    return Batch(steps=steps, payload=payload, touched=frozenset(f.key for f in added))


#: what an update checks before it changes anything: our jumps and the entry rules, each
#: ``-C`` reading only small chains (a built-in chain, an entry chain, NETAGENT-DNAT)
PATH_CHECKS: tuple[tuple[str, Rule], ...] = (
    *((builtin, jump_rule(chain)) for builtin, chain in HOOKS),
    *((chain, rule) for chain in ENTRY_CHAINS for rule in ENTRY_RULES),
)


def plan_update_family(
    version: int, spec: FirewallSpec, added: list[I.Forward], removed: list[I.Forward]
) -> FamilyPlan:
    """The changed forwards' rules appended to (``-A``) or deleted from (``-D``, by their
    exact text) the last-level blocks they live in; blocks that appear are created, with
    a jump appended to the chain above; blocks that empty lose that jump and are deleted.
    What was there is inferred: the desired state without ``added``, with ``removed``.
    Every line reads or writes a chain of 64 ports (a rule per port and host address
    forwarded) or of at most 64 jumps, so the cost does not grow with the number of
    forwards; the desired state is only scanned for which blocks hold a forward. Adding
    flushes and deletes nothing: a file that deletes a rule waits for an RCU grace period
    (~15 ms) as it exits.

    Without an observation we cannot know whether the path to a block is still there:
    the file *checks* (``-C``) our jumps, the entry rules, and the jump into each block it
    changes (a ``-D`` of a rule that is not there fails by itself). If one is missing the
    whole transaction fails, nothing changes, and the reconciler falls back to observe +
    plan."""
    out = FamilyPlan()
    width = WIDTHS[-1]
    plus = [f for f in added if f.family == version]
    minus = [f for f in removed if f.family == version]
    changed: set[Leaf] = set()
    for fwd in (*plus, *minus):
        changed.update(leaves_of(fwd))
    # one pass over the desired state: which blocks hold a forward, and which forwards
    # live in a changed block
    after: set[Leaf] = set()
    touching: list[I.Forward] = []
    for fwd in spec.forwards:
        if fwd.family != version:
            continue
        if fwd.count == 1:
            leaf: Leaf = (fwd.proto, fwd.host_port - fwd.host_port % width)
            after.add(leaf)
            if leaf in changed:
                touching.append(fwd)
        else:
            mine = leaves_of(fwd)
            after.update(mine)
            if not changed.isdisjoint(mine):
                touching.append(fwd)
    # by identity first (a change of 10,000 forwards hands the same objects in the
    # desired state and in ``added``; hashing them all would cost), then by value
    new_ids = {id(f) for f in plus}
    rest = [f for f in touching if id(f) not in new_ids]
    if rest:
        new = set(plus)
        rest = [f for f in rest if f not in new]
    before = (after - changed) | {
        leaf for f in (*rest, *minus) for leaf in leaves_of(f) if leaf in changed
    }
    above_after, above_before = tree_above(after), tree_above(before)

    created: dict[str, list[Rule]] = {}
    deletes: dict[str, list[Rule]] = {}
    appends: dict[str, list[Rule]] = {}
    for name, rules in above_after.chains.items():
        old = above_before.chains.get(name)
        if old is None:
            created[name] = rules
        elif old != rules:
            had, has = set(old), set(rules)
            if less := [r for r in old if r not in has]:
                deletes[name] = less
            if more := [r for r in rules if r not in had]:
                appends[name] = more
    gone = [name for name in above_before.chains if name not in above_after.chains]
    # the rules of the blocks: whole for new ones, the changed forwards' for the others
    new_leaves, old_leaves = (changed & after) - before, changed & after & before

    def rules_in(forwards: list[I.Forward], leaves: set[Leaf]) -> dict[Leaf, list[Rule]]:
        if not leaves:
            return {}
        if leaves == changed:
            return leaf_chains(forwards)  # they all touch a changed block
        return leaf_chains(f for f in forwards if not leaves.isdisjoint(leaves_of(f)))

    now_in = rules_in(touching, new_leaves)
    plus_in, minus_in = rules_in(plus, old_leaves), rules_in(minus, old_leaves)
    for leaf in sorted(changed):
        name = leaf_name(leaf)
        if leaf in new_leaves:
            created[name] = now_in[leaf]
        elif leaf in old_leaves:
            if leaf in minus_in:
                deletes[name] = minus_in[leaf]
            if leaf in plus_in:
                appends[name] = plus_in[leaf]
        elif leaf in before:
            gone.append(name)

    checks = list(PATH_CHECKS)
    for name in dict.fromkeys((*deletes, *appends)):
        up = above_before.parent.get(name)
        if up is not None:
            checks.append(up)  # the block was there: its jump must still be
    out.lines = [rule_line("-C", chain, rule) for chain, rule in checks]
    # a block that empties is flushed by its declaration, then deleted
    out.lines += [f":{name} - [0:0]" for name in (*created, *gone)]
    for name, rules in deletes.items():
        out.lines += [rule_line("-D", name, rule) for rule in rules]
    for name, rules in (*created.items(), *appends.items()):
        out.lines += chain_lines(name, rules)
    out.lines += [f"-X {name}" for name in gone]
    out.effect = Effect(chains={**created, **dict.fromkeys(gone)}, deletes=deletes, appends=appends)
    return out
