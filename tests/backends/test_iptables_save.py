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


def test_a_netagent_prefix_without_our_mark_is_someone_elses() -> None:
    """Issue 9, item 5: a user's ``NETAGENT-MINE`` with a rule of their own, and a
    ``NETAGENT-FOO`` with a jump of theirs into it, are not ours; a foreign jump into one
    of ours is noted, so that chain is emptied, never deleted."""
    text = (
        "*nat\n:PREROUTING ACCEPT [0:0]\n:NETAGENT-MINE - [0:0]\n:NETAGENT-FOO - [0:0]\n"
        ":NETAGENT-DNAT - [0:0]\n:NETAGENT-TCP-0-4095 - [0:0]\n:NETAGENT-OLD - [0:0]\n"
        "-A PREROUTING -j NETAGENT-FOO\n"
        "-A PREROUTING -p udp -j NETAGENT-TCP-0-4095\n"
        "-A NETAGENT-MINE -p tcp -m tcp --dport 22 -j ACCEPT\n"
        "-A NETAGENT-FOO -j NETAGENT-MINE\n"
        '-A NETAGENT-DNAT -m comment --comment "netagent:ports/tcp/0-4095" -j NETAGENT-TCP-0-4095\n'
        "COMMIT\n"
    )
    obs = save.parse_save(text)
    # ours: a chain with our marked rule, and an empty one named as we name chains
    assert set(obs.chains) == {"NETAGENT-DNAT", "NETAGENT-TCP-0-4095"}
    # an empty chain that we would not have named, with no jump of ours into it, and
    # chains whose rules carry no mark of ours
    assert obs.foreign == {"NETAGENT-MINE": 1, "NETAGENT-FOO": 1, "NETAGENT-OLD": 0}
    assert obs.referenced == {
        "NETAGENT-TCP-0-4095": ["-A PREROUTING -p udp -j NETAGENT-TCP-0-4095"]
    }
    assert not obs.jumps


def test_filter_table_is_read_when_asked() -> None:
    text = (
        "*filter\n:FORWARD DROP [0:0]\n:NETAGENT-FORWARD - [0:0]\n"
        '-A FORWARD -m comment --comment "netagent:jump" -j NETAGENT-FORWARD\n'
        '-A NETAGENT-FORWARD -i v-net-0 -m comment --comment "netagent:x" -j ACCEPT\n'
        "COMMIT\n*nat\n:NETAGENT-DNAT - [0:0]\nCOMMIT\n"
    )
    obs = save.parse_save(text, table="filter")
    assert set(obs.chains) == {"NETAGENT-FORWARD"}
    assert dict(obs.jumps) == {("FORWARD", "NETAGENT-FORWARD"): 1}
