"""What the host's other firewalls hold, read for ``doctor``, ``explain`` and ``show``.

Three places rules live, each read the way its own tool prints it:

* iptables-nft: ``iptables-nft-save`` / ``ip6tables-nft-save`` (its tables are nf_tables
  tables named ``filter``, ``nat``, ... of family ``ip`` / ``ip6``), read only when
  nf_tables holds such a table;
* iptables-legacy: ``iptables-legacy-save`` without ``-t`` (it dumps only the tables that
  exist; naming one would create it), only when ``/proc/net/ip_tables_names`` lists one;
* native nftables: every other nf_tables table but netagent's own, one ``nft -j list
  table`` each (in-process libnftables when it is there).

All of it is parsed into one small model (:class:`Chain`, :class:`Rule`) that the
packet walk (``agent/fwtrace.py``) and the checks (``agent/doctor.py``) read. netagent's
own chains (``NETAGENT-*`` with its mark) are kept, marked ``ours``: the walk must see
that its accepts come first. Every program runs with a time limit.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .iptables.process import SBIN
from .iptables.save import split_rule
from .xtfilter import legacy_tables, nf_tables

#: seconds one program may take
TIMEOUT = 10.0
#: nf_tables tables iptables-nft (and ebtables/arptables-nft) makes: read with its tools
XT_TABLES = frozenset(
    f"{family} {name}"
    for family in ("ip", "ip6", "arp", "bridge")
    for name in ("filter", "nat", "mangle", "raw", "security", "broute")
)
OWN_TABLE = "inet netagent"
#: iptables built-in chain -> nf hook
XT_HOOKS = {
    "PREROUTING": "prerouting",
    "INPUT": "input",
    "FORWARD": "forward",
    "OUTPUT": "output",
    "POSTROUTING": "postrouting",
}


@dataclass
class Rule:
    text: str
    #: ACCEPT, DROP, REJECT, RETURN, DNAT, MASQUERADE, ... or JUMP/GOTO (``target``)
    verdict: str | None = None
    target: str | None = None
    proto: str | None = None
    #: destination port ranges matched ([] = any)
    dports: list[tuple[int, int]] = field(default_factory=list)
    #: (interface, negated); ``+`` ends a prefix in iptables, ``*`` in nft
    iif: tuple[str, bool] | None = None
    oif: tuple[str, bool] | None = None
    daddr: tuple[str, bool] | None = None
    saddr: tuple[str, bool] | None = None
    #: conntrack states/statuses required (``NEW``, ``ESTABLISHED``, ``DNAT``...), negated
    ctstate: tuple[frozenset[str], bool] | None = None
    dnat_to: str | None = None
    #: matches the walk does not understand: the rule may or may not match
    unknown: list[str] = field(default_factory=list)
    ours: bool = False


@dataclass
class Chain:
    framework: str  # iptables-nft | iptables-legacy | nftables
    family: int | None  # 4, 6, or None for inet/bridge
    table: str  # filter, nat, ... (iptables) or "inet firewalld" (nft)
    name: str
    hook: str | None = None
    priority: int = 0
    policy: str | None = None  # ACCEPT/DROP for base chains
    kind: str = "filter"  # filter | nat | route
    rules: list[Rule] = field(default_factory=list)

    @property
    def where(self) -> str:
        if self.framework == "nftables":
            return f"chain {self.name} of nft table {self.table}"
        v = f"ip{'6' if self.family == 6 else ''}tables"
        flavour = self.framework.split("-", 1)[1]
        return f"chain {self.name} of the {self.table} table ({v}-{flavour})"


#: a chain's table: (framework, family, table)
TableId = tuple[str, "int | None", str]


@dataclass
class HostFirewall:
    """The host's chains. Read once, then walked for every forward (10,000 walks after a
    reading), so the lookups a walk makes are indexed; the indexes are built on first
    use and rebuilt when ``chains`` has grown or shrunk: it is only appended to while being
    read, and never changed once walked."""

    chains: list[Chain] = field(default_factory=list)
    nft_tables: set[str] = field(default_factory=set)
    legacy: dict[int, set[str]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    _indexed: int = field(default=-1, init=False, repr=False, compare=False)
    _tables: dict[TableId, dict[str, Chain]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )
    _hooks: dict[str, list[Chain]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )
    _kept: dict[str, dict[Any, Any]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def _index(self) -> None:
        if self._indexed == len(self.chains):
            return
        tables: dict[TableId, dict[str, Chain]] = {}
        hooks: dict[str, list[Chain]] = {}
        for c in self.chains:
            # the first of a name wins, as a linear search for it would find
            tables.setdefault((c.framework, c.family, c.table), {}).setdefault(c.name, c)
            if c.hook is not None:
                hooks.setdefault(c.hook, []).append(c)
        for at in hooks.values():
            at.sort(key=lambda c: c.priority)  # stable: equal priorities keep their order
        self._tables, self._hooks, self._indexed = tables, hooks, len(self.chains)
        self._kept.clear()

    def kept(self, name: str) -> dict[Any, Any]:
        """A dict that a reader of this snapshot keeps results of its own in (the packet
        walks, ``agent/fwtrace.py``), emptied with the indexes."""
        self._index()
        return self._kept.setdefault(name, {})

    def find(self, framework: str, family: int | None, table: str, name: str) -> Chain | None:
        self._index()
        return self._tables.get((framework, family, table), {}).get(name)

    def table_of(self, chain: Chain) -> dict[str, Chain]:
        """The chains of ``chain``'s table by name (what a jump in it can reach)."""
        self._index()
        return self._tables.get((chain.framework, chain.family, chain.table), {})

    def base(self, hook: str) -> list[Chain]:
        """Base chains at a hook, in the order the kernel runs them (priority)."""
        self._index()
        return list(self._hooks.get(hook, ()))


