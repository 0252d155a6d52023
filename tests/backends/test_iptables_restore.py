"""Writing ``iptables-restore`` input (``backends/iptables/restore.py``)."""

from __future__ import annotations

import pytest

from netagent.backends.firewall import FirewallSpec
from netagent.backends.iptables import restore
from netagent.backends.iptables.rules import jump_rule


@pytest.mark.parametrize("bad", ['a"b', "a\\b", "a\nCOMMIT", "a\r", ""])
def test_quote_refuses_what_could_break_out_of_a_token(bad: str) -> None:
    with pytest.raises(ValueError, match="refusing"):
        restore.quote(bad)


def test_quote_leaves_plain_tokens_alone() -> None:
    assert restore.quote("netagent:fwd/tcp/80/fd00::1") == "netagent:fwd/tcp/80/fd00::1"
    assert restore.quote("[fd00::2]:80") == "[fd00::2]:80"
    assert restore.quote("netagent:hairpin br/x ipv4") == '"netagent:hairpin br/x ipv4"'


def test_render_quotes_only_what_needs_it() -> None:
    assert restore.render(jump_rule("NETAGENT-OUTPUT")) == (
        "-m comment --comment netagent:jump -j NETAGENT-OUTPUT"
    )
    assert restore.render(("--comment", "a b", "-j", "X")) == '--comment "a b" -j X'
    assert restore.rule_line("-I", "OUTPUT", ("-j", "X"), position=1) == "-I OUTPUT 1 -j X"
    assert restore.restore_text(["-A X -j Y"]) == "*nat\n-A X -j Y\nCOMMIT\n"


def test_payload_files_are_ipv4_first() -> None:
    payload = restore.RestorePayload(FirewallSpec())
    payload["6"] = "six"
    payload["4"] = "four"
    assert payload.files() == [(4, "four"), (6, "six")]
