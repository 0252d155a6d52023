"""The rules netagent writes, built from intents: the entry chains, the port-block tree,
the DNAT and masquerade rules, and the chains a desired state wants.

Everything here is a pure function of the intents. Rules are token tuples in the exact
form ``iptables-save`` prints them (``-p tcp -m tcp --dport``, ``/32`` on a host
address), so what is wanted compares with what was read without normalizing. The shape
and why it was chosen: ``docs/backends.md`` ("The iptables backend").
"""

from __future__ import annotations

import functools
import itertools
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from netagent.agent import intents as I

from ..firewall import FirewallSpec, VxlanGuard

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
#: the chains every forward's path runs through: rewriting one is a ``Batch.rebuild``
PATH_CHAINS = frozenset({*ENTRY_CHAINS, CHAIN_DNAT})
BUILTIN_CHAINS = frozenset({"PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"})
#: the chains of the filter table netagent writes (``backends/xtfilter.py``): accepts for
#: its traffic where another tool filters FORWARD, and the localhost guard on INPUT
CHAIN_FORWARD = "NETAGENT-FORWARD"
CHAIN_INPUT = "NETAGENT-INPUT"
#: the filter table's chain (IPv4) this backend writes: the VXLAN port open to the
#: cluster's peers only
CHAIN_VXLAN = "NETAGENT-VXLAN"
FILTER_HOOKS = (("INPUT", CHAIN_VXLAN),)
FIXED_CHAINS = frozenset(
    {CHAIN_PRE, CHAIN_OUT, CHAIN_POST, CHAIN_DNAT, CHAIN_FORWARD, CHAIN_INPUT, CHAIN_VXLAN}
)
_BLOCK_NAME = re.compile(r"NETAGENT-(?:TCP|UDP)-\d{1,5}-\d{1,5}")
COMMENT_PREFIX = "netagent:"
JUMP_COMMENT = COMMENT_PREFIX + "jump"
#: the widths of the port blocks, one level of chains each, from NETAGENT-DNAT down; the
#: last level's chains hold the DNAT rules. Fixed, so where a port's rule lives depends on
#: the port alone and a change can be planned without reading the table.
WIDTHS = (4096, 64)
#: above this many rule changes the steps are summarized, not listed one by one
MAX_DETAIL = 50

Rule = tuple[str, ...]  # a rule as iptables-save prints it, after "-A CHAIN", as tokens
Chains = dict[str, list[Rule]]  # our chains of one family and their rules, in order


def our_name(chain: str) -> bool:
    """Is this a name netagent gives its chains (a fixed one, or a port block's)?"""
    return chain in FIXED_CHAINS or _BLOCK_NAME.fullmatch(chain) is not None


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
    the entry chains let only traffic addressed to the host get this far. One rule per
    port, not one ``--dport A:B``, when the ports move: a DNAT to ``IP:C-D`` is a pool
    (any port of C-D for each connection), not the port-to-port mapping a forward means.
    A range whose ports keep their numbers is a DNAT to the address alone (the packet
    keeps its port): one ``--dport A:B`` rule per last-level block it covers, keyed by
    its first port (``1-32767``: 512 rules, not 32,767)."""
    proto, first, to = fwd.proto, fwd.host_port, fwd.dest_port
    dest = str(fwd.dest_ip) if fwd.dest_ip.version == 4 else f"[{fwd.dest_ip}]"
    comment = COMMENT_PREFIX + fwd.key
    if fwd.host_ip is None and fwd.count == 1:  # the common case, 10,000 times over
        rule = ("-p", proto, "-m", proto, "--dport", str(first), "-m", "comment", "--comment")
        return [(first, (*rule, comment, "-j", "DNAT", "--to-destination", f"{dest}:{to}"))]
    bound: Rule = ("-d", _host(fwd.host_ip)) if fwd.host_ip is not None else ()
    head = (*bound, "-p", proto, "-m", proto, "--dport")
    tail = ("-m", "comment", "--comment", comment, "-j", "DNAT", "--to-destination")
    if fwd.same_ports:
        width = WIDTHS[-1]
        last = first + fwd.count - 1
        out = []
        lo = first
        while lo <= last:
            hi = min(lo - lo % width + width - 1, last)
            # iptables-save prints ``--dport 64`` for 64:64, and an IPv6 address bare
            ports = f"{lo}:{hi}" if hi > lo else str(lo)
            out.append((lo, (*head, ports, *tail, str(fwd.dest_ip))))
            lo = hi + 1
        return out
    return [
        (first + i, (*head, str(first + i), *tail, f"{dest}:{to + i}")) for i in range(fwd.count)
    ]


def dnat_rules(fwd: I.Forward) -> list[Rule]:
    """One DNAT rule per port of the forward."""
    return [rule for _port, rule in port_rules(fwd)]


#: first in both entry chains: what is not addressed to the host is none of our business
#: (CNI portmap's GHSA-jv3w-x3r3-g6rm); checked once here, not on every forward's rule
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


def vxlan_masquerade(guard: VxlanGuard | None) -> list[Rule]:
    """Forwarded connections leaving through the VXLAN device (to another host's
    subnet) are masqueraded, so the peer's replies come back here to be de-NATed."""
    if guard is None:
        return []
    return [
        (
            *("-o", guard.device, "-m", "conntrack", "--ctstate", "DNAT"),
            *_comment(f"vxlan-dnat {guard.device}"),
            *("-j", "MASQUERADE"),
        )
    ]