# ---- iptables-save -------------------------------------------------------------------
#: iptables' table priorities at each hook (raw -300, mangle -150, nat -100, filter 0)
XT_PRIORITY = {"raw": -300, "mangle": -150, "nat": -100, "filter": 0, "security": 50}
_XT_KIND = {"nat": "nat", "mangle": "route"}


TERMINAL = frozenset(
    {"ACCEPT", "DROP", "REJECT", "RETURN", "DNAT", "SNAT", "MASQUERADE", "REDIRECT"}
)
NON_TERMINAL = frozenset({"MARK", "LOG", "CONNMARK", "NFLOG", "CT", "TRACE", "TCPMSS", "NOTRACK"})


def _ports(text: str) -> list[tuple[int, int]]:
    out = []
    for part in text.split(","):
        lo, _, hi = part.partition(":")
        try:
            out.append((int(lo or 0), int(hi or lo or 65535)))
        except ValueError:
            continue
    return out


def parse_xt_rule(tokens: list[str]) -> Rule:
    rule = Rule(" ".join(tokens))
    i, neg = 0, False
    while i < len(tokens):
        t = tokens[i]
        arg = tokens[i + 1] if i + 1 < len(tokens) else ""
        if t == "!":
            neg = True
            i += 1
            continue
        if t == "-p":
            rule.proto = arg
        elif t in ("--dport", "--dports", "--destination-port"):
            rule.dports = _ports(arg)
        elif t == "-i":
            rule.iif = (arg, neg)
        elif t == "-o":
            rule.oif = (arg, neg)
        elif t == "-d":
            rule.daddr = (arg, neg)
        elif t == "-s":
            rule.saddr = (arg, neg)
        elif t == "--ctstate":
            rule.ctstate = (frozenset(arg.split(",")), neg)
        elif t in ("-j", "-g"):
            if arg in TERMINAL:
                rule.verdict = arg
            elif arg not in NON_TERMINAL:
                rule.verdict = "GOTO" if t == "-g" else "JUMP"
                rule.target = arg
        elif t == "--to-destination":
            rule.dnat_to = arg
        elif t == "--comment":
            rule.ours = arg.startswith("netagent:")
        elif t == "-m":
            if arg not in ("comment", "tcp", "udp", "conntrack", "multiport", "state"):
                rule.unknown.append(f"-m {arg}")
        elif t == "--state":
            rule.ctstate = (frozenset(arg.split(",")), neg)
        neg = False
        i += 2 if t.startswith("-") and t not in ("!",) else 1
    return rule


#: how netagent's mark shows in ``iptables-save`` (the comment match, quoted)
_OWN_MARK = '--comment "netagent:'


