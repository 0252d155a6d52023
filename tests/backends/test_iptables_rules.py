"""The rules and chains a desired state wants (``backends/iptables/rules.py``), read
through full plans from nothing where the text of the restore file is what matters."""

from __future__ import annotations

from netagent.agent import intents as I
from netagent.backends.firewall import FirewallSpec
from netagent.backends.iptables import rules
from netagent.backends.iptables.rules import Wanted
from tests.backends.iptables_samples import (
    BR1,
    FWD6,
    FWD80,
    FWD_BOUND,
    FWD_RANGE,
    SPEC,
    V_NET_0,
    backend,
    nothing,
    payload,
    payload_lines,
)


def test_port_range_is_one_rule_per_port() -> None:
    """``--to-destination IP:C-D`` would be a pool (any port of C-D), not a mapping."""
    fwd = I.make_forward("8000-8002", "192.168.15.3:9000-9002", "udp")
    batch = backend((4,)).plan(FirewallSpec(forwards=(fwd,)), nothing())
    rules = [line for line in payload_lines(batch, "4") if "-j DNAT" in line]
    assert all(line.startswith("-A NETAGENT-UDP-8000-8063 ") for line in rules)
    assert [line.split("--dport ")[1].split()[0] for line in rules] == ["8000", "8001", "8002"]
    assert [line.rsplit(" ", 1)[1] for line in rules] == [
        "192.168.15.3:9000",
        "192.168.15.3:9001",
        "192.168.15.3:9002",
    ]
    assert all("netagent:fwd/udp/8000-8002" in line for line in rules)


def test_a_range_across_blocks_lands_in_each() -> None:
    """Ports 4094-4097 straddle two first-level blocks (and two last-level ones)."""
    fwd = I.make_forward("4094-4097", "192.168.15.3:5000-5003")
    chains = rules.desired_chains(FirewallSpec(forwards=(fwd,)), 4)
    assert [r[-1] for r in chains["NETAGENT-DNAT"]] == [
        "NETAGENT-TCP-0-4095",
        "NETAGENT-TCP-4096-8191",
    ]
    assert [r[-1] for r in chains["NETAGENT-TCP-0-4095"]] == ["NETAGENT-TCP-4032-4095"]
    assert [r[-1] for r in chains["NETAGENT-TCP-4096-8191"]] == ["NETAGENT-TCP-4096-4159"]
    assert [r[r.index("--dport") + 1] for r in chains["NETAGENT-TCP-4032-4095"]] == [
        "4094",
        "4095",
    ]
    assert [r[-1] for r in chains["NETAGENT-TCP-4096-4159"]] == [
        "192.168.15.3:5002",
        "192.168.15.3:5003",
    ]
    # the last block ends at 65535
    top = I.make_forward("65535", "192.168.15.3:1")
    assert "NETAGENT-TCP-65472-65535" in rules.desired_chains(FirewallSpec(forwards=(top,)), 4)


def test_a_range_that_keeps_its_ports_is_one_rule_per_block() -> None:
    """``60-192`` to ``IP:60-192``: a DNAT to the address alone (the packet keeps its
    port), one ``--dport A:B`` rule per last-level block, written as iptables-save
    prints them (``--dport 60:63``, a lone port bare, an IPv6 address without
    brackets)."""
    fwd = I.make_forward("60-192", "192.168.15.3:60-192")
    chains = rules.desired_chains(FirewallSpec(forwards=(fwd,)), 4)
    dnat = {c: r for c, r in chains.items() if c.startswith("NETAGENT-TCP-") and "-" in c[13:]}
    got = {c: [(x[x.index("--dport") + 1], x[-1]) for x in r] for c, r in dnat.items()}
    assert got["NETAGENT-TCP-0-63"] == [("60:63", "192.168.15.3")]
    assert got["NETAGENT-TCP-64-127"] == [("64:127", "192.168.15.3")]
    assert got["NETAGENT-TCP-128-191"] == [("128:191", "192.168.15.3")]
    assert got["NETAGENT-TCP-192-255"] == [("192", "192.168.15.3")]
    big = I.make_forward("1-32767", "192.168.15.2:1-32767")
    assert len(rules.dnat_rules(big)) == 512
    assert rules.forwards_below(chains, ["NETAGENT-TCP-128-191"]) == {fwd.key}
    six = I.make_forward("100-110", "[fd00:15::2]:100-110")
    assert rules.dnat_rules(six)[0][-3:] == ("DNAT", "--to-destination", "fd00:15::2")


def test_host_ip_and_ipv6_syntax() -> None:
    bound6 = I.make_forward("82", "[fd00:15::3]:82", host_ip="fd00::1")
    spec = FirewallSpec(forwards=(FWD_BOUND, FWD6, bound6))
    batch = backend().plan(spec, nothing())
    v4 = "\n".join(payload_lines(batch, "4"))
    v6 = "\n".join(payload_lines(batch, "6"))
    assert "-A NETAGENT-TCP-64-127 -d 10.0.0.1/32 -p tcp -m tcp --dport 81" in v4
    assert "--to-destination 10.0.0.9:81" in v4
    assert "--to-destination [fd00:15::2]:8080" in v6
    assert "-A NETAGENT-TCP-64-127 -d fd00::1/128 -p tcp -m tcp --dport 82" in v6
    assert "addrtype --dst-type" not in v4 + v6  # only the entry chains' "! --dst-type"
    assert "fd00" not in v4
    assert "10.0.0" not in v6
    assert "add DNAT [fd00::1]:82/tcp -> [fd00:15::3]:82" in batch.steps
    assert "add DNAT 10.0.0.1:81/tcp -> 10.0.0.9:81" in batch.steps


