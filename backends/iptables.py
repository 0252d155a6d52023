"""The iptables backend: netagent's own ``NETAGENT-*`` chains in the nat table.

For hosts where nftables cannot be used (or is not wanted), the same NAT is written for
``iptables`` (IPv4) and ``ip6tables`` (IPv6), in chains only netagent writes to:

    nat table, per family
      PREROUTING   -m comment --comment netagent:jump -j NETAGENT-PREROUTING    (one rule)
      OUTPUT       -m comment --comment netagent:jump -j NETAGENT-OUTPUT        (one rule)
      POSTROUTING  -m comment --comment netagent:jump -j NETAGENT-POSTROUTING   (one rule)
      NETAGENT-PREROUTING   -m addrtype ! --dst-type LOCAL -j RETURN   (netagent:local-only)
                            -j NETAGENT-DNAT                           (netagent:forwards)
      NETAGENT-OUTPUT       the same two rules, for the host's own traffic
      NETAGENT-DNAT         -p tcp -m tcp --dport 8192:12287 -j NETAGENT-TCP-8192-12287:
                            a rule per block of 4,096 ports that holds a forward
      NETAGENT-TCP-8192-12287   -p tcp -m tcp --dport 9984:10047 -j NETAGENT-TCP-9984-10047:
                            a rule per block of 64 ports that holds a forward
      NETAGENT-TCP-9984-10047   a DNAT rule per forwarded port of the block
      NETAGENT-POSTROUTING  masquerade 127.0.0.1 -> forward (IPv4), hairpin and
                            --masquerade per bridge address

Only traffic addressed to the host is translated (CNI portmap's GHSA-jv3w-x3r3-g6rm): the
local-only rule returns everything else before it meets a forward. Every rule carries
``-m comment --comment netagent:<intent key or purpose>``, so a reader of
``iptables-save`` sees who owns it and why. ``iptables-save`` prints the whole table, but
all that is not ours is dropped as it is read; nothing else is ever written. (Checked
with iptables 1.8.9 in both its nf_tables and legacy flavours: same save format, and both
restore flavours accept the ``-C``/``-D``/``-X`` lines used here.)

Why this shape (iptables-nft 1.8.9, kernel 6.x, 10,000 forwards; see
``shared/notes/nftables.md`` and ``bench/run.py iptables``):

* ``-m addrtype`` is a FIB lookup (~0.4 us). On every forward's rule it made a new
  connection to the last forward pay 10,000 of them (84x the time with one forward);
  checked once at the top it is paid once.
* A port range is one rule per port, not one ``--dport A:B`` rule: a DNAT to ``IP:C-D`` is
  a *pool* (each connection gets any port of C-D), not the port-to-port mapping a forward
  means. A flat chain of such rules costs a new connection ~16 ns a rule; the two levels
  of port blocks bound what a packet meets to at most 32 + 64 jumps and its block's rules,
  whatever the number of forwards (nftables' one map lookup is still cheaper, and the
  reason ``--firewall auto`` tries it first).
* iptables-nft reads a chain's rules (all of them) before it can ``-C`` or ``-D`` a rule
  in it, or ``-C``/``-D`` a jump *to* it; appending reads nothing. In small chains every
  change stays small: adding a forward appends its rule to its block (and, for a new
  block, a jump to the block above); removing one deletes its rule from a block of 64
  ports. With one flat chain, both read 10,000 rules (~0.3 s).
* PREROUTING and OUTPUT share one tree, so each forwarded port is one rule, not two:
  writing 10,000 forwards from scratch costs ~35 us a rule (mostly the kernel).

What no layout avoids: the kernel checks the whole table at every commit that adds a rule
(~9 ms at 10,000 forwards), and a process that deleted rules waits for an RCU grace
period as it exits (~15 ms).

Every change is one ``iptables-restore --noflush`` transaction per family. A full plan
declares the chains that differ (``:NETAGENT-DNAT - [0:0]`` creates a chain or flushes
it) and writes them whole; an update appends and deletes single rules, by their exact
text. Every other rule of the table is left as it is. What exists is read with
``iptables-save -t nat``; the rules are written in the form ``iptables-save`` prints them
(``-p tcp -m tcp --dport``, ``/32`` on host addresses) so that comparing what we want with
what is there needs no normalizing.

Reading 10,000 rules back costs ~0.3 s, and each change of ours is seen by the daemon's
``nft monitor`` watch, which asks for a full pass (observe, plan) right after it. With
iptables-nft the backend therefore remembers what it observed and wrote, stamped with the
nf_tables generation (a counter the kernel bumps on every committed change, read over
netlink in ~30 us): while the generation is the one it knows, nothing changed, and the
observation is answered from memory; when it also knows the table is exactly the desired
state it was last given, planning that state again finds nothing to do at once. Legacy
iptables does not bump that counter, so there every observation reads the table.
"""

