"""netagent's chains in the iptables *filter* table, in every framework that filters.

Another tool may filter forwarded traffic: Docker sets the iptables FORWARD policy to
DROP when it turns IP forwarding on, ufw does by default, a user's rules may. With
``br_netfilter`` (built in on this kernel, ``bridge-nf-call-iptables=1``) that drop
hits even frames bridged between two ports of one bridge. A DROP in one base chain
cannot be overridden from another table (every base chain of a hook runs, and a drop in
any of them is final), so, as libvirt and Podman do, netagent adds its accepts *in the
chain that drops*: a jump from ``FORWARD`` to ``NETAGENT-FORWARD``, first, holding

    -i BR -j ACCEPT                                   what leaves a bridge (and hairpin)
    -o BR -m conntrack --ctstate RELATED,ESTABLISHED  replies into it
    -o BR -m conntrack --ctstate DNAT                 forwards into it
    -d DEST / -s DEST -m conntrack --ctstate DNAT     forwards to a destination that
                                                      is on no netagent bridge

in each framework whose filter table exists: iptables-nft (nf_tables ``ip filter`` /
``ip6 filter``) and iptables-legacy (``/proc/net/ip_tables_names`` lists ``filter``).
Where no filter table exists nobody filters with iptables, and none is made (Docker
starting later makes one: the drift watcher sees it, and the chains follow within
milliseconds). Other tools' rules and policies are never touched; everything here
carries ``netagent:`` comments and is removed on purge.

The same module writes the localhost guard (``NETAGENT-INPUT``, CVE-2020-8558) for
backends that do not hold it themselves (the iptables backend), in the framework that
backend writes to.

Listing a table with ``iptables-legacy-save -t filter`` would *create* it in a namespace
that had none (legacy tables spring into being when read); the proc file is read first.
"""

from __future__ import annotations

import os
import shutil
import socket
import struct
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import anyio
import structlog

from netagent.agent import intents as I

from .firewall import FirewallSpec
from .iptables.process import SBIN, Programs
from .iptables.restore import render, rule_line
from .iptables.rules import (
    CHAIN_FORWARD,
    CHAIN_INPUT,
    COMMENT_PREFIX,
    Chains,
    Rule,
    jump_rule,
    plural,
)
from .iptables.save import FamilyObserved, only, parse_save

log = structlog.get_logger("netagent.firewall")

#: flavour -> family -> (save, restore)
PROGRAMS = {
    "nft": {
        4: ("iptables-nft-save", "iptables-nft-restore"),
        6: ("ip6tables-nft-save", "ip6tables-nft-restore"),
    },
    "legacy": {
        4: ("iptables-legacy-save", "iptables-legacy-restore"),
        6: ("ip6tables-legacy-save", "ip6tables-legacy-restore"),
    },
}  # fmt: skip
FRAMEWORK = {"nft": "iptables-nft", "legacy": "iptables-legacy"}
#: the built-in chain that jumps to each of ours
HOOKED = {CHAIN_FORWARD: "FORWARD", CHAIN_INPUT: "INPUT"}
MINE = frozenset(HOOKED)
GUARD_RULE: Rule = (
    *("-d", "127.0.0.0/8", "!", "-i", "lo", "-m", "conntrack"),
    *("!", "--ctstate", "RELATED,ESTABLISHED,DNAT"),
    *("-m", "comment", "--comment", COMMENT_PREFIX + "localhost-guard", "-j", "DROP"),
)


@dataclass(frozen=True, order=True)
class Target:
    """One framework and family: ``nft`` or ``legacy``, 4 or 6."""

    flavour: str
    family: int

    @property
    def name(self) -> str:
        return f"{FRAMEWORK[self.flavour]} (ipv{self.family})"


def _comment(text: str) -> Rule:
    return ("-m", "comment", "--comment", COMMENT_PREFIX + text)


def _host(ip: I.IPAddress) -> str:
    return f"{ip}/{ip.max_prefixlen}"


def outside_bridges(spec: FirewallSpec, family: int) -> list[I.IPAddress]:
    """The forwards' destinations of one family that no bridge's subnet holds, in address
    order. By the addresses' integers, and each destination once (``destinations``:
    the desired state's index): with 10,000 forwards, hashing and comparing
    ``ipaddress`` objects took ~30 ms of every sync, a pass over the forwards ~2 ms."""
    nets = [
        (int(a.network.network_address), int(a.network.netmask))
        for br in spec.bridges
        for a in br.addresses
        if a.version == family
    ]
    dests = {int(ip): ip for ip in spec.destinations() if ip.version == family}
    return [dests[n] for n in sorted(dests) if not any(n & mask == net for net, mask in nets)]