def guard_rules(guard: VxlanGuard) -> list[Rule]:
    """NETAGENT-VXLAN: a peer's VXLAN packets go back to INPUT (RETURN: the host's own
    rules still apply), anyone else's are dropped. One rule per peer, sorted: iptables
    has no sets without ipset, so a VXLAN packet walks up to one rule per peer."""
    port = str(guard.port)
    out: list[Rule] = [
        (
            *("-s", f"{ip}/32", "-p", "udp", "-m", "udp", "--dport", port),
            *_comment("vxlan-peer"),
            *("-j", "RETURN"),
        )
        for ip in sorted(guard.peers, key=lambda a: tuple(int(x) for x in a.split(".")))
    ]
    out.append(
        (*("-p", "udp", "-m", "udp", "--dport", port), *_comment("vxlan-guard"), "-j", "DROP")
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

    chains: Chains
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


def desired_chains(spec: FirewallSpec, version: int) -> Chains:
    """Our chains of one family and their rules, in a fixed order (bridges by name)."""
    tree = dnat_tree(f for f in spec.forwards if f.family == version)
    post = [LOCALHOST_RULE] if version == 4 else []
    for br in sorted(spec.bridges, key=lambda b: b.name):
        post += bridge_rules(br, version)
    if version == 4:
        post += vxlan_masquerade(spec.vxlan)
    return {
        CHAIN_PRE: list(ENTRY_RULES),
        CHAIN_OUT: list(ENTRY_RULES),
        CHAIN_POST: post,
        **tree.chains,
    }


def spec_families(spec: FirewallSpec) -> set[int]:
    """The IP versions the spec has something for."""
    found: set[int] = {ip.version for ip in spec.destinations()}
    found |= {a.version for br in spec.bridges for a in br.addresses}
    if spec.vxlan is not None:
        found.add(4)
    return found


@dataclass(frozen=True)
class Wanted:
    """The chains ``spec`` wants, per family: :func:`desired_chains` of each, except that
    the rules within a chain may stand in another order (after updates appended to it;
    order within our chains does not matter, see :func:`~.plan.plan_family`). Never
    mutated: plans and the cache share it."""

    spec: FirewallSpec
    chains: Mapping[int, Chains]

    @classmethod
    def of(cls, spec: FirewallSpec, families: Iterable[int]) -> Wanted:
        return cls(spec, {v: desired_chains(spec, v) for v in families})

    def serves(self, spec: FirewallSpec, families: Iterable[int]) -> bool:
        """Does this hold the chains ``spec`` wants in each of ``families``?"""
        return same_spec(spec, self.spec) and all(v in self.chains for v in families)


def same_spec(a: FirewallSpec, b: FirewallSpec) -> bool:
    # the reconciler hands the same intent objects each time: the tuples' items compare
    # by identity first, so 10,000 forwards compare in ~0.1 ms
    return a is b or (a.forwards == b.forwards and a.bridges == b.bridges and a.vxlan == b.vxlan)


def is_update_of(
    old: FirewallSpec, new: FirewallSpec, added: list[I.Forward], removed: list[I.Forward]
) -> bool:
    """Is ``new`` exactly ``old`` without ``removed`` and with ``added``? By identity
    (all of these objects are alive, so their ids are distinct): cheap, and a "no" only
    costs a full plan later."""
    if old.bridges != new.bridges or old.vxlan != new.vxlan:
        return False
    if len(new.forwards) != len(old.forwards) - len(removed) + len(added):
        return False
    ids = old.forward_ids
    gone = {id(f) for f in removed}
    if not gone <= ids or len(gone) != len(removed):
        return False
    now = new.forward_ids
    return len(now) == len(new.forwards) and (ids - gone) | {id(f) for f in added} == now


def forwards_below(chains: Chains, blocks: Iterable[str]) -> set[str]:
    """The keys of the forwards whose DNAT rules are in these block chains, or in the
    blocks below them, in ``chains`` (what one family wants): a batch that writes such a
    chain whole writes those forwards' rules or their path. Read from the rules'
    comments (``netagent:<forward key>``, see :func:`port_rules`), so it costs what those
    chains hold, not a pass over every forward of the desired state."""
    keys: set[str] = set()
    todo = list(blocks)
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for rule in chains.get(name, ()):
            if rule[-2] == "-j" and rule[-1].startswith(PREFIX):
                todo.append(rule[-1])  # a jump to a block below
            elif rule[-3] == "DNAT":  # ... -j DNAT --to-destination ADDR:PORT
                keys.add(rule[rule.index("--comment") + 1][len(COMMENT_PREFIX) :])
    return keys


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


def plural(n: int, what: str) -> str:
    return f"{n} {what}" if n == 1 else f"{n} {what}s"


def jump_text(builtin: str, target: str, version: int) -> str:
    return f"jump {builtin} -> {target} (ipv{version})"
