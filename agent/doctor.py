"""``netagent ctl doctor``: everything on the host that makes netagent's bridges or
forwards fail, one finding a line: what, who did it (when it can tell), the command that
fixes it. Pure: it reads a :class:`~netagent.agent.hostview.HostView` snapshot, the
desired state and what netagent's own filter chains hold, and changes nothing.

A finding is a *problem* (``doctor`` exits 1; with ``blocks`` the keys it names are not
in place in ``show``: their traffic is dropped, or another tool DNATs their port) or a
*note* (worth knowing, nothing broken: a DROP policy that netagent's accepts pass, say).
The checks are listed in ``docs/doctor.md``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from netagent.backends.hostfw import Chain, HostFirewall

from . import fwtrace as T
from .findings import NOTE, PROBLEM, Desired, Finding, ForwardMemo, Fwd, PerForward
from .hostview import HostView

#: a Linux bridge takes at most this many ports (BR_MAX_PORTS - 1)
BRIDGE_PORTS = 1023
#: warn from this share of it on
PORTS_NEAR = 0.9
BR_NF = "net/bridge/bridge-nf-call-iptables"
NEW_DNAT = frozenset({"NEW", "DNAT"})
#: chain (or nft table) name prefixes -> the tool that makes them
TOOLS = (
    ("DOCKER", "Docker"),
    ("NETAVARK", "Podman (netavark)"),
    ("netavark", "Podman (netavark)"),
    ("CNI-", "CNI portmap (Podman or containerd)"),
    ("LIBVIRT", "libvirt"),
    ("libvirt", "libvirt"),
    ("ufw", "ufw"),
    ("KUBE-", "kube-proxy"),
    ("f2b-", "fail2ban"),
    ("firewalld", "firewalld"),
)


def tool_of(name: str, fw: HostFirewall | None = None, chain: Chain | None = None) -> str | None:
    """Which tool makes a chain or table of this name, if one is known."""
    base = name.split(" ")[-1]
    for prefix, tool in TOOLS:
        if base.startswith(prefix):
            return tool
    if chain is not None and fw is not None and chain.framework != "nftables":
        # a built-in chain's DROP policy: whoever has chains in that table
        names = [
            c.name
            for c in fw.chains
            if (c.framework, c.family, c.table) == (chain.framework, chain.family, chain.table)
        ]
        for prefix, tool in TOOLS:
            if any(n.startswith(prefix) for n in names):
                extra = " (it sets FORWARD to DROP when it turns forwarding on)"
                return tool + (extra if tool == "Docker" else "")
    return None


def who(fw: HostFirewall, outcome: T.Outcome) -> str:
    where = outcome.where
    tool = tool_of(where.table if where.framework == "nftables" else where.name, fw, where)
    if tool is None and where.framework == "nftables":
        tool = tool_of(where.table)
    place = where.where if outcome.rule is not None else f"the policy of {where.where}"
    return f"{tool}, {place}" if tool else place


def _fix_drop(outcome: T.Outcome, bridge: str | None, tool: str | None) -> str:
    where = outcome.where
    if tool and tool.startswith("firewalld"):
        return (
            f"firewall-cmd --permanent --zone=trusted --add-interface={bridge or 'BRIDGE'} "
            "&& firewall-cmd --reload"
        )
    if where.framework == "nftables":
        iface = f'oifname "{bridge}" ' if bridge else ""
        fam, table = where.table.split(" ", 1)
        return f"nft insert rule {fam} {table} {where.name} {iface}accept (in your own table)"
    return (
        "netagent keeps its accepts first in NETAGENT-FORWARD; this drop comes before "
        f"them: move that rule after the jump to NETAGENT-FORWARD in {where.name}"
    )


class Doctor:
    """Runs the checks over one snapshot."""

    def __init__(
        self,
        view: HostView,
        desired: Desired,
        failed_filters: dict[str, str] | None = None,
        backend: str = "nftables",
        memo: ForwardMemo | None = None,
    ) -> None:
        self.view = view
        self.fw = view.firewall
        self.d = desired
        self.failed = failed_filters or {}
        self.backend = backend
        self.memo = memo
        self.found: list[Finding] = []
        #: the checks that ran (named in ``doctor``'s summary)
        self.checked: list[str] = []
        #: a forward's destination -> (its bridge, the address as text)
        self._dests: dict[Any, tuple[str | None, str]] = {}

    def add(self, code: str, severity: str, what: str, **kw: Any) -> None:
        self.found.append(Finding(code, severity, what, **kw))

    def run(self) -> list[Finding]:
        if self.memo is not None:
            self.memo.begin(self.view, self.d)
        for check in (
            self.forwarding,
            self.drops,
            self.legacy_beside_nft,
            self.br_netfilter,
            self.competing_dnat,
            self.listeners,
            self.managers,
            self.sysctls_of_bridges,
            self.port_counts,
            self.own_chains,
            self.reading,
        ):
            self.checked.append(check.__name__.replace("_", " "))
            check()
        if self.memo is not None:
            self.memo.end()
        return self.found

    def _per_forward(self, check: str, fwd: Fwd, compute: Any) -> set[str]:
        """One forward's part of a check: from the memo when it holds it; its findings
        added, the DROP policies its traffic passes returned."""
        found, passed = self.memo.get(check, fwd, compute) if self.memo else compute()
        self.found += found
        return passed

    # ---- the checks -------------------------------------------------------------------
    def forwarding(self) -> None:
        for version, path, name in (
            (4, "net/ipv4/ip_forward", "net.ipv4.ip_forward"),
            (6, "net/ipv6/conf/all/forwarding", "net.ipv6.conf.all.forwarding"),
        ):
            keys = [f[0] for f in self.d.forwards if f[2] == version]
            keys += [b[0] for b in self.d.bridges.values() if (b[1] if version == 4 else b[2])]
            value = self.view.sysctls.get(path)
            if keys and value is not None and value != "1":
                self.add(
                    "ip-forwarding-off",
                    PROBLEM,
                    f"IP forwarding (IPv{version}) is off: nothing is routed to or from "
                    "the bridges, no forward reaches its destination",
                    fix=f"sysctl -w {name}=1 (netagent turns it on again at its next pass)",
                    keys=tuple(keys),
                    blocks=True,
                )

    def _packets(self) -> list[tuple[str, str, tuple[str, ...], T.Packet]]:
        """(what, bridge, keys, packet): the traffic netagent's bridges need through the
        forward hook (each forward's: ``_forward_packet``)."""
        up = self.view.uplink
        out: list[tuple[str, str, tuple[str, ...], T.Packet]] = []
        bridged = self.view.sysctls.get(BR_NF) == "1"
        for name, (key, v4, v6, plugs) in sorted(self.d.bridges.items()):
            keys = (key, *plugs)
            for family, nets in ((4, v4), (6, v6)):
                if not nets:
                    continue
                net = nets[0]
                inside = str(net.network_address + 2) if net.num_addresses > 2 else None
                if bridged and plugs:
                    out.append(
                        (
                            f"traffic between the namespaces on {name}",
                            name,
                            keys,
                            T.Packet(family, "tcp", None, name, name, inside, inside),
                        )
                    )
                if up is not None and up != name:
                    out.append(
                        (
                            f"traffic from {name}'s namespaces out of the host",
                            name,
                            keys,
                            T.Packet(family, "tcp", None, name, up, inside, None),
                        )
                    )
                    out.append(
                        (
                            f"replies into {name}",
                            name,
                            keys,
                            T.Packet(
                                family,
                                "tcp",
                                None,
                                up,
                                name,
                                None,
                                inside,
                                frozenset({"ESTABLISHED"}),
                            ),
                        )
                    )
        return out

    def _forward_packet(self, fwd: Fwd) -> tuple[str, str, tuple[str, ...], T.Packet]:
        key, proto, family, _ports, dest, dport = fwd
        # forwards share a few destinations: each one's bridge and text found once
        got = self._dests.get(dest)
        if got is None:
            bridge = next(
                (n for n, b in self.d.bridges.items() if any(dest in net for net in b[1] + b[2])),
                None,
            )
            got = self._dests[dest] = (bridge, str(dest))
        bridge, daddr = got
        pkt = T.Packet(family, proto, dport, self.view.uplink, bridge, None, daddr, NEW_DNAT)
        return (f"the forwarded traffic of {key}", bridge or "", (key,), pkt)

    def drops(self) -> None:
        found, overridden = self._drops_of(self._packets())
        self.found += found
        for fwd in self.d.forwards:
            overridden |= self._per_forward(
                "drops", fwd, lambda f=fwd: self._drops_of([self._forward_packet(f)])
            )
        for item in sorted(overridden):
            where, tool = item.split("|")
            self.add(
                "drop-passed",
                NOTE,
                f"the policy of {where} is DROP; netagent's traffic passes it through its "
                "accepts in NETAGENT-FORWARD (first in that chain)",
                who=tool or None,
            )

    def _drops_of(self, packets: list[tuple[str, str, tuple[str, ...], T.Packet]]) -> PerForward:
        found: list[Finding] = []
        seen: set[tuple[str, int]] = set()
        overridden: set[str] = set()
        for what, bridge, keys, pkt in packets:
            outcomes = T.at_hook(self.fw, "forward", pkt)
            for o in outcomes:
                if o.rule is not None and o.rule.ours and o.chain.policy in T.DROPS:
                    overridden.add(
                        o.chain.where + "|" + (tool_of(o.chain.name, self.fw, o.chain) or "")
                    )
            drop = T.dropped(outcomes)
            if drop is None:
                continue
            tool = tool_of(
                drop.where.table if drop.where.framework == "nftables" else drop.where.name,
                self.fw,
                drop.where,
            )
            rule = f" rule `{drop.rule.text}`" if drop.rule is not None else ""
            sure = "" if drop.certain else " (may be: a rule before it was not understood)"
            text = f"{what} is dropped by {who(self.fw, drop)}{rule}{sure}"
            ident = (drop.where.where + (drop.rule.text if drop.rule else ""), id(keys))
            if ident in seen:
                continue
            seen.add(ident)
            found.append(
                Finding(
                    "forward-drop",
                    PROBLEM,
                    text,
                    tool,
                    _fix_drop(drop, bridge, tool),
                    keys,
                    blocks=drop.certain,
                )
            )
        return found, overridden

    def legacy_beside_nft(self) -> None:
        rules = [
            c
            for c in self.fw.chains
            if c.framework == "iptables-legacy"
            for r in c.rules
            if not r.ours
        ]
        policies = [
            c for c in self.fw.chains if c.framework == "iptables-legacy" and c.policy in T.DROPS
        ]
        nft = self.fw.nft_tables - {"inet netagent"}
        if (rules or policies) and nft:
            tables = sorted({f"{c.table} (ipv{c.family})" for c in rules + policies})
            self.add(
                "legacy-beside-nft",
                NOTE,
                f"iptables-legacy holds {len(rules)} rules and {len(policies)} DROP "
                f"policies ({', '.join(tables)}) beside nf_tables rules: both apply, and "
                "`iptables` (the nft flavour) does not show them",
                fix="iptables-legacy-save (to see them); to move them: "
                "iptables-legacy-save | iptables-nft-restore, then flush the legacy tables",
            )

    def br_netfilter(self) -> None:
        if self.view.sysctls.get(BR_NF) == "1" and self.d.bridges:
            self.add(
                "br-netfilter",
                NOTE,
                "br_netfilter is on (net.bridge.bridge-nf-call-iptables=1): frames between "
                "two ports of one bridge pass the FORWARD hook, so a FORWARD drop hits "
                "them too",
                fix="sysctl -w net.bridge.bridge-nf-call-iptables=0 (if nothing else needs it)",
            )

    def competing_dnat(self) -> None:
        rules = [
            (chain, rule)
            for chain in self.fw.chains
            for rule in chain.rules
            if not rule.ours and rule.verdict == "DNAT" and rule.dports
        ]
        if not rules:
            return
        for fwd in self.d.forwards:
            self._per_forward("dnat", fwd, lambda f=fwd: (self._dnat_of(f, rules), set()))

    def _dnat_of(self, fwd: Fwd, rules: list[tuple[Chain, Any]]) -> list[Finding]:
        key, proto, family, ports, _dest, _dport = fwd
        found = []
        for chain, rule in rules:
            if chain.family not in (None, family) or rule.proto not in (None, proto):
                continue
            hit = [
                p
                for p in (ports.start, ports.stop - 1)
                if any(lo <= p <= hi for lo, hi in rule.dports)
            ]
            hit += [lo for lo, _hi in rule.dports if lo in ports]
            if not hit:
                continue
            tool = tool_of(chain.table if chain.framework == "nftables" else chain.name)
            port = min(hit)
            found.append(
                Finding(
                    "dnat-conflict",
                    PROBLEM,
                    f"host port {port}/{proto} of {key} is also DNATed by {chain.where} "
                    f"(`{rule.text}`): which one a packet takes depends on the order of "
                    "the chains",
                    who=tool,
                    fix=_fix_dnat(tool, port, key),
                    keys=(key,),
                    blocks=True,
                )
            )
        return found

    def listeners(self) -> None:
        if not self.view.listeners:
            return
        for fwd in self.d.forwards:
            self._per_forward("listeners", fwd, lambda f=fwd: (self._listeners_of(f), set()))

    def _listeners_of(self, fwd: Fwd) -> list[Finding]:
        key, proto, family, ports, _dest, _dport = fwd
        found = []
        for lst in self.view.listeners:
            if lst.proto != proto or lst.port not in ports or lst.family != family:
                continue
            owner = self.view.owners.get(lst.inode)
            name = f"{owner[1]} (pid {owner[0]})" if owner else "a process"
            addr = f"[{lst.address}]" if family == 6 else lst.address
            found.append(
                Finding(
                    "listener",
                    PROBLEM,
                    f"{name} listens on {addr}:{lst.port}/{proto}, a port {key} forwards: "
                    "its clients reach the forward's destination instead",
                    who=owner[1] if owner else None,
                    fix=f"stop it or move it to another port, or `netagent ctl unforward "
                    f"{lst.port} --proto {proto}`",
                    keys=(key,),
                )
            )
        return found

    def managers(self) -> None:
        names = {c.table for c in self.fw.chains if c.framework == "nftables"}
        firewalld = "firewalld" in self.view.managers or "inet firewalld" in names
        if firewalld and not any(f.who and f.who.startswith("firewalld") for f in self.found):
            self.add(
                "firewalld",
                NOTE,
                "firewalld is active; it lets netagent's traffic through now (no drop of it found)",
            )
        ufw = any(c.name.startswith("ufw") for c in self.fw.chains)
        if ufw and not any(f.who == "ufw" and f.severity == PROBLEM for f in self.found):
            self.add(
                "ufw",
                NOTE,
                "ufw is active; netagent's accepts come before its FORWARD rules and policy",
            )

    def sysctls_of_bridges(self) -> None:
        s = self.view.sysctls
        for name, (key, v4, _v6, _plugs) in sorted(self.d.bridges.items()):
            if not v4:
                continue
            loose = max(
                int(s.get("net/ipv4/conf/all/rp_filter", "0") or 0),
                int(s.get(f"net/ipv4/conf/{name}/rp_filter", "0") or 0),
            )
            if loose == 1:
                self.add(
                    "rp-filter",
                    NOTE,
                    f"strict rp_filter on {name}: a namespace's packet whose source is not "
                    f"routed back through {name} (a second interface, policy routing) is "
                    "dropped",
                    fix=f"sysctl -w net.ipv4.conf.all.rp_filter=2 net.ipv4.conf.{name}.rp_filter=2",
                    keys=(key,),
                )
            local = s.get(f"net/ipv4/conf/{name}/route_localnet")
            if local is not None and local != "1" and self.d.forwards:
                self.add(
                    "route-localnet",
                    PROBLEM,
                    f"route_localnet is off on {name}: the host's own 127.0.0.1:PORT "
                    "connections to forwards into it are not routed",
                    fix=f"sysctl -w net.ipv4.conf.{name}.route_localnet=1 (netagent sets it "
                    "again when it next ensures the bridge)",
                    keys=(key,),
                )

    def port_counts(self) -> None:
        for name, count in sorted(self.d.ports.items()):
            if count >= BRIDGE_PORTS * PORTS_NEAR:
                key = self.d.bridges[name][0] if name in self.d.bridges else f"br/{name}"
                full = count >= BRIDGE_PORTS
                self.add(
                    "bridge-ports",
                    PROBLEM,
                    f"{name} has {count} of the {BRIDGE_PORTS} ports a Linux bridge takes"
                    + ("; no more plugs or attaches fit" if full else ""),
                    fix="plug further namespaces into another bridge",
                    keys=(key,),
                    blocks=full,
                )

    def own_chains(self) -> None:
        for where, why in sorted(self.failed.items()):
            keys = tuple(b[0] for b in self.d.bridges.values())
            self.add(
                "filter-chains",
                PROBLEM,
                f"netagent could not write its accepts in {where}: {why}",
                keys=keys,
            )
        for chain in self.fw.chains:
            if (
                chain.name.startswith("NETAGENT-")
                and chain.rules
                and not any(r.ours for r in chain.rules)
            ):
                self.add(
                    "foreign-netagent-chain",
                    NOTE,
                    f"{chain.where} is not netagent's (no rule carries its mark): left alone",
                )

    def reading(self) -> None:
        for error in self.fw.errors:
            self.add("unread", NOTE, f"could not read part of the host's firewall: {error}")


def _fix_dnat(tool: str | None, port: int, key: str) -> str:
    if tool == "Docker":
        return f"docker ps --filter publish={port} (remove or republish that container)"
    if tool and tool.startswith("Podman"):
        return f"podman ps --filter publish={port} (remove or republish that container)"
    return f"remove that rule, or forward another port (`netagent ctl unforward {port}`)"


def sysctl_paths(bridges: Iterable[str]) -> list[str]:
    paths = [
        "net/ipv4/ip_forward",
        "net/ipv6/conf/all/forwarding",
        BR_NF,
        "net/ipv4/conf/all/rp_filter",
    ]
    for name in bridges:
        paths += [f"net/ipv4/conf/{name}/rp_filter", f"net/ipv4/conf/{name}/route_localnet"]
    return paths