def forward_chain(spec: FirewallSpec, family: int) -> list[Rule]:
    """NETAGENT-FORWARD's rules for one family, in a fixed order."""
    rules: list[Rule] = []
    for br in sorted(spec.bridges, key=lambda b: b.name):
        name = br.name
        rules.append(("-i", name, *_comment(f"accept {br.key} out"), "-j", "ACCEPT"))
        rules.append(
            ("-o", name, "-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED",
             *_comment(f"accept {br.key} replies"), "-j", "ACCEPT")
        )  # fmt: skip
        rules.append(
            ("-o", name, "-m", "conntrack", "--ctstate", "DNAT",
             *_comment(f"accept {br.key} forwarded"), "-j", "ACCEPT")
        )  # fmt: skip
    for ip in outside_bridges(spec, family):
        for way in ("-d", "-s"):
            rules.append(
                (way, _host(ip), "-m", "conntrack", "--ctstate", "DNAT",
                 *_comment(f"accept dnat {ip}"), "-j", "ACCEPT")
            )  # fmt: skip
    return rules


def wanted(spec: FirewallSpec, family: int, guard: bool) -> Chains:
    """Our filter chains for one family; empty when the spec needs none."""
    out: Chains = {}
    forward = forward_chain(spec, family)
    if forward:
        out[CHAIN_FORWARD] = forward
    if guard and family == 4 and any(a.version == 4 for b in spec.bridges for a in b.addresses):
        out[CHAIN_INPUT] = [GUARD_RULE]
    return out


def plan_target(want: Chains, have: FamilyObserved) -> tuple[list[str], list[str]]:
    """(restore lines, steps) turning ``have`` (our filter chains) into ``want``."""
    lines: list[str] = []
    tail: list[str] = []
    steps: list[str] = []
    for (builtin, target), count in sorted(have.jumps.items()):
        extra = count - 1 if target in want and HOOKED.get(target) == builtin else count
        lines += [rule_line("-D", builtin, jump_rule(target))] * extra
        if extra:
            steps.append(f"delete jump {builtin} -> {target}")
    for chain in sorted(set(have.chains) - set(want)):
        lines.append(f":{chain} - [0:0]")
        if chain not in have.referenced:
            tail.append(f"-X {chain}")
        steps.append(f"delete chain {chain}")
    for chain, rules in want.items():
        if chain in have.foreign:
            raise OSError(
                f"chain {chain} of the filter table is not netagent's (its rules carry no "
                "netagent mark); rename or remove it"
            )
        old = have.chains.get(chain)
        if old is None or sorted(old) != sorted(rules):
            lines.append(f":{chain} - [0:0]")
            lines += [f"-A {chain} {render(r)}" for r in rules]
            steps.append(f"{'write' if old is not None else 'create'} chain {chain} "
                         f"({plural(len(rules), 'rule')})")  # fmt: skip
        builtin = HOOKED[chain]
        if not have.jumps.get((builtin, chain)):
            tail.append(rule_line("-I", builtin, jump_rule(chain), position=1))
            steps.append(f"add jump {builtin} -> {chain}")
    return lines + tail, steps


#: program -> (its path or None, when that was looked up)
_found: dict[str, tuple[str | None, float]] = {}
#: seconds a lookup is kept: every sync asks for every program, a PATH walk each
FOUND_TTL = 30.0
#: seconds the look for the filtering frameworks may take (two table reads, 1 s each)
TARGETS_TIMEOUT = 5.0


def _resolve(program: str) -> str | None:
    now = time.monotonic()
    got = _found.get(program)
    if got is not None and now - got[1] < FOUND_TTL:
        return got[0]
    search = os.environ.get("PATH", "")
    path = shutil.which(program, path=f"{search}:{SBIN}" if search else SBIN)
    _found[program] = (path, now)
    return path


def nf_tables() -> set[str]:
    """The nf_tables tables of this network namespace, as ``FAMILY NAME`` (a raw
    NFT_MSG_GETTABLE dump: no process, no library). Empty when it cannot be read."""
    families = {1: "inet", 2: "ip", 3: "arp", 5: "netdev", 7: "bridge", 10: "ip6"}
    found: set[str] = set()
    try:
        with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, 12) as sock:
            sock.settimeout(1.0)
            sock.bind((0, 0))
            sock.sendall(struct.pack("=IHHIIBBH", 20, 10 << 8 | 1, 0x301, 1, 0, 0, 0, 0))
            while True:
                data = sock.recv(1 << 16)
                off = 0
                while off + 20 <= len(data):
                    length, kind = struct.unpack_from("=IH", data, off)
                    if length < 16 or kind in (2, 3):  # error or done
                        return found
                    if kind == 10 << 8 and off + 24 <= len(data):
                        family = families.get(data[off + 16], str(data[off + 16]))
                        alen, atype = struct.unpack_from("=HH", data, off + 20)
                        if atype & 0x3FFF == 1:
                            name = data[off + 24 : off + 20 + alen].split(b"\0", 1)[0]
                            found.add(f"{family} {name.decode(errors='replace')}")
                    off += (length + 3) & ~3
    except OSError:
        return found


def legacy_tables(family: int) -> set[str]:
    """The legacy iptables tables that exist (reading them would make them)."""
    path = "/proc/net/ip_tables_names" if family == 4 else "/proc/net/ip6_tables_names"
    try:
        with open(path) as f:
            return {line.strip() for line in f if line.strip()}
    except OSError:
        return set()


