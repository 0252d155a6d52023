"""Reading ``iptables-save`` (``backends/iptables/save.py``): ours only."""

from __future__ import annotations

from netagent.backends.iptables import save
from tests.backends.iptables_samples import EMPTY_SAVE, SAVE4


def test_parse_keeps_only_our_chains_and_exact_jumps() -> None:
    obs = save.parse_save(SAVE4)
    assert set(obs.chains) == {
        *("NETAGENT-PREROUTING", "NETAGENT-OUTPUT", "NETAGENT-POSTROUTING", "NETAGENT-DNAT"),
        *("NETAGENT-TCP-0-4095", "NETAGENT-TCP-64-127"),
        *("NETAGENT-UDP-4096-8191", "NETAGENT-UDP-8000-8063"),
    }
    assert len(obs.chains["NETAGENT-PREROUTING"]) == 2
    assert len(obs.chains["NETAGENT-TCP-64-127"]) == 2
    # the user's jump borrows our comment but goes to their chain; the filter table's
    # look-alike is not in the nat table: neither is ours
    assert dict(obs.jumps) == {
        ("PREROUTING", "NETAGENT-PREROUTING"): 1,
        ("OUTPUT", "NETAGENT-OUTPUT"): 1,
        ("POSTROUTING", "NETAGENT-POSTROUTING"): 1,
    }
    assert obs.present
    assert not save.parse_save(EMPTY_SAVE).present


def test_split_rule_handles_quotes_like_iptables_restore() -> None:
    assert save.split_rule('-A X -m comment --comment "say \\"hi\\"" -j ACCEPT') == [
        "-A", "X", "-m", "comment", "--comment", 'say "hi"', "-j", "ACCEPT",
    ]  # fmt: skip
    assert save.split_rule('--comment "a b"  -j  Y') == ["--comment", "a b", "-j", "Y"]


def test_other_tables_and_foreign_lines_are_dropped() -> None:
    """Our chain names in the filter table, a rule before any table, and a malformed
    ``-A`` line are none of ours."""
    text = (
        "-A NETAGENT-DNAT -j RETURN\n"
        "*filter\n:NETAGENT-DNAT - [0:0]\n-A NETAGENT-DNAT -j ACCEPT\nCOMMIT\n"
        "*nat\n:NETAGENT-DNAT - [0:0]\n-A\nCOMMIT\n"
    )
    obs = save.parse_save(text)
    assert obs.chains == {"NETAGENT-DNAT": []}
    assert not obs.jumps
