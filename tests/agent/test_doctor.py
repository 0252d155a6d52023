"""The doctor's checks over snapshots of real hosts, without root.

``samples/docker.iptables-save`` and ``samples/netavark.iptables-save`` are what
``iptables-save`` printed (iptables 1.8.9, nf_tables flavour) in a sandbox with Docker
20.10 publishing 8083, and Podman 4.3's netavark publishing 8081. The nft table below is
written the way ``nft -j list table`` prints one (nft 1.0.6).
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

from netagent.agent import doctor, findings
from netagent.agent import fwtrace as T
from netagent.agent.hostview import HostView, Listener
from netagent.backends import hostfw

SAMPLES = Path(__file__).parent / "samples"
DOCKER = (SAMPLES / "docker.iptables-save").read_text()
NETAVARK = (SAMPLES / "netavark.iptables-save").read_text()
NET = ipaddress.ip_network("192.168.15.0/24")
OURS = (
    "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD DROP [0:0]\n:OUTPUT ACCEPT [0:0]\n"
    ":NETAGENT-FORWARD - [0:0]\n"
    '-A FORWARD -m comment --comment "netagent:jump" -j NETAGENT-FORWARD\n'
    '-A NETAGENT-FORWARD -i v-net-0 -m comment --comment "netagent:accept br/v-net-0 out" '
    "-j ACCEPT\n"
    "-A NETAGENT-FORWARD -o v-net-0 -m conntrack --ctstate RELATED,ESTABLISHED -m comment "
    '--comment "netagent:accept br/v-net-0 replies" -j ACCEPT\n'
    "-A NETAGENT-FORWARD -o v-net-0 -m conntrack --ctstate DNAT -m comment "
    '--comment "netagent:accept br/v-net-0 forwarded" -j ACCEPT\n'
    "COMMIT\n"
)


def desired(*forwards: tuple[str, int, str, int]) -> findings.Desired:
    d = findings.Desired()
    d.bridges["v-net-0"] = ("br/v-net-0", [NET], [], ["plug/red/v-net-0", "plug/blue/v-net-0"])
    for proto, port, dest, dport in forwards:
        key = f"fwd/{proto}/{port}"
        d.forwards.append((key, proto, 4, range(port, port + 1), ipaddress.ip_address(dest), dport))
    return d


def view(*saves: str, nft: list[dict[str, Any]] | None = None, **kw: Any) -> HostView:
    fw = hostfw.HostFirewall()
    for text in saves:
        fw.chains += hostfw.parse_xt_save(text, "iptables-nft", 4)
    if nft is not None:
        fw.chains += hostfw.parse_nft_table({"nftables": nft})
    fw.nft_tables = {"ip filter", "ip nat", "inet netagent"}
    v = HostView(fw, **kw)
    v.uplink = "eth0"
    v.sysctls.update({"net/ipv4/ip_forward": "1", doctor.BR_NF: "1"})
    return v


def run(v: HostView, d: findings.Desired) -> list[findings.Finding]:
    return doctor.Doctor(v, d).run()


def codes(found: list[findings.Finding], severity: str = findings.PROBLEM) -> list[str]:
    return sorted(f.code for f in found if f.severity == severity)


def test_dockers_drop_policy_blocks_the_bridge_until_netagents_accepts_are_first() -> None:
    d = desired(("tcp", 80, "192.168.15.2", 80))
    found = run(view(DOCKER), d)
    drops = [f for f in found if f.code == "forward-drop"]
    assert drops and all(f.blocks for f in drops)
    assert {k for f in drops for k in f.keys} >= {"br/v-net-0", "plug/red/v-net-0", "fwd/tcp/80"}
    assert all("policy of chain FORWARD" in f.what for f in drops)
    assert all(f.who and f.who.startswith("Docker") for f in drops)
    # with netagent's chains first in FORWARD (what xtfilter writes), it all passes
    merged = DOCKER.replace("*filter\n", "*filter\n:NETAGENT-FORWARD - [0:0]\n", 1)
    merged = merged.replace(
        "-A FORWARD -j DOCKER-USER\n",
        "".join(x + "\n" for x in OURS.splitlines() if x.startswith("-A "))
        + "-A FORWARD -j DOCKER-USER\n",
    )
    found = run(view(merged), d)
    assert codes(found) == []
    passed = [f for f in found if f.code == "drop-passed"]
    assert passed and passed[0].who and passed[0].who.startswith("Docker")


def test_dockers_published_port_and_its_proxy_are_named() -> None:
    d = desired(("tcp", 8083, "192.168.15.2", 80))
    v = view(DOCKER, OURS)
    v.listeners = [Listener("tcp", 4, "0.0.0.0", 8083, 4242)]
    v.owners = {4242: (1234, "docker-proxy")}
    found = run(v, d)
    dnat = next(f for f in found if f.code == "dnat-conflict")
    assert dnat.who == "Docker" and dnat.blocks and dnat.keys == ("fwd/tcp/8083",)
    assert "chain DOCKER of the nat table" in dnat.what
    assert dnat.fix == "docker ps --filter publish=8083 (remove or republish that container)"
    listener = next(f for f in found if f.code == "listener")
    assert "docker-proxy (pid 1234) listens on 0.0.0.0:8083/tcp" in listener.what
    assert not listener.blocks  # the forward works; it is the listener that is shadowed


def test_netavarks_dnat_of_a_forwarded_port_is_podmans() -> None:
    found = run(view(NETAVARK, OURS), desired(("tcp", 8081, "192.168.15.2", 80)))
    dnat = next(f for f in found if f.code == "dnat-conflict")
    assert dnat.who == "Podman (netavark)" and "NETAVARK-DN-" in dnat.what
    # another port: no conflict
    other = run(view(NETAVARK, OURS), desired(("tcp", 8082, "192.168.15.2", 80)))
    assert "dnat-conflict" not in codes(other)


FIREWALLD_LIKE = [
    {"table": {"family": "inet", "name": "firewalld", "handle": 1}},
    {
        "chain": {
            "family": "inet",
            "table": "firewalld",
            "name": "filter_FORWARD",
            "handle": 1,
            "type": "filter",
            "hook": "forward",
            "prio": 10,
            "policy": "accept",
        }
    },
    {
        "rule": {
            "family": "inet",
            "table": "firewalld",
            "chain": "filter_FORWARD",
            "handle": 2,
            "expr": [
                {
                    "match": {
                        "op": "in",
                        "left": {"ct": {"key": "state"}},
                        "right": ["established", "related"],
                    }
                },
                {"accept": None},
            ],
        }
    },
    {
        "rule": {
            "family": "inet",
            "table": "firewalld",
            "chain": "filter_FORWARD",
            "handle": 3,
            "expr": [{"reject": {"type": "icmpx", "expr": "admin-prohibited"}}],
        }
    },
]


def test_a_foreign_nft_drop_cannot_be_passed_and_names_the_fix() -> None:
    """A reject in another nft table's forward chain: netagent's accepts elsewhere do
    not help (every base chain runs); the fix is firewalld's trusted zone."""
    found = run(view(OURS, nft=FIREWALLD_LIKE), desired(("tcp", 80, "192.168.15.2", 80)))
    drop = next(f for f in found if f.code == "forward-drop" and "fwd/tcp/80" in f.keys)
    assert "chain filter_FORWARD of nft table inet firewalld" in drop.what
    assert drop.who == "firewalld" and drop.blocks
    assert drop.fix is not None and drop.fix.startswith(
        "firewall-cmd --permanent --zone=trusted --add-interface=v-net-0"
    )