from __future__ import annotations

import functools
import itertools
import os
import re
import shutil
import socket
import struct
import subprocess
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

import anyio

from netagent.agent import intents as I
from netagent.agent.errors import BackendFailed, BackendUnavailable

from .firewall import Batch, DriftWatcher, FirewallBackend, FirewallSpec
from .nftmonitor import NftMonitorWatcher

PREFIX = "NETAGENT-"
CHAIN_PRE = "NETAGENT-PREROUTING"
CHAIN_OUT = "NETAGENT-OUTPUT"
CHAIN_POST = "NETAGENT-POSTROUTING"
#: the root of the forwards' tree, jumped to from both CHAIN_PRE and CHAIN_OUT
CHAIN_DNAT = "NETAGENT-DNAT"
#: (built-in chain of the nat table, our chain it jumps to)
HOOKS = (("PREROUTING", CHAIN_PRE), ("OUTPUT", CHAIN_OUT), ("POSTROUTING", CHAIN_POST))
#: the chains that lead traffic to the forwards
ENTRY_CHAINS = (CHAIN_PRE, CHAIN_OUT)
BUILTIN_CHAINS = frozenset({"PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"})
COMMENT_PREFIX = "netagent:"
JUMP_COMMENT = COMMENT_PREFIX + "jump"
#: the widths of the port blocks, one level of chains each, from NETAGENT-DNAT down; the
#: last level's chains hold the DNAT rules. Fixed, so where a port's rule lives depends on
#: the port alone and a change can be planned without reading the table.
WIDTHS = (4096, 64)

#: per family: (the save program, the restore program); the same argv works for both
TOOLS = {4: ("iptables-save", "iptables-restore"), 6: ("ip6tables-save", "ip6tables-restore")}
#: where the programs usually live when the daemon's PATH lacks the sbin directories
SBIN = "/usr/local/sbin:/usr/sbin:/sbin"
#: an xtables lock held by someone else (``-w`` waits for it) must not hang a pass forever
TIMEOUT = 60.0
#: above this many rule changes the steps are summarized, not listed one by one
MAX_DETAIL = 50

Rule = tuple[str, ...]  # a rule as iptables-save prints it, after "-A CHAIN", as tokens


def jump_rule(target: str) -> Rule:
    """The one rule netagent owns in a built-in chain."""
    return ("-m", "comment", "--comment", JUMP_COMMENT, "-j", target)


def _comment(purpose: str) -> Rule:
    return ("-m", "comment", "--comment", COMMENT_PREFIX + purpose)


def _host(ip: I.IPAddress) -> str:
    # iptables-save prints a host address with its full prefix length
    return f"{ip}/{ip.max_prefixlen}"


def port_rules(fwd: I.Forward) -> list[tuple[int, Rule]]:
    """(host port, its DNAT rule), one per port of the forward. No address-type match:
    the entry chains let only traffic addressed to the host get this far."""
    proto, first, to = fwd.proto, fwd.host_port, fwd.dest_port
    dest = str(fwd.dest_ip) if fwd.dest_ip.version == 4 else f"[{fwd.dest_ip}]"
    comment = COMMENT_PREFIX + fwd.key
    if fwd.host_ip is None and fwd.count == 1:  # the common case, 10,000 times over
        rule = ("-p", proto, "-m", proto, "--dport", str(first), "-m", "comment", "--comment")
        return [(first, (*rule, comment, "-j", "DNAT", "--to-destination", f"{dest}:{to}"))]
    bound: Rule = ("-d", _host(fwd.host_ip)) if fwd.host_ip is not None else ()
    head = (*bound, "-p", proto, "-m", proto, "--dport")
    tail = ("-m", "comment", "--comment", comment, "-j", "DNAT", "--to-destination")
    return [
        (first + i, (*head, str(first + i), *tail, f"{dest}:{to + i}")) for i in range(fwd.count)
    ]


def dnat_rules(fwd: I.Forward) -> list[Rule]:
    """One DNAT rule per port of the forward."""
    return [rule for _port, rule in port_rules(fwd)]


#: first in both entry chains: what is not addressed to the host is none of our business
LOCAL_ONLY_RULE: Rule = (
    *("-m", "addrtype", "!", "--dst-type", "LOCAL"),
    *_comment("local-only"),
    *("-j", "RETURN"),
)
#: then into the forwards' tree
FORWARDS_RULE: Rule = (*_comment("forwards"), "-j", CHAIN_DNAT)
ENTRY_RULES: tuple[Rule, ...] = (LOCAL_ONLY_RULE, FORWARDS_RULE)

LOCALHOST_RULE: Rule = (
    *("-s", "127.0.0.0/8", "-m", "conntrack", "--ctstate", "DNAT"),
    *_comment("localhost"),
    *("-j", "MASQUERADE"),
)


