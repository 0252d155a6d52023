"""``explain``'s words for the firewall entry a port meets, per backend: the element or
rule netagent really wrote (``backends/nftables.py``, ``backends/iptables/rules.py``)."""

from __future__ import annotations

from netagent.agent import intents as I
from netagent.agent.explain import _element
from netagent.backends.iptables import rules
from netagent.backends.nftables import forward_elems


def test_a_port_of_a_moving_range_meets_its_own_entry() -> None:
    fwd = I.make_forward("8000-8009", "192.168.15.3:9000-9009")
    nft = _element(fwd, 8004, "nftables")
    assert "map @dnat_tcp4`" in nft and "element 8004 : 192.168.15.3 . 9004" in nft
    ipt = _element(fwd, 8004, "iptables")
    assert "NETAGENT-TCP-4096-8191 -> NETAGENT-TCP-8000-8063" in ipt
    assert "`--dport 8004 -j DNAT --to-destination 192.168.15.3:9004`" in ipt


def test_a_port_of_a_range_that_keeps_its_ports_meets_the_interval_or_its_block() -> None:
    fwd = I.make_forward("60-200", "192.168.15.3:60-200")
    nft = _element(fwd, 100, "nftables")
    name, key, value = forward_elems(fwd)[0]
    assert f"map @{name}`" in nft and f"element {key} : {value}" in nft
    assert "element 60-200 : 192.168.15.3" in nft
    ipt = _element(fwd, 100, "iptables")
    assert "`--dport 64:127 -j DNAT --to-destination 192.168.15.3`" in ipt
    # the words name a rule that is there, at both ends of the range
    written = {r[r.index("--dport") + 1] for r in rules.dnat_rules(fwd)}
    for port, ports in ((60, "60:63"), (200, "192:200"), (128, "128:191")):
        assert f"--dport {ports} -j" in _element(fwd, port, "iptables")
        assert ports in written