def test_the_host_checks_name_their_sysctls() -> None:
    v = view(OURS)
    v.sysctls.update(
        {
            "net/ipv4/ip_forward": "0",
            "net/ipv4/conf/all/rp_filter": "1",
            "net/ipv4/conf/v-net-0/route_localnet": "0",
        }
    )
    d = desired(("tcp", 80, "192.168.15.2", 80))
    d.ports["v-net-0"] = 1000
    found = run(v, d)
    assert codes(found) == ["bridge-ports", "ip-forwarding-off", "route-localnet"]
    assert "rp-filter" in codes(found, findings.NOTE) and "br-netfilter" in codes(
        found, findings.NOTE
    )
    off = next(f for f in found if f.code == "ip-forwarding-off")
    assert off.fix and off.fix.startswith("sysctl -w net.ipv4.ip_forward=1") and off.blocks


def test_legacy_rules_beside_nft_and_a_users_netagent_chain_are_notes() -> None:
    v = view(OURS)
    legacy = "*filter\n:FORWARD ACCEPT [0:0]\n-A FORWARD -s 10.9.9.0/24 -j ACCEPT\nCOMMIT\n"
    v.firewall.chains += hostfw.parse_xt_save(legacy, "iptables-legacy", 4)
    mine = "*nat\n:NETAGENT-MINE - [0:0]\n-A NETAGENT-MINE -p tcp --dport 22 -j RETURN\nCOMMIT\n"
    v.firewall.chains += hostfw.parse_xt_save(mine, "iptables-nft", 4)
    found = run(v, desired())
    assert {"legacy-beside-nft", "foreign-netagent-chain"} <= set(codes(found, findings.NOTE))
    assert codes(found) == []