def bridge_rules(br: I.Bridge, version: int) -> list[Rule]:
    """The postrouting rules one bridge needs in one family."""
    out: list[Rule] = []
    for addr in br.addresses:
        if addr.version != version:
            continue
        net = str(addr.network)
        # hairpin: a namespace reaching a forward through the host's address, DNATed back
        # onto its own bridge; without the masquerade the reply would skip the host
        out.append(
            (
                *("-s", net, "-d", net, "-m", "conntrack", "--ctstate", "DNAT"),
                *_comment(f"hairpin {br.key} ipv{version}"),
                *("-j", "MASQUERADE"),
            )
        )
        if br.masquerade:
            out.append(
                (
                    *("-s", net, "!", "-o", br.name),
                    *_comment(f"masquerade {br.key} ipv{version}"),
                    *("-j", "MASQUERADE"),
                )
            )
    return out


def _forward_order(fwd: I.Forward) -> tuple[str, bool, str, int]:
    return (fwd.proto, fwd.host_ip is not None, str(fwd.host_ip or ""), fwd.host_port)


@functools.cache
def block(proto: str, port: int, width: int) -> tuple[str, Rule]:
    """The chain holding ``port``'s block of ``width`` ports, and the rule that jumps to
    it: ``NETAGENT-TCP-9984-10047``, ``-p tcp -m tcp --dport 9984:10047 ... -j`` it."""
    lo = port - port % width
    hi = min(lo + width - 1, 65535)
    name = f"{PREFIX}{proto.upper()}-{lo}-{hi}"
    rule = (
        *("-p", proto, "-m", proto, "--dport", f"{lo}:{hi}"),
        *_comment(f"ports/{proto}/{lo}-{hi}"),
        *("-j", name),
    )
    return name, rule


Leaf = tuple[str, int]  # (protocol, first port) of a block of the last level


def leaves_of(fwd: I.Forward) -> list[Leaf]:
    """The last-level blocks the forward's ports fall in."""
    width = WIDTHS[-1]
    first = fwd.host_port - fwd.host_port % width
    if fwd.count == 1:
        return [(fwd.proto, first)]
    return [(fwd.proto, lo) for lo in range(first, fwd.host_port + fwd.count, width)]


@dataclass
class Tree:
    """Forwards' chains: ``NETAGENT-DNAT`` (first), the blocks above the last level, and
    the last level's blocks (those asked for)."""

    chains: dict[str, list[Rule]]
    #: block chain -> (the chain above it, the rule there that jumps to it)
    parent: dict[str, tuple[str, Rule]]


def tree_above(leaves: Iterable[Leaf]) -> Tree:
    """NETAGENT-DNAT and the intermediate blocks that lead to these last-level blocks:
    each lists the blocks below it that hold a forward, by protocol and port."""
    below: dict[str, set[tuple[str, int, int]]] = {CHAIN_DNAT: set()}
    for proto, lo in leaves:
        up = CHAIN_DNAT
        for width in WIDTHS:
            below.setdefault(up, set()).add((proto, lo - lo % width, width))
            up = block(proto, lo, width)[0]
    tree = Tree({}, {})
    for name, kids in below.items():
        rules = tree.chains[name] = []
        for proto, lo, width in sorted(kids):
            child, jump = block(proto, lo, width)
            rules.append(jump)
            tree.parent[child] = (name, jump)
    return tree


def leaf_chains(forwards: Iterable[I.Forward]) -> dict[Leaf, list[Rule]]:
    """The DNAT rules of each last-level block, in a fixed order (forwards sorted by
    protocol, host address and port) so the same forwards always give the same chains,
    whatever order the desired state lists them in."""
    width = WIDTHS[-1]
    out: dict[Leaf, list[Rule]] = {}
    for fwd in sorted(forwards, key=_forward_order):
        proto = fwd.proto
        for hport, rule in port_rules(fwd):
            key = (proto, hport - hport % width)
            rules = out.get(key)
            if rules is None:
                out[key] = [rule]
            else:
                rules.append(rule)
    return out


def leaf_name(leaf: Leaf) -> str:
    return block(leaf[0], leaf[1], WIDTHS[-1])[0]


def dnat_tree(forwards: Iterable[I.Forward]) -> Tree:
    """The whole tree for these forwards."""
    leaves = leaf_chains(forwards)
    tree = tree_above(leaves)
    for leaf, rules in leaves.items():
        tree.chains[leaf_name(leaf)] = rules
    return tree


def desired_chains(spec: FirewallSpec, version: int) -> dict[str, list[Rule]]:
    """Our chains of one family and their rules, in a fixed order (bridges by name)."""
    tree = dnat_tree(f for f in spec.forwards if f.family == version)
    post = [LOCALHOST_RULE] if version == 4 else []
    for br in sorted(spec.bridges, key=lambda b: b.name):
        post += bridge_rules(br, version)
    return {
        CHAIN_PRE: list(ENTRY_RULES),
        CHAIN_OUT: list(ENTRY_RULES),
        CHAIN_POST: post,
        **tree.chains,
    }