def test_bridge_rules_quote_comments_with_spaces() -> None:
    batch = backend().plan(FirewallSpec(bridges=(V_NET_0,)), nothing())
    v4 = payload_lines(batch, "4")
    assert (
        "-A NETAGENT-POSTROUTING -s 192.168.15.0/24 -d 192.168.15.0/24 -m conntrack "
        '--ctstate DNAT -m comment --comment "netagent:hairpin br/v-net-0 ipv4" -j MASQUERADE'
    ) in v4
    assert (
        "-A NETAGENT-POSTROUTING -s 192.168.15.0/24 ! -o v-net-0 -m comment "
        '--comment "netagent:masquerade br/v-net-0 ipv4" -j MASQUERADE'
    ) in v4
    v6 = payload_lines(batch, "6")
    assert any('"netagent:masquerade br/v-net-0 ipv6"' in line for line in v6)
    assert any("-s fd00:15::/64 -d fd00:15::/64" in line for line in v6)


def test_no_masquerade_without_the_flag() -> None:
    batch = backend((4,)).plan(FirewallSpec(bridges=(BR1,)), nothing())
    text = payload(batch)["4"]
    assert "hairpin br/br1 ipv4" in text
    assert "masquerade br/br1" not in text


def test_rule_order_does_not_depend_on_intent_order() -> None:
    forwards = (FWD_RANGE, FWD6, FWD80, FWD_BOUND)
    a = backend().plan(FirewallSpec(forwards=forwards, bridges=(V_NET_0, BR1)), nothing())
    b = backend().plan(
        FirewallSpec(forwards=tuple(reversed(forwards)), bridges=(BR1, V_NET_0)), nothing()
    )
    assert payload(a) == payload(b)


def test_forwards_below_finds_the_forwards_in_a_block_at_either_level() -> None:
    v4, v6 = rules.desired_chains(SPEC, 4), rules.desired_chains(SPEC, 6)
    # 80/tcp and 81/tcp (bound) live in 64-127; the IPv6 80/tcp too, in its own family
    assert rules.forwards_below(v4, ["NETAGENT-TCP-64-127"]) == {FWD80.key, FWD_BOUND.key}
    assert rules.forwards_below(v6, ["NETAGENT-TCP-64-127"]) == {FWD6.key}
    assert rules.forwards_below(v4, ["NETAGENT-TCP-0-4095"]) == {FWD80.key, FWD_BOUND.key}
    assert rules.forwards_below(v4, ["NETAGENT-UDP-8000-8063"]) == {FWD_RANGE.key}
    assert rules.forwards_below(v4, ["NETAGENT-UDP-8000-8063", "NETAGENT-UDP-4096-8191"]) == {
        FWD_RANGE.key
    }
    # a range across two blocks is in each
    wide = I.make_forward("4094-4097", "192.168.15.3:5000-5003")
    chains = rules.desired_chains(FirewallSpec(forwards=(wide,)), 4)
    assert rules.forwards_below(chains, ["NETAGENT-TCP-4096-4159"]) == {wide.key}
    assert rules.forwards_below(chains, ["NETAGENT-TCP-4032-4095"]) == {wide.key}
    # the postrouting chain holds no forward; a chain not wanted holds nothing
    assert rules.forwards_below(v4, ["NETAGENT-POSTROUTING", "NETAGENT-TCP-128-191"]) == set()


def test_forwards_below_the_root_is_every_forward() -> None:
    many = tuple(I.make_forward(str(1000 * i + 1), "192.168.15.2:80") for i in range(1, 60))
    chains = rules.desired_chains(FirewallSpec(forwards=(*many, FWD_BOUND)), 4)
    assert rules.forwards_below(chains, [rules.CHAIN_DNAT]) == {f.key for f in (*many, FWD_BOUND)}


def test_wanted_serves_only_its_spec_and_families() -> None:
    wanted = Wanted.of(SPEC, (4, 6))
    assert wanted.chains[4] == rules.desired_chains(SPEC, 4)
    assert wanted.serves(SPEC, (4, 6))
    # the same intents in a new tuple (the reconciler builds one per pass)
    assert wanted.serves(FirewallSpec(forwards=tuple(SPEC.forwards), bridges=SPEC.bridges), (4,))
    assert not wanted.serves(FirewallSpec(forwards=SPEC.forwards[1:], bridges=SPEC.bridges), (4,))
    assert not Wanted.of(SPEC, (4,)).serves(SPEC, (4, 6))


def test_is_update_of_goes_by_identity() -> None:
    new = I.make_forward("443", "192.168.15.2:443")
    grown = FirewallSpec(forwards=(*SPEC.forwards, new), bridges=SPEC.bridges)
    assert rules.is_update_of(SPEC, grown, [new], [])
    assert rules.is_update_of(grown, SPEC, [], [new])
    assert not rules.is_update_of(SPEC, grown, [], [])
    # an equal but different object was never in the old state
    twin = I.make_forward("443", "192.168.15.2:443")
    assert not rules.is_update_of(grown, SPEC, [], [twin])
    assert not rules.is_update_of(SPEC, FirewallSpec(forwards=grown.forwards), [new], [])