def test_the_walk_follows_jumps_returns_and_policies() -> None:
    fw = hostfw.HostFirewall(chains=hostfw.parse_xt_save(DOCKER, "iptables-nft", 4))
    to_docker = T.Packet(4, "tcp", 80, "eth0", "docker0", None, "10.80.0.2", frozenset({"NEW"}))
    [out] = T.at_hook(fw, "forward", to_docker)
    assert out.verdict == "ACCEPT" and out.where.name == "DOCKER" and out.certain
    elsewhere = T.Packet(4, "tcp", 80, "eth0", "v-net-0", None, "192.168.15.2")
    [out] = T.at_hook(fw, "forward", elsewhere)
    assert out.verdict == "DROP" and out.rule is None and out.certain
    assert out.path[-1] == "FORWARD: end of chain, policy DROP"
    # an interface left open: Docker's interface-bound accepts only maybe match, so the
    # policy's drop is not certain
    unknown = T.Packet(4, "tcp", 80, None, None, None, "192.168.15.2")
    [out] = T.at_hook(fw, "forward", unknown)
    assert out.verdict == "DROP" and not out.certain


def _lines(found: list[findings.Finding]) -> list[str]:
    return sorted(f.line() for f in found)


def test_the_forward_memo_gives_what_a_full_check_gives_and_checks_only_whats_new(
    monkeypatch: Any,
) -> None:
    v = view(DOCKER)
    v.listeners = [Listener("tcp", 4, "0.0.0.0", 8083, 4242)]
    d = desired(("tcp", 80, "192.168.15.2", 80), ("tcp", 8083, "192.168.15.2", 80))
    memo = findings.ForwardMemo()
    assert _lines(doctor.Doctor(v, d, memo=memo).run()) == _lines(run(v, d))
    walked: list[int | None] = []
    at_hook = T.at_hook

    def counting(fw: Any, hook: str, pkt: T.Packet) -> Any:
        walked.append(pkt.dport)
        return at_hook(fw, hook, pkt)

    monkeypatch.setattr(T, "at_hook", counting)
    # one forward more: only its packet is walked (and the bridge's own, always)
    d.forwards.append(
        ("fwd/udp/53", "udp", 4, range(53, 54), ipaddress.ip_address("192.168.15.3"), 53)
    )
    with_memo = doctor.Doctor(v, d, memo=memo).run()
    assert [p for p in walked if p is not None] == [53]
    walked.clear()
    assert _lines(with_memo) == _lines(run(v, d))
    assert sorted(p for p in walked if p is not None) == [53, 80, 80]  # no memo: all three
    # a new reading of the host: everything is checked again
    walked.clear()
    doctor.Doctor(view(DOCKER), d, memo=memo).run()
    assert sorted(p for p in walked if p is not None) == [53, 80, 80]
    # a forward retargeted under the same key is checked again, not taken from the memo
    walked.clear()
    d.forwards[0] = (
        "fwd/tcp/80",
        "tcp",
        4,
        range(80, 81),
        ipaddress.ip_address("192.168.15.9"),
        81,
    )
    doctor.Doctor(v, d, memo=memo).run()
    assert 81 in walked