def spec_families(spec: FirewallSpec) -> set[int]:
    """The IP versions the spec has something for."""
    found = {f.family for f in spec.forwards}
    found |= {a.version for br in spec.bridges for a in br.addresses}
    return found


# ---- reading iptables-save ----------------------------------------------------------

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
    chains: dict[str, list[Rule]] = field(default_factory=dict)
    #: (built-in chain, NETAGENT-* target) -> how many of our exact jump rules
    jumps: Counter[tuple[str, str]] = field(default_factory=Counter)

    @property
    def present(self) -> bool:
        return bool(self.chains) or bool(self.jumps)


@dataclass
class Observed:
    """One :class:`FamilyObserved` per family this backend manages here (4, maybe 6)."""

    families: dict[int, FamilyObserved] = field(default_factory=dict)

    @property
    def present(self) -> bool:
        return any(f.present for f in self.families.values())


def _is_jump(rule: Rule) -> bool:
    """Ours only if it is exactly our jump rule: someone else's jump into one of our
    chains, or a rule that merely borrows our comment, is not ours to count or delete."""
    return bool(rule) and rule[-1].startswith(PREFIX) and rule == jump_rule(rule[-1])


def parse_save(text: str) -> FamilyObserved:
    """Keep, from ``iptables-save -t nat`` output, our chains and our jump rules only;
    every other line is dropped as soon as it is read."""
    obs = FamilyObserved()
    in_nat = False
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("*"):
            in_nat = line == "*nat"
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


# ---- writing iptables-restore input -------------------------------------------------

_BARE = re.compile(r"[A-Za-z0-9_.:/\[\]!,+=@%-]+")
#: a whole line of bare tokens and single spaces (the common case, checked at once)
_BARE_LINE = re.compile(r"[A-Za-z0-9_.:/\[\]!,+=@%-]+(?: [A-Za-z0-9_.:/\[\]!,+=@%-]+)*")


def quote(token: str) -> str:
    """A token for an iptables-restore line. Everything that reaches here comes from
    validated intents, but a quote, backslash or line break would let a value end the
    token or the line (and start a rule of its own), so those are refused outright."""
    if _BARE.fullmatch(token):
        return token
    if not token or any(c in token for c in '"\\\n\r\0'):
        raise ValueError(f"refusing to write {token!r} into an iptables-restore file")
    return f'"{token}"'


def render(rule: Rule) -> str:
    text = " ".join(rule)
    # no token holds a space and none is empty when there are exactly len-1 spaces
    if text.count(" ") == len(rule) - 1 and _BARE_LINE.fullmatch(text):
        return text
    return " ".join([quote(t) for t in rule])


def rule_line(op: str, chain: str, rule: Rule, position: int | None = None) -> str:
    """``-A CHAIN tokens...`` (or ``-I CHAIN 1 ...`` with a position)."""
    where = chain if position is None else f"{chain} {position}"
    return f"{op} {where} {render(rule)}"


def chain_lines(chain: str, rules: list[Rule]) -> list[str]:
    """``-A`` lines for a chain."""
    head = f"-A {chain} "
    return [head + render(rule) for rule in rules]


def restore_text(lines: Iterable[str]) -> str:
    return "\n".join(["*nat", *lines, "COMMIT", ""])


def describe(rule: Rule) -> str:
    """A rule in words, for a batch's steps: ``DNAT 80/tcp -> 192.168.15.2:80``."""
    opts: dict[str, str] = {}
    for name, value in itertools.pairwise(rule):
        if name.startswith("-"):
            opts.setdefault(name, value)
    comment = opts.get("--comment", "")
    if opts.get("-j") == "DNAT":
        on = ""
        if "-d" in opts:
            host = opts["-d"].partition("/")[0]
            on = f"[{host}]:" if ":" in host else f"{host}:"
        return f"DNAT {on}{opts.get('--dport', '?')}/{opts.get('-p', '?')} -> " + opts.get(
            "--to-destination", "?"
        )
    if comment.startswith(COMMENT_PREFIX):
        return comment[len(COMMENT_PREFIX) :]
    return "rule " + " ".join(rule)


def _plural(n: int, what: str) -> str:
    return f"{n} {what}" if n == 1 else f"{n} {what}s"


def _dedup(steps: list[str]) -> list[str]:
    return list(dict.fromkeys(steps))