def parse_xt_save(text: str, framework: str, family: int) -> list[Chain]:
    chains: dict[tuple[str, str], Chain] = {}
    table = ""
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("*"):
            table = line[1:]
        elif line.startswith(":"):
            name, policy = [*line[1:].split(), "-"][:2]
            hook = XT_HOOKS.get(name)
            chains[(table, name)] = Chain(
                framework,
                family,
                table,
                name,
                hook=hook,
                priority=XT_PRIORITY.get(table, 0),
                policy=policy if policy != "-" else None,
                kind=_XT_KIND.get(table, "filter"),
            )
        elif line.startswith("-A "):
            if table == "nat" and line.startswith("-A NETAGENT-") and _OWN_MARK in line:
                # netagent's own DNATs, a rule per forward: kept as text (nothing walks
                # the nat table's rules, and the checks skip our own), not parsed: 150
                # ms of a reading with 10,000 forwards
                _a, name, rest = line.split(" ", 2)
                chain = chains.get((table, name))
                if chain is not None:
                    chain.rules.append(Rule(rest, ours=True))
                continue
            tokens = split_rule(line)
            chain = chains.get((table, tokens[1]))
            if chain is not None:
                chain.rules.append(parse_xt_rule(tokens[2:]))
    for chain in chains.values():
        if chain.name.startswith("NETAGENT-") and any(r.ours for r in chain.rules):
            for r in chain.rules:
                r.ours = True
    return list(chains.values())


# ---- nft JSON ------------------------------------------------------------------------
def _value(v: Any) -> Any:
    if isinstance(v, dict) and "prefix" in v:
        return f"{v['prefix']['addr']}/{v['prefix']['len']}"
    if isinstance(v, dict) and "set" in v:
        return [_value(x) for x in v["set"]]
    if isinstance(v, dict) and "range" in v:
        return tuple(v["range"])
    return v


def nft_text(rule: Rule, comment: str | None = None) -> str:
    """A short nft-like text of what was understood of a rule (``tcp dport 80 drop``)."""
    words: list[str] = []
    for name, have in (("iifname", rule.iif), ("oifname", rule.oif)):
        if have is not None:
            words.append(f'{name} {"!= " if have[1] else ""}"{have[0]}"')
    for name, have in (("saddr", rule.saddr), ("daddr", rule.daddr)):
        if have is not None:
            words.append(f"ip {name} {'!= ' if have[1] else ''}{have[0]}")
    if rule.proto and not rule.dports:
        words.append(f"meta l4proto {rule.proto}")
    if rule.dports:
        ports = ", ".join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in rule.dports)
        words.append(
            f"{rule.proto or 'th'} dport {{ {ports} }}"
            if "," in ports
            else f"{rule.proto or 'th'} dport {ports}"
        )
    if rule.ctstate is not None:
        states = ",".join(sorted(s.lower() for s in rule.ctstate[0]))
        words.append(f"ct state {'!= ' if rule.ctstate[1] else ''}{states}")
    words += [f"<{u}>" for u in rule.unknown]
    if rule.verdict in ("JUMP", "GOTO"):
        words.append(f"{rule.verdict.lower()} {rule.target}")
    elif rule.verdict:
        words.append(rule.verdict.lower())
    if comment:
        words.append(f'comment "{comment}"')
    return " ".join(words)