def test_walks_are_kept_by_the_fields_some_rule_reads() -> None:
    # no rule at the forward hook reads a destination port: packets that differ only in
    # it are one walk, and share its outcome
    fw = hostfw.HostFirewall(chains=hostfw.parse_xt_save(OURS, "iptables-nft", 4))
    to = [
        T.Packet(4, "tcp", port, "eth0", "v-net-0", None, "192.168.15.2", doctor.NEW_DNAT)
        for port in (80, 81)
    ]
    assert T.at_hook(fw, "forward", to[0]) is T.at_hook(fw, "forward", to[1])
    # a rule that reads the port: the walks differ, and each is right
    drop80 = OURS.replace(
        "-A FORWARD -m comment",
        "-A FORWARD -p tcp -m tcp --dport 80 -j DROP\n-A FORWARD -m comment",
    )
    fw = hostfw.HostFirewall(chains=hostfw.parse_xt_save(drop80, "iptables-nft", 4))
    assert T.dropped(T.at_hook(fw, "forward", to[0])) is not None
    assert T.dropped(T.at_hook(fw, "forward", to[1])) is None
    # the same snapshot read further (chains appended): walked again, not from before
    fw = hostfw.HostFirewall(chains=hostfw.parse_xt_save(OURS, "iptables-nft", 4))
    assert T.dropped(T.at_hook(fw, "forward", to[0])) is None
    fw.chains += hostfw.parse_xt_save(
        "*filter\n:FORWARD DROP [0:0]\n-A FORWARD -p tcp --dport 80 -j DROP\nCOMMIT\n",
        "iptables-legacy",
        4,
    )
    assert T.dropped(T.at_hook(fw, "forward", to[0])) is not None
    assert T.dropped(T.at_hook(fw, "forward", to[1])) is not None  # the legacy policy


def test_a_firewalls_lookups_find_what_a_search_would() -> None:
    fw = hostfw.HostFirewall(chains=hostfw.parse_xt_save(DOCKER, "iptables-nft", 4))
    for chain in fw.chains:
        assert fw.find(chain.framework, chain.family, chain.table, chain.name) is chain
        assert fw.table_of(chain)[chain.name] is chain
    assert fw.find("iptables-nft", 4, "filter", "NO-SUCH") is None
    for hook in ("prerouting", "forward", "postrouting"):
        want = sorted((c for c in fw.chains if c.hook == hook), key=lambda c: c.priority)
        assert want and fw.base(hook) == want
    # a list of its own: a caller sorting or extending it changes nothing kept
    fw.base("forward").clear()
    assert fw.base("forward")


def test_our_own_dnats_are_kept_unparsed_and_anyone_elses_are_parsed() -> None:
    text = (
        "*nat\n:PREROUTING ACCEPT [0:0]\n:NETAGENT-DNAT - [0:0]\n:NETAGENT-MINE - [0:0]\n"
        '-A NETAGENT-DNAT -p tcp -m tcp --dport 8080 -m comment --comment "netagent:fwd/tcp/8080"'
        " -j DNAT --to-destination 192.168.15.2:80\n"
        "-A NETAGENT-MINE -p tcp -m tcp --dport 8081 -j DNAT --to-destination 10.0.0.2:80\n"
        "COMMIT\n"
    )
    chains = {c.name: c for c in hostfw.parse_xt_save(text, "iptables-nft", 4)}
    [own] = chains["NETAGENT-DNAT"].rules
    assert own.ours and own.text.startswith("-p tcp -m tcp --dport 8080")
    [theirs] = chains["NETAGENT-MINE"].rules
    assert not theirs.ours and theirs.verdict == "DNAT" and theirs.dports == [(8081, 8081)]
    # so a user's DNAT of a forwarded port in a chain named like ours is still found
    found = run(view(OURS, text), desired(("tcp", 8081, "192.168.15.2", 80)))
    assert "dnat-conflict" in codes(found)
