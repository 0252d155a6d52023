"""The iptables backend: netagent's own ``NETAGENT-*`` chains in the nat table.

For hosts where nftables cannot be used (or is not wanted), the same NAT is written for
``iptables`` (IPv4) and ``ip6tables`` (IPv6), in chains only netagent writes to:

    nat table, per family
      PREROUTING   -m comment --comment netagent:jump -j NETAGENT-PREROUTING    (one rule)
      OUTPUT       -m comment --comment netagent:jump -j NETAGENT-OUTPUT        (one rule)
      POSTROUTING  -m comment --comment netagent:jump -j NETAGENT-POSTROUTING   (one rule)
      NETAGENT-PREROUTING   one DNAT rule per forwarded port, only for traffic addressed
      NETAGENT-OUTPUT       to the host (-m addrtype --dst-type LOCAL, CNI portmap's
                            GHSA-jv3w-x3r3-g6rm), the same rules for the host's own traffic
      NETAGENT-POSTROUTING  masquerade 127.0.0.1 -> forward (IPv4), hairpin and
                            --masquerade per bridge address

Every rule carries ``-m comment --comment netagent:<intent key or purpose>``, so a reader
of ``iptables-save`` sees who owns it and why. ``iptables-save`` prints the whole table,
but all that is not ours is dropped as it is read; nothing else is ever written. (Checked
with iptables 1.8.9 in both its nf_tables and legacy flavours: same save format, and both
restore flavours accept the ``-C``/``-D``/``-X`` lines used here.)

A port range is one rule per port, not one ``--dport A:B`` rule: a DNAT to ``IP:C-D`` is
a *pool* (each connection gets any port of C-D), not the port-to-port mapping a forward
means. So the cost per new connection grows with the number of forwarded ports (~16 ns a
rule, ``shared/notes/nftables.md``); that is the known price of iptables, and the reason
nftables (one rule reading a map) is tried first by ``--firewall auto``.

Every change is one ``iptables-restore --noflush`` transaction per family: in such a
file, declaring a chain (``:NETAGENT-PREROUTING - [0:0]``) creates it or flushes it, so
the file rewrites our chains whole and leaves every other rule of the table as it is.
What exists is read with ``iptables-save -t nat``; the rules are written in the form
``iptables-save`` prints them (``-p tcp -m addrtype ... -m tcp --dport``, ``/32`` on host
addresses) so that comparing what we want with what is there needs no normalizing.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import subprocess
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

import anyio

from netagent.agent import intents as I
from netagent.agent.errors import BackendFailed, BackendUnavailable

from .firewall import Batch, FirewallBackend, FirewallSpec

PREFIX = "NETAGENT-"
CHAIN_PRE = "NETAGENT-PREROUTING"
CHAIN_OUT = "NETAGENT-OUTPUT"
CHAIN_POST = "NETAGENT-POSTROUTING"
#: (built-in chain of the nat table, our chain it jumps to)
HOOKS = (("PREROUTING", CHAIN_PRE), ("OUTPUT", CHAIN_OUT), ("POSTROUTING", CHAIN_POST))
#: the chains that hold the forwards' DNAT rules
DNAT_CHAINS = (CHAIN_PRE, CHAIN_OUT)
BUILTIN_CHAINS = frozenset({"PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"})
COMMENT_PREFIX = "netagent:"
JUMP_COMMENT = COMMENT_PREFIX + "jump"

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


def _addr_port(ip: I.IPAddress, port: int) -> str:
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"


def dnat_rules(fwd: I.Forward) -> list[Rule]:
    """One DNAT rule per port of the forward; the same list goes into PREROUTING (traffic
    from outside) and OUTPUT (the host's own traffic)."""
    bound: Rule = ("-d", _host(fwd.host_ip)) if fwd.host_ip is not None else ()
    out = []
    for hport, dport in fwd.pairs():
        out.append(
            (
                *bound,
                *("-p", fwd.proto, "-m", "addrtype", "--dst-type", "LOCAL"),
                *("-m", fwd.proto, "--dport", str(hport)),
                *_comment(fwd.key),
                *("-j", "DNAT", "--to-destination", _addr_port(fwd.dest_ip, dport)),
            )
        )
    return out


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


def desired_chains(spec: FirewallSpec, version: int) -> dict[str, list[Rule]]:
    """Our chains of one family and their rules, in a fixed order (forwards sorted by
    protocol, host address and port; bridges by name) so an unchanged spec always gives
    the same chains, whatever order the desired state lists its intents in."""
    forwards = sorted((f for f in spec.forwards if f.family == version), key=_forward_order)
    dnat = [rule for fwd in forwards for rule in dnat_rules(fwd)]
    post = [LOCALHOST_RULE] if version == 4 else []
    for br in sorted(spec.bridges, key=lambda b: b.name):
        post += bridge_rules(br, version)
    return {CHAIN_PRE: dnat, CHAIN_OUT: list(dnat), CHAIN_POST: post}


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
    return " ".join([t if _BARE.fullmatch(t) else quote(t) for t in rule])


def rule_line(op: str, chain: str, rule: Rule, position: int | None = None) -> str:
    """``-A CHAIN tokens...`` (or ``-I CHAIN 1 ...`` with a position)."""
    where = chain if position is None else f"{chain} {position}"
    return f"{op} {where} {render(rule)}"


def chain_lines(chain: str, rules: list[Rule], cache: dict[Rule, str]) -> list[str]:
    """``-A`` lines for a chain; ``cache`` renders each rule once, as PREROUTING and
    OUTPUT hold the same DNAT rules (20,000 lines for 10,000 forwards)."""
    out = []
    for rule in rules:
        text = cache.get(rule)
        if text is None:
            text = cache[rule] = render(rule)
        out.append(f"-A {chain} {text}")
    return out


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
    # PREROUTING and OUTPUT carry the same DNAT rules: say each change once
    add, gone = list(dict.fromkeys(adds)), list(dict.fromkeys(dels))
    if len(add) + len(gone) > MAX_DETAIL:
        # a line per rule helps nobody at 10,000 forwards, and describing them costs time
        return [f"add {_plural(len(add), 'rule')}, delete {len(gone)} (ipv{version})"]
    return _dedup([f"delete {describe(r)}" for r in gone] + [f"add {describe(r)}" for r in add])


def _jump_text(builtin: str, target: str, version: int) -> str:
    return f"jump {builtin} -> {target} (ipv{version})"


def plan_family(
    version: int, want: dict[str, list[Rule]], have: FamilyObserved
) -> tuple[list[str], list[str], bool]:
    """The restore lines and steps that turn ``have`` into ``want`` for one family, and
    whether they touch the forwards (a DNAT chain or a jump). Unchanged chains are left out
    of the file, so they are neither flushed nor rewritten."""
    decls: list[str] = []
    body: list[str] = []
    tail: list[str] = []
    steps: list[str] = []
    adds: list[Rule] = []
    dels: list[Rule] = []
    cache: dict[Rule, str] = {}
    forwards_touched = False
    wanted_jumps = {(builtin, chain) for builtin, chain in HOOKS}
    # jumps first: a jump into a chain we delete below must be gone before the chain
    for (builtin, target), count in sorted(have.jumps.items()):
        extra = count - 1 if (builtin, target) in wanted_jumps else count
        for _ in range(extra):
            body.append(rule_line("-D", builtin, jump_rule(target)))
        if extra:
            forwards_touched = True
            what = "duplicate " if (builtin, target) in wanted_jumps else ""
            steps.append(f"delete {what}{_jump_text(builtin, target, version)}")
    for chain in sorted(set(have.chains) - set(want)):
        # an owned chain this version no longer uses: flush (declare) it, then delete it
        decls.append(f":{chain} - [0:0]")
        tail.append(f"-X {chain}")
        steps.append(f"delete chain {chain} (ipv{version})")
        dels += have.chains[chain]
    for chain, rules in want.items():
        old = have.chains.get(chain)
        # order within our chains does not matter: forwards never overlap (the desired
        # state refuses that) and the POSTROUTING rules all masquerade; comparing as
        # multisets lets incremental appends stand until a real difference
        if old is not None and Counter(old) == Counter(rules):
            continue
        forwards_touched |= chain in DNAT_CHAINS
        decls.append(f":{chain} - [0:0]")
        body += chain_lines(chain, rules, cache)
        verb = "create" if old is None else "rewrite"
        steps.append(f"{verb} chain {chain} (ipv{version}, {_plural(len(rules), 'rule')})")
        wanted, had = Counter(rules), Counter(old or [])
        adds += (wanted - had).elements()
        dels += (had - wanted).elements()
    for builtin, chain in HOOKS:
        if not have.jumps.get((builtin, chain)):
            # first, so the host's own rules further down cannot pre-empt the forwards
            tail.append(rule_line("-I", builtin, jump_rule(chain), position=1))
            steps.append(f"add {_jump_text(builtin, chain, version)}")
            forwards_touched = True
    lines = decls + body + tail
    return lines, steps + _rule_steps(adds, dels, version), forwards_touched


def _resolve(program: str) -> str | None:
    search = os.environ.get("PATH", "")
    return shutil.which(program, path=f"{search}:{SBIN}" if search else SBIN)


def _ipv6_kernel() -> bool:
    # absent when the kernel has no IPv6 (ipv6.disable=1): ip6tables would only fail
    return os.path.exists("/proc/net/if_inet6")


class IptablesBackend(FirewallBackend):
    """NAT in netagent's own ``NETAGENT-*`` chains of the nat table, for IPv4 and IPv6.

    ``families`` is which IP versions to manage; by default IPv4, plus IPv6 when
    ``ip6tables-restore`` is installed and the kernel has IPv6. Constructing the backend
    runs nothing, so planning can be tested without root."""

    name = "iptables"
    # iptables-nft keeps its chains in nf_tables' "ip nat" / "ip6 nat" tables
    monitor_markers = (" ip nat", " ip6 nat")

    def __init__(self, families: tuple[int, ...] | None = None) -> None:
        if families is None:
            has6 = all(_resolve(p) for p in TOOLS[6]) and _ipv6_kernel()
            families = (4, 6) if has6 else (4,)
        if not families or set(families) - set(TOOLS):
            raise ValueError(f"families must be a non-empty subset of (4, 6), not {families}")
        self.families = tuple(sorted(set(families)))
        self.tools = {v: tuple(_resolve(p) or p for p in TOOLS[v]) for v in self.families}

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

    async def observe(self) -> Observed:
        obs = Observed()
        for version in self.families:
            save, _restore = self.tools[version]
            text = await self._run([save, "-t", "nat"])
            obs.families[version] = parse_save(text.decode(errors="replace"))
        return obs

    def _check_families(self, spec: FirewallSpec, have: Iterable[int]) -> None:
        missing = spec_families(spec) - set(have)
        if missing:
            raise BackendUnavailable(
                f"the iptables backend cannot serve IPv{min(missing)} here "
                f"({TOOLS[min(missing)][1]} is missing or the kernel lacks that family); "
                "remove those forwards/addresses or use --firewall nftables"
            )

    def plan(self, spec: FirewallSpec, observed: Observed) -> Batch:
        """Pure. Families whose chains and jumps are as wanted contribute nothing; the
        others get one restore file that rewrites just the chains that differ. A family
        missing from ``observed`` is planned as if nothing of ours were there.

        ``full`` is set when the batch rewrites a chain holding forwards or a jump into
        one: until it is applied, forwards may not work (the daemon's status says so)."""
        self._check_families(spec, self.families)
        payload: dict[str, str] = {}
        steps: list[str] = []
        full = False
        for version in self.families:
            want = desired_chains(spec, version)
            have = observed.families.get(version, FamilyObserved())
            lines, fsteps, touched = plan_family(version, want, have)
            if lines:
                payload[str(version)] = restore_text(lines)
                steps += fsteps
                full |= touched
        if not payload:
            return Batch()
        return Batch(steps=steps, payload=payload, full=full)

    def plan_update(
        self, spec: FirewallSpec, added: list[I.Forward], removed: list[I.Forward]
    ) -> Batch:
        """Pure. Deletes the removed forwards' rules by their exact spec (``-D``) and
        appends the added ones (``-A``), one ``iptables-restore --noflush`` per family:
        a change costs one rule, not a rewrite of 20,000.

        Without an observation we cannot know whether our jumps and chains are still
        there; the file *checks* each jump (``-C``) and a ``-D`` of a rule that is gone
        fails too: then the whole transaction fails, nothing changes, and the reconciler
        falls back to observe + plan, which rewrites what differs."""
        if not added and not removed:
            return Batch()
        self._check_families(spec, self.families)
        payload: dict[str, str] = {}
        if sum(f.count for f in [*added, *removed]) > MAX_DETAIL:
            steps = [f"delete {_plural(len(removed), 'forward')}, add {len(added)}"]
        else:
            steps = [f"delete {describe(r)}" for f in removed for r in dnat_rules(f)]
            steps += [f"add {describe(r)}" for f in added for r in dnat_rules(f)]
        for version in sorted({f.family for f in [*added, *removed]}):
            lines = [rule_line("-C", builtin, jump_rule(chain)) for builtin, chain in HOOKS]
            for op, forwards in (("-D", removed), ("-A", added)):
                for fwd in forwards:
                    if fwd.family != version:
                        continue
                    for rule in dnat_rules(fwd):
                        lines += [rule_line(op, chain, rule) for chain in DNAT_CHAINS]
            payload[str(version)] = restore_text(lines)
        return Batch(steps=steps, payload=payload)

    async def _restore(self, version: int, text: str) -> None:
        if version not in self.tools:
            raise BackendUnavailable(f"the iptables backend does not manage IPv{version} here")
        _save, restore = self.tools[version]
        await self._run([restore, "--noflush", "-w"], stdin=text.encode())

    async def apply(self, batch: Batch) -> None:
        """One ``iptables-restore --noflush`` per family (IPv4 first), each atomic."""
        if batch.empty:
            return
        for version, text in sorted(batch.payload.items()):
            await self._restore(int(version), text)

    async def present(self) -> bool:
        return (await self.observe()).present

    async def purge(self) -> list[str]:
        """Remove our jumps (by their exact rule), then flush and delete our chains: one
        restore per family, so a failure (say, someone else's rule jumping into one of our
        chains) leaves that family as it was instead of half purged."""
        observed = await self.observe()
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
            removed += [
                f"deleted chain {chain} (ipv{version}, {_plural(len(have.chains[chain]), 'rule')})"
                for chain in sorted(have.chains)
            ]
            await self._restore(version, restore_text(lines))
        return removed