def _rule_steps(adds: list[Rule], dels: list[Rule], version: int) -> list[str]:
    # PREROUTING and OUTPUT carry the same entry rules: say each change once
    add, gone = list(dict.fromkeys(adds)), list(dict.fromkeys(dels))
    if len(add) + len(gone) > MAX_DETAIL:
        # a line per rule helps nobody at 10,000 forwards, and describing them costs time
        return [f"add {_plural(len(add), 'rule')}, delete {len(gone)} (ipv{version})"]
    return _dedup([f"delete {describe(r)}" for r in gone] + [f"add {describe(r)}" for r in add])


def _jump_text(builtin: str, target: str, version: int) -> str:
    return f"jump {builtin} -> {target} (ipv{version})"


@dataclass
class Effect:
    """What a restore file does to one family: chains it writes whole (their rules) or
    deletes (None), rules it deletes from or appends to others, and by how much it
    changes the count of each of our jumps. Applied to what was there, it gives what is
    there after, without reading the table again."""

    chains: dict[str, list[Rule] | None] = field(default_factory=dict)
    deletes: dict[str, list[Rule]] = field(default_factory=dict)
    appends: dict[str, list[Rule]] = field(default_factory=dict)
    jumps: Counter[tuple[str, str]] = field(default_factory=Counter)

    def after(self, have: FamilyObserved) -> FamilyObserved | None:
        """None when the file could not have succeeded on ``have``."""
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


class RestorePayload(dict[str, str]):
    """A batch's payload: family ("4", "6") -> restore file. Besides: what each file does
    (``effects``, see :class:`Effect`), and what it was planned from, so that after it is
    applied the backend can tell whether the table is then exactly as ``spec`` wants."""

    def __init__(self, spec: FirewallSpec) -> None:
        super().__init__()
        self.effects: dict[int, Effect] = {}
        self.spec = spec
        #: a full plan: the observation it was planned against
        self.basis: Observed | None = None
        #: an update: the forwards (added, removed)
        self.changes: tuple[list[I.Forward], list[I.Forward]] | None = None


@dataclass
class Known:
    """What of ours is in the table at one nf_tables generation."""

    generation: int
    observed: Observed
    #: a desired state that ``observed`` is exactly (planning it would find nothing to
    #: do), when known: repeated passes over an unchanged table then cost nothing
    spec: FirewallSpec | None = None


def _same_spec(a: FirewallSpec, b: FirewallSpec) -> bool:
    # the reconciler hands the same intent objects each time: tuples compare by identity
    return a is b or (a.forwards == b.forwards and a.bridges == b.bridges)


def _is_update_of(
    old: FirewallSpec, new: FirewallSpec, added: list[I.Forward], removed: list[I.Forward]
) -> bool:
    """Is ``new`` exactly ``old`` without ``removed`` and with ``added``? By identity
    (all of these objects are alive, so their ids are distinct): cheap, and a "no" only
    costs a full plan later."""
    if old.bridges != new.bridges:
        return False
    if len(new.forwards) != len(old.forwards) - len(removed) + len(added):
        return False
    ids = {id(f) for f in old.forwards}
    gone = {id(f) for f in removed}
    if not gone <= ids or len(gone) != len(removed):
        return False
    now = {id(f) for f in new.forwards}
    return len(now) == len(new.forwards) and (ids - gone) | {id(f) for f in added} == now


@dataclass
class FamilyPlan:
    lines: list[str] = field(default_factory=list)
    steps: list[str] = field(default_factory=list)
    #: a chain on the forwards' path or a jump changes (see ``Batch.full``)
    touched: bool = False
    effect: Effect = field(default_factory=Effect)


def plan_family(version: int, want: dict[str, list[Rule]], have: FamilyObserved) -> FamilyPlan:
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
    # jumps first: a jump into a chain we delete below must be gone before the chain
    for (builtin, target), count in sorted(have.jumps.items()):
        extra = count - 1 if (builtin, target) in wanted_jumps else count
        for _ in range(extra):
            body.append(rule_line("-D", builtin, jump_rule(target)))
        if extra:
            out.touched = True
            out.effect.jumps[(builtin, target)] -= extra
            what = "duplicate " if (builtin, target) in wanted_jumps else ""
            out.steps.append(f"delete {what}{_jump_text(builtin, target, version)}")
    for chain in sorted(set(have.chains) - set(want)):
        # an owned chain this version no longer uses: flush (declare) it, then delete it
        # (the chain that jumped to it is rewritten below, without the jump)
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
            if old == rules:
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
        out.touched |= chain != CHAIN_POST
        decls.append(f":{chain} - [0:0]")
        body += chain_lines(chain, rules)
        out.effect.chains[chain] = rules
        verb = "create" if old is None else "rewrite"
        out.steps.append(f"{verb} chain {chain} (ipv{version}, {_plural(len(rules), 'rule')})")
    for builtin, chain in HOOKS:
        if not have.jumps.get((builtin, chain)):
            # first, so the host's own rules further down cannot pre-empt the forwards
            tail.append(rule_line("-I", builtin, jump_rule(chain), position=1))
            out.steps.append(f"add {_jump_text(builtin, chain, version)}")
            out.effect.jumps[(builtin, chain)] += 1
            out.touched = True
    out.lines = decls + body + tail
    out.steps += _rule_steps(adds, dels, version)
    return out


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