def parse_nft_rule(r: dict[str, Any]) -> Rule:
    rule = Rule("")
    for expr in r.get("expr", ()):
        if not isinstance(expr, dict):
            continue
        key, body = next(iter(expr.items()), (None, None))
        if key == "match" and isinstance(body, dict):
            op = body.get("op", "==")
            neg = op == "!="
            left, right = body.get("left", {}), _value(body.get("right"))
            meta = left.get("meta", {}).get("key") if isinstance(left, dict) else None
            payload = left.get("payload", {}) if isinstance(left, dict) else {}
            ct = left.get("ct", {}).get("key") if isinstance(left, dict) else None
            if meta in ("iifname", "oifname") and isinstance(right, str):
                setattr(rule, meta[:3], (right, neg))
            elif meta == "l4proto" or payload.get("field") == "protocol":
                rule.proto = right if isinstance(right, str) else None
            elif payload.get("field") == "dport":
                vals = right if isinstance(right, list) else [right]
                for val in vals:
                    if isinstance(val, int):
                        rule.dports.append((val, val))
                    elif isinstance(val, tuple) and len(val) == 2:
                        rule.dports.append((int(val[0]), int(val[1])))
                if payload.get("protocol") in ("tcp", "udp"):
                    rule.proto = payload["protocol"]
            elif payload.get("field") in ("daddr", "saddr") and isinstance(right, str):
                setattr(rule, payload["field"], (right, neg))
            elif ct in ("state", "status"):
                vals = right if isinstance(right, list) else [right]
                rule.ctstate = (frozenset(str(v).upper() for v in vals), neg)
            elif meta == "nfproto":
                pass
            else:
                rule.unknown.append(json.dumps(left)[:80])
        elif key in ("accept", "drop", "reject", "return"):
            rule.verdict = key.upper()
        elif key in ("jump", "goto") and isinstance(body, dict):
            rule.verdict, rule.target = key.upper(), body.get("target")
        elif key == "dnat":
            rule.verdict = "DNAT"
            rule.dnat_to = json.dumps(body)[:80]
        elif key in ("masquerade", "snat"):
            rule.verdict = key.upper()
    rule.text = nft_text(rule, r.get("comment"))
    return rule


def parse_nft_table(doc: dict[str, Any]) -> list[Chain]:
    chains: dict[str, Chain] = {}
    for item in doc.get("nftables", ()):
        if "chain" in item:
            c = item["chain"]
            family = {"ip": 4, "ip6": 6}.get(c["family"])
            chains[c["name"]] = Chain(
                "nftables",
                family,
                f"{c['family']} {c['table']}",
                c["name"],
                hook=c.get("hook"),
                priority=int(c.get("prio", 0) or 0),
                policy=str(c.get("policy", "accept")).upper() if c.get("hook") else None,
                kind=c.get("type", "filter"),
            )
        elif "rule" in item:
            r = item["rule"]
            chain = chains.get(r["chain"])
            if chain is not None:
                chain.rules.append(parse_nft_rule(r))
    return list(chains.values())


# ---- reading -------------------------------------------------------------------------
def _run(argv: list[str]) -> str:
    path = f"{os.environ.get('PATH', '')}:{SBIN}"
    program = shutil.which(argv[0], path=path)
    if program is None:
        raise FileNotFoundError(argv[0])
    done = subprocess.run(
        [program, *argv[1:]],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
        env={"LANG": "C", "PATH": path},
    )
    if done.returncode != 0:
        raise OSError(f"{argv[0]}: {done.stderr.strip()[:200]}")
    return done.stdout


def read(nft_list: Callable[[str], str | None] | None = None) -> HostFirewall:
    """The host's firewalls as they are now. Blocking (processes): run it in a worker
    thread. ``nft_list(command) -> JSON text`` lists with libnftables when given."""
    out = HostFirewall(nft_tables=nf_tables())
    for family, prefix in ((4, "ip"), (6, "ip6")):
        if any(t == f"{prefix} {n}" for t in out.nft_tables for n in ("filter", "nat")):
            try:
                text = _run([f"{prefix}tables-nft-save"])
                out.chains += parse_xt_save(text, "iptables-nft", family)
            except (OSError, subprocess.SubprocessError) as exc:
                out.errors.append(str(exc))
        out.legacy[family] = legacy_tables(family)
        if out.legacy[family]:
            try:
                text = _run([f"{prefix}tables-legacy-save"])
                out.chains += parse_xt_save(text, "iptables-legacy", family)
            except (OSError, subprocess.SubprocessError) as exc:
                out.errors.append(str(exc))
    for table in sorted(out.nft_tables - XT_TABLES - {OWN_TABLE}):
        try:
            fam, name = table.split(" ", 1)
            listed: str | None = nft_list(f"list table {fam} {name}") if nft_list else None
            if listed is None:
                listed = _run(["nft", "-j", "list", "table", fam, name])
            out.chains += parse_nft_table(json.loads(listed))
        except (OSError, ValueError, subprocess.SubprocessError) as exc:
            out.errors.append(f"nft list table {table}: {exc}")
    return out