@dataclass
class FilterState:
    """What the last sync found and did, for ``doctor`` and ``show``."""

    #: targets that filter (their filter table exists) and hold our chains
    guarded: set[Target] = field(default_factory=set)
    #: target -> why our chains could not be written there
    failed: dict[Target, str] = field(default_factory=dict)


class FilterChains:
    """Keeps our filter chains in every framework that filters. ``guard_in``: the
    framework (``nft`` or ``legacy``) to hold the localhost guard, or None when the NAT
    backend holds it itself."""

    def __init__(self, guard_in: str | None = None) -> None:
        self.guard_in = guard_in
        self.programs = Programs()
        self.state = FilterState()
        #: per target, what was last wanted and found in place
        self._synced: dict[Target, Chains] = {}
        #: the frameworks that filtered when last looked (``targets``)
        self._targets: set[Target] | None = None
        #: how many restores ran (a reading of the host older than one is stale)
        self.writes = 0

    def targets(self, guard: bool) -> list[Target]:
        """The frameworks and families with a filter table now (and the guard's, which
        gets its chain whether or not someone else filters there)."""
        out: list[Target] = []
        tables = nf_tables()
        for family in (4, 6):
            if all(_resolve(p) for p in PROGRAMS["nft"][family]):
                table = "ip filter" if family == 4 else "ip6 filter"
                if table in tables or (guard and self.guard_in == "nft" and family == 4):
                    out.append(Target("nft", family))
            legacy = all(_resolve(p) for p in PROGRAMS["legacy"][family])
            wanted_here = guard and self.guard_in == "legacy" and family == 4
            if legacy and ("filter" in legacy_tables(family) or wanted_here):
                out.append(Target("legacy", family))
        return out

    async def observe(self, target: Target) -> FamilyObserved:
        save = _resolve(PROGRAMS[target.flavour][target.family][0]) or "iptables-save"
        text = await self.programs.run([save, "-t", "filter"])
        # our chains of the filter table that are this module's (the iptables backend's
        # VXLAN guard is its own, ``backends/iptables/plan.py``)
        return only(parse_save(text.decode(errors="replace"), table="filter"), MINE)

    async def sync(self, spec: FirewallSpec, look: bool) -> list[str]:
        """Bring every filtering framework's chains to ``spec``. ``look``: read the
        tables even where what is wanted did not change since the last sync (the
        periodic pass, someone else changed a filter table); otherwise a target whose
        wanted chains are what it was last synced to is not read at all."""
        guard = self.guard_in is not None
        steps: list[str] = []
        if look or self._targets is None:
            # which frameworks filter changes when a tool makes or drops a filter table:
            # the periodic pass and a foreign change of a table look (``look``)
            # off the loop: its nf_tables dump, sent right after a commit that deleted
            # map elements, waits out the kernel's grace period (docs/kernel-facts.md)
            with anyio.fail_after(TARGETS_TIMEOUT):
                self._targets = set(await anyio.to_thread.run_sync(self.targets, guard))
        now = self._targets
        for target in sorted(now):
            want = wanted(spec, target.family, guard and target.flavour == self.guard_in)
            if not look and self._synced.get(target) == want:
                continue
            try:
                have = await self.observe(target)
                lines, done = plan_target(want, have)
                if lines:
                    await self._restore(target, lines)
                    steps += [f"{s} ({target.name})" for s in done]
                self._synced[target] = want
                self.state.failed.pop(target, None)
            except Exception as exc:  # a framework refusing: report it, go on
                msg = getattr(exc, "message", None) or str(exc)
                self.state.failed[target] = msg
                self._synced.pop(target, None)
                log.warning("cannot write netagent's filter chains", where=target.name, error=msg)
            if want:
                self.state.guarded.add(target)
            else:
                self.state.guarded.discard(target)
        for gone in set(self._synced) - now:
            self._synced.pop(gone, None)
            self.state.guarded.discard(gone)
        return steps

    async def _restore(self, target: Target, lines: Iterable[str]) -> None:
        restore = _resolve(PROGRAMS[target.flavour][target.family][1]) or "iptables-restore"
        text = "\n".join(["*filter", *lines, "COMMIT", ""])
        self.writes += 1
        await self.programs.run([restore, "--noflush", "-w"], stdin=text.encode())

    async def purge(self) -> list[str]:
        """Remove our filter chains and jumps everywhere (and nothing else)."""
        removed: list[str] = []
        for target in self.targets(guard=False):
            try:
                have = await self.observe(target)
            except Exception as exc:
                log.warning(
                    "cannot read a filter table to purge it", where=target.name, error=str(exc)
                )
                continue
            if not have.present:
                continue
            lines, _steps = plan_target({}, have)
            await self._restore(target, lines)
            removed += [f"deleted chain {c} ({target.name})" for c in sorted(have.chains)]
        self._synced.clear()
        self._targets = None
        self.state = FilterState()
        return removed