# ---- the nf_tables generation --------------------------------------------------------

NETLINK_NETFILTER = 12
NFNL_SUBSYS_NFTABLES = 10
NFT_MSG_NEWGEN, NFT_MSG_GETGEN = 15, 16
NFTA_GEN_ID = 1
NLM_F_REQUEST = 1


def nf_genid() -> int | None:
    """The nf_tables generation of this network namespace (bumped by every committed
    change, by anyone), or None when it cannot be read. One netlink round trip."""
    request = struct.pack(
        "=IHHIIBBH", 20, NFNL_SUBSYS_NFTABLES << 8 | NFT_MSG_GETGEN, NLM_F_REQUEST, 1, 0, 0, 0, 0
    )
    try:
        with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER) as sock:
            sock.settimeout(1.0)
            sock.sendto(request, (0, 0))
            data = sock.recv(4096)
    except OSError:
        return None
    if len(data) < 20:
        return None
    length, kind = struct.unpack_from("=IH", data)
    if kind != NFNL_SUBSYS_NFTABLES << 8 | NFT_MSG_NEWGEN:
        return None  # an error (no nf_tables, no permission)
    offset = 20  # nlmsghdr + nfgenmsg
    while offset + 4 <= min(length, len(data)):
        size, attr = struct.unpack_from("=HH", data, offset)
        if size < 4:
            return None
        if attr & 0x3FFF == NFTA_GEN_ID and size >= 8:
            genid: int = struct.unpack_from(">I", data, offset + 4)[0]
            return genid
        offset += (size + 3) & ~3
    return None


def _nft_flavour(program: str) -> bool:
    """Is this iptables-nft (its changes are nf_tables transactions)? Judged by the
    program the name resolves to: upstream builds name it ``xtables-nft-multi``, or
    ``iptables-nft-restore`` and the like; anything else (legacy, unknown) is not."""
    return "nft" in os.path.basename(os.path.realpath(program))


def _purge_steps(have: FamilyObserved, version: int) -> list[str]:
    """A line per chain deleted; past a few, the port blocks are counted, not listed."""

    def text(chain: str, rules: int) -> str:
        return f"deleted chain {chain} (ipv{version}, {_plural(rules, 'rule')})"

    names = sorted(have.chains)
    if len(names) <= 8:
        return [text(name, len(have.chains[name])) for name in names]
    fixed = [name for name in names if name in (CHAIN_PRE, CHAIN_OUT, CHAIN_POST, CHAIN_DNAT)]
    blocks = [name for name in names if name not in fixed]
    rules = sum(len(have.chains[name]) for name in blocks)
    return [text(name, len(have.chains[name])) for name in fixed] + [
        f"deleted {len(blocks)} other chains (ipv{version}, {_plural(rules, 'rule')})"
    ]


def _resolve(program: str) -> str | None:
    search = os.environ.get("PATH", "")
    return shutil.which(program, path=f"{search}:{SBIN}" if search else SBIN)


def _ipv6_kernel() -> bool:
    # absent when the kernel has no IPv6 (ipv6.disable=1): ip6tables would only fail
    return os.path.exists("/proc/net/if_inet6")


class IptablesBackend(FirewallBackend[Observed, "RestorePayload"]):
    """NAT in netagent's own ``NETAGENT-*`` chains of the nat table, for IPv4 and IPv6.

    ``families`` is which IP versions to manage; by default IPv4, plus IPv6 when
    ``ip6tables-restore`` is installed and the kernel has IPv6. Constructing the backend
    runs nothing, so planning can be tested without root."""

    name = "iptables"

    def __init__(self, families: tuple[int, ...] | None = None) -> None:
        if families is None:
            has6 = all(_resolve(p) for p in TOOLS[6]) and _ipv6_kernel()
            families = (4, 6) if has6 else (4,)
        if not families or set(families) - set(TOOLS):
            raise ValueError(f"families must be a non-empty subset of (4, 6), not {families}")
        self.families = tuple(sorted(set(families)))
        self.tools = {v: tuple(_resolve(p) or p for p in TOOLS[v]) for v in self.families}
        #: every program is iptables-nft: the nf_tables generation tells whether anything
        #: changed since the table was last read or written
        self.generations = all(_nft_flavour(p) for v in self.families for p in self.tools[v])
        #: what is there, while it is known
        self.known: Known | None = None
        #: the last desired state planned, and its chains per family (never mutated)
        self.desired: tuple[FirewallSpec, dict[int, dict[str, list[Rule]]]] | None = None

    def drift_watcher(self) -> DriftWatcher | None:
        # iptables-nft keeps its chains in nf_tables' "ip nat" / "ip6 nat" tables;
        # legacy iptables changes are found by the periodic pass
        if not self.generations:
            return None
        return NftMonitorWatcher((" ip nat", " ip6 nat"))

    @classmethod
    def probe(cls) -> tuple[bool, str]:
        iptables = _resolve("iptables")
        for program in ("iptables", "iptables-save", "iptables-restore"):
            if _resolve(program) is None:
                return False, f"the {program} program is not installed (Debian package iptables)"
        assert iptables is not None
        env = {"LANG": "C", "PATH": f"{os.environ.get('PATH', '')}:{SBIN}"}
        try:
            result = subprocess.run(
                [iptables, "-w", "-t", "nat", "-S"],
                capture_output=True,
                env=env,
                check=False,
                timeout=30,
            )
            version = subprocess.run(
                [iptables, "--version"], capture_output=True, env=env, check=False, timeout=30
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            return False, f"iptables did not answer: {exc}"
        if result.returncode != 0:
            return False, f"iptables cannot read the nat table: {result.stderr.decode().strip()}"
        which = version.stdout.decode().strip() or iptables
        v6 = "; IPv6 through ip6tables" if 6 in cls().families else "; IPv4 only (no ip6tables)"
        return True, f"{which} reads the nat table{v6}"

    async def _run(self, argv: list[str], stdin: bytes | None = None) -> bytes:
        """Run one program, never through a shell, and say what it said when it fails."""
        env = {"LANG": "C", "PATH": f"{os.environ.get('PATH', '')}:{SBIN}"}
        try:
            with anyio.fail_after(TIMEOUT):
                result = await anyio.run_process(argv, input=stdin, check=False, env=env)
        except TimeoutError:
            raise BackendFailed(
                f"{os.path.basename(argv[0])} did not finish in {TIMEOUT:.0f} s "
                "(is another program holding the xtables lock?)"
            ) from None
        except OSError as exc:
            raise BackendFailed(f"cannot run {argv[0]}: {exc}") from None
        if result.returncode != 0:
            err = result.stderr.decode(errors="replace").strip()
            raise BackendFailed(f"{os.path.basename(argv[0])} {' '.join(argv[1:])}: {err}")
        return bytes(result.stdout)

    def _generation(self) -> int | None:
        return nf_genid() if self.generations else None

    async def observe(self) -> Observed:
        """What of ours is there. Answered from memory while the nf_tables generation is
        the one last read or written (see the module's notes); the answer is shared, not
        a copy: treat it as read-only."""
        before = self._generation()
        if before is not None and self.known is not None and self.known.generation == before:
            return self.known.observed
        obs = Observed()
        for version in self.families:
            save, _restore = self.tools[version]
            text = await self._run([save, "-t", "nat"])
            obs.families[version] = parse_save(text.decode(errors="replace"))
        if before is not None and self._generation() == before:
            # nothing changed while the families were read one after the other
            self.known = Known(before, obs)
        return obs

    def _check_families(self, spec: FirewallSpec, have: Iterable[int]) -> None:
        missing = spec_families(spec) - set(have)
        if missing:
            raise BackendUnavailable(
                f"the iptables backend cannot serve IPv{min(missing)} here "
                f"({TOOLS[min(missing)][1]} is missing or the kernel lacks that family); "
                "remove those forwards/addresses or use --firewall nftables"
            )

    def plan(self, spec: FirewallSpec, observed: Observed) -> Batch[RestorePayload]:
        """Pure (but for memos). Families whose chains and jumps are as wanted contribute
        nothing; the others get one restore file that rewrites just the chains that
        differ. A family missing from ``observed`` is planned as if nothing of ours were
        there.

        ``full`` is set when the batch rewrites a chain on the forwards' path or a jump
        into one: until it is applied, forwards may not work (the daemon's status says
        so)."""
        self._check_families(spec, self.families)
        known = self.known
        if (
            known is not None
            and observed is known.observed
            and known.spec is not None
            and _same_spec(spec, known.spec)
        ):
            return Batch()
        payload = RestorePayload(spec)
        payload.basis = observed
        steps: list[str] = []
        full = False
        if self.desired is None or not _same_spec(spec, self.desired[0]):
            self.desired = (spec, {v: desired_chains(spec, v) for v in self.families})
        for version in self.families:
            want = self.desired[1][version]
            have = observed.families.get(version, FamilyObserved())
            fplan = plan_family(version, want, have)
            if fplan.lines:
                payload[str(version)] = restore_text(fplan.lines)
                payload.effects[version] = fplan.effect
                steps += fplan.steps
                full |= fplan.touched
        if not payload:
            if known is not None and observed is known.observed:
                known.spec = spec  # a memo: the next pass over the same table is free
            return Batch()
        return Batch(steps=steps, payload=payload, rebuild=full)

    def plan_update(
        self, spec: FirewallSpec, added: list[I.Forward], removed: list[I.Forward]
    ) -> Batch[RestorePayload]:
        """Pure (but for a memo). The added forwards' rules appended to their port blocks,
        the removed ones' deleted, one ``iptables-restore --noflush`` per family: a change
        costs about the same with 10 forwards or 10,000. See :func:`plan_update_family`;
        if the table is not as this assumes, applying fails and nothing changes."""
        if not added and not removed:
            return Batch()
        self._check_families(spec, self.families)
        payload = RestorePayload(spec)
        payload.changes = (list(added), list(removed))
        if sum(f.count for f in [*added, *removed]) > MAX_DETAIL:
            steps = [f"delete {_plural(len(removed), 'forward')}, add {len(added)}"]
        else:
            steps = [f"delete {describe(r)}" for f in removed for r in dnat_rules(f)]
            steps += [f"add {describe(r)}" for f in added for r in dnat_rules(f)]
        for version in sorted({f.family for f in [*added, *removed]}):
            fplan = plan_update_family(version, spec, added, removed)
            payload[str(version)] = restore_text(fplan.lines)
            payload.effects[version] = fplan.effect
        self._follow(spec, added, removed, payload.effects)
        return Batch(steps=steps, payload=payload, touched=frozenset(f.key for f in added))

    def _follow(
        self,
        spec: FirewallSpec,
        added: list[I.Forward],
        removed: list[I.Forward],
        effects: dict[int, Effect],
    ) -> None:
        """Keep the memo of desired chains up to date through an update (the update's
        effects on the old desired chains are the new desired chains), so a full plan
        after drift does not rebuild 10,000 rules."""
        memo = self.desired
        if memo is None or not _is_update_of(memo[0], spec, added, removed):
            self.desired = None
            return
        chains = dict(memo[1])
        for version, effect in effects.items():
            now = effect.after(FamilyObserved(chains[version]))
            if now is None:
                self.desired = None
                return
            chains[version] = now.chains
        self.desired = (spec, chains)

    async def _restore(self, version: int, text: str) -> None:
        if version not in self.tools:
            raise BackendUnavailable(f"the iptables backend does not manage IPv{version} here")
        _save, restore = self.tools[version]
        await self._run([restore, "--noflush", "-w"], stdin=text.encode())

    async def apply(self, batch: Batch[RestorePayload]) -> None:
        """One ``iptables-restore --noflush`` per family (IPv4 first), each atomic.

        When the table was known before and the generation moved by exactly one per
        file (each file is a real change: one commit), nobody else changed anything in
        between, and what is there now is what was there with the batch's effects."""
        if batch.empty or batch.payload is None:
            return
        start = self._generation()
        known = self.known if self.known is not None and self.known.generation == start else None
        self.known = None
        payload = batch.payload
        items = sorted(payload.items())
        for version, text in items:
            await self._restore(int(version), text)
        if start is None or known is None:
            return
        if self._generation() != start + len(items):
            return
        families = dict(known.observed.families)
        for version in (int(v) for v, _text in items):
            effect = payload.effects.get(version)
            if effect is None:
                return
            now = effect.after(families.get(version, FamilyObserved()))
            if now is None:
                return
            families[version] = now
        self.known = Known(start + len(items), Observed(families), self._in_sync(known, payload))

    @staticmethod
    def _in_sync(before: Known, payload: RestorePayload) -> FirewallSpec | None:
        """The spec the table is exactly the desired state of once ``payload`` is in."""
        if payload.changes is None:
            # a full plan rewrote everything that differed from what it was planned on
            return payload.spec if payload.basis is before.observed else None
        added, removed = payload.changes
        if before.spec is not None and _is_update_of(before.spec, payload.spec, added, removed):
            return payload.spec
        return None

    async def purge(self) -> list[str]:
        """Remove our jumps (by their exact rule), then flush and delete our chains: one
        restore per family, so a failure (say, someone else's rule jumping into one of our
        chains) leaves that family as it was instead of half purged."""
        observed = await self.observe()
        self.known = None
        removed: list[str] = []
        for version, have in sorted(observed.families.items()):
            if not have.present:
                continue
            lines: list[str] = []
            for (builtin, target), count in sorted(have.jumps.items()):
                lines += [rule_line("-D", builtin, jump_rule(target))] * count
                removed += [f"deleted {_jump_text(builtin, target, version)}"] * count
            lines += [f":{chain} - [0:0]" for chain in sorted(have.chains)]
            lines += [f"-X {chain}" for chain in sorted(have.chains)]
            removed += _purge_steps(have, version)
            await self._restore(version, restore_text(lines))
        return removed
