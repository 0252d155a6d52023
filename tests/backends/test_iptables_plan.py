"""The planners (``backends/iptables/plan.py``): full plans from nothing and against
drift, updates, and what ``Batch.rebuild`` / ``Batch.touched`` say. Pure functions: no
process, no kernel, no backend state."""

from __future__ import annotations

import copy

import pytest

from netagent.agent import intents as I
from netagent.agent.errors import BackendFailed, BackendUnavailable
from netagent.backends.firewall import Batch, FirewallSpec
from netagent.backends.iptables import IptablesBackend
from netagent.backends.iptables.restore import RestorePayload
from netagent.backends.iptables.rules import Wanted
from netagent.backends.iptables.save import FamilyObserved, Observed, parse_save
from tests.backends.iptables_samples import (
    BR1,
    DNAT80,
    ENTRY,
    FWD6,
    FWD80,
    FWD_BOUND,
    FWD_RANGE,
    JUMPS,
    LOCAL_ONLY,
    SAVE4,
    SAVE6,
    SPEC,
    TO_FORWARDS,
    V_NET_0,
    assert_only_ours,
    backend,
    dispatch,
    in_place,
    no_generation,
    nothing,
    payload,
    payload_lines,
    without,
)

# ---- planning from nothing -------------------------------------------------------------


def test_plan_from_nothing_creates_chains_rules_and_jumps() -> None:
    spec = FirewallSpec(forwards=(FWD80,))
    batch = backend().plan(spec, nothing())
    assert batch.rebuild
    assert set(payload(batch)) == {"4", "6"}
    v4 = payload_lines(batch, "4")
    assert v4[:6] == [
        ":NETAGENT-PREROUTING - [0:0]",
        ":NETAGENT-OUTPUT - [0:0]",
        ":NETAGENT-POSTROUTING - [0:0]",
        ":NETAGENT-DNAT - [0:0]",
        ":NETAGENT-TCP-0-4095 - [0:0]",
        ":NETAGENT-TCP-64-127 - [0:0]",
    ]
    # traffic not addressed to the host leaves at once; the rest goes down the tree
    assert [line for line in v4 if line.startswith(("-A NETAGENT-PRE", "-A NETAGENT-OUT"))] == (
        ENTRY
    )
    assert f"-A NETAGENT-DNAT {dispatch('tcp', 0, 4095)}" in v4
    assert f"-A NETAGENT-TCP-0-4095 {dispatch('tcp', 64, 127)}" in v4
    # one DNAT rule, shared by PREROUTING and OUTPUT, with no address-type match of its own
    assert [line for line in v4 if "-j DNAT" in line] == [f"-A NETAGENT-TCP-64-127 {DNAT80}"]
    assert (
        "-A NETAGENT-POSTROUTING -s 127.0.0.0/8 -m conntrack --ctstate DNAT "
        "-m comment --comment netagent:localhost -j MASQUERADE"
    ) in v4
    # the jumps come last, after the chains they point to exist
    assert v4[-3:] == [f"-I {chain} 1 {rule}" for chain, rule in JUMPS.items()]
    # IPv6: the chains and jumps exist (so a later IPv6 forward is a plain update), but no
    # localhost rule: the kernel never routes ::1 off the host anyway
    v6 = payload_lines(batch, "6")
    assert v6 == [
        ":NETAGENT-PREROUTING - [0:0]",
        ":NETAGENT-OUTPUT - [0:0]",
        ":NETAGENT-POSTROUTING - [0:0]",
        ":NETAGENT-DNAT - [0:0]",
        *ENTRY,
        *(f"-I {chain} 1 {rule}" for chain, rule in JUMPS.items()),
    ]
    assert batch.steps[:6] == [
        "create chain NETAGENT-PREROUTING (ipv4, 2 rules)",
        "create chain NETAGENT-OUTPUT (ipv4, 2 rules)",
        "create chain NETAGENT-POSTROUTING (ipv4, 1 rule)",
        "create chain NETAGENT-DNAT (ipv4, 1 rule)",
        "create chain NETAGENT-TCP-0-4095 (ipv4, 1 rule)",
        "create chain NETAGENT-TCP-64-127 (ipv4, 1 rule)",
    ]
    assert "add jump PREROUTING -> NETAGENT-PREROUTING (ipv4)" in batch.steps
    assert "add DNAT 80/tcp -> 192.168.15.2:80" in batch.steps
    assert batch.steps.count("add DNAT 80/tcp -> 192.168.15.2:80") == 1
    assert batch.steps.count("add local-only") == 2  # once per family
    assert_only_ours(batch)


def test_an_empty_spec_still_installs_the_skeleton() -> None:
    """Like the nftables table, the chains and jumps exist even with nothing to forward:
    later forwards are then plain chain rewrites (``plan_update``)."""
    batch = backend().plan(FirewallSpec(), nothing())
    assert not batch.empty
    assert "-I PREROUTING 1 " + JUMPS["PREROUTING"] in payload_lines(batch, "4")


def test_a_missing_family_in_the_observation_is_planned_from_nothing() -> None:
    batch = backend().plan(SPEC, Observed())
    assert set(payload(batch)) == {"4", "6"}
    assert batch.rebuild


def test_real_save_output_means_nothing_to_do() -> None:
    """The rules are written in iptables-save's own form: applied, they read back equal."""
    batch = backend().plan(SPEC, in_place())
    assert batch.steps == []
    assert batch.empty
    # no file to restore; the payload stays, so that applying it tells the cache so
    assert not payload(batch)


# ---- planning against drift ------------------------------------------------------------


def test_a_deleted_rule_rewrites_only_its_chain() -> None:
    save = without(SAVE4, "-A NETAGENT-TCP-64-127 -p tcp -m tcp --dport 80")
    obs = Observed({4: parse_save(save), 6: parse_save(SAVE6)})
    batch = backend().plan(SPEC, obs)
    assert set(payload(batch)) == {"4"}
    lines = payload_lines(batch, "4")
    assert lines == [
        ":NETAGENT-TCP-64-127 - [0:0]",
        f"-A NETAGENT-TCP-64-127 {DNAT80}",
        "-A NETAGENT-TCP-64-127 -d 10.0.0.1/32 -p tcp -m tcp --dport 81 -m comment "
        "--comment netagent:fwd/tcp/81/10.0.0.1 -j DNAT --to-destination 10.0.0.9:81",
    ]
    assert batch.steps == [
        "rewrite chain NETAGENT-TCP-64-127 (ipv4, 2 rules)",
        "add DNAT 80/tcp -> 192.168.15.2:80",
    ]
    # the path every forward shares is untouched; the forwards in that block are not
    assert not batch.rebuild
    assert batch.touched == {FWD80.key, FWD_BOUND.key}
    assert batch.touches(FWD80.key) and not batch.touches(FWD_RANGE.key)
    assert_only_ours(batch)


def test_a_deleted_entry_rule_is_put_back() -> None:
    """Without the local-only rule, transit traffic would be translated."""
    save = without(SAVE4, "-A NETAGENT-OUTPUT -m addrtype")
    obs = Observed({4: parse_save(save), 6: parse_save(SAVE6)})
    batch = backend().plan(SPEC, obs)
    assert payload_lines(batch, "4") == [
        ":NETAGENT-OUTPUT - [0:0]",
        f"-A NETAGENT-OUTPUT {LOCAL_ONLY}",
        f"-A NETAGENT-OUTPUT {TO_FORWARDS}",
    ]
    assert batch.steps == ["rewrite chain NETAGENT-OUTPUT (ipv4, 2 rules)", "add local-only"]
    assert batch.rebuild


def test_a_rule_someone_added_to_our_chain_is_removed() -> None:
    save = SAVE6.replace(
        "COMMIT",
        "-A NETAGENT-PREROUTING -p tcp -m tcp --dport 99 -j DNAT --to-destination [fd00::9]:99\n"
        "COMMIT",
    )
    obs = Observed({4: parse_save(SAVE4), 6: parse_save(save)})
    batch = backend().plan(SPEC, obs)
    assert set(payload(batch)) == {"6"}
    assert batch.steps == [
        "rewrite chain NETAGENT-PREROUTING (ipv6, 2 rules)",
        "delete DNAT 99/tcp -> [fd00::9]:99",
    ]


def test_a_bridge_change_rewrites_postrouting_only_and_touches_no_forward() -> None:
    """``rebuild``/``touched`` tell the daemon which forwards are not in place; a
    bridge's hairpin rule does not make any so."""
    spec = FirewallSpec(forwards=SPEC.forwards, bridges=(V_NET_0,))
    batch = backend().plan(spec, in_place())
    assert set(payload(batch)) == {"4"}
    assert batch.steps == [
        "rewrite chain NETAGENT-POSTROUTING (ipv4, 3 rules)",
        "delete hairpin br/br1 ipv4",
    ]
    assert not batch.rebuild
    assert batch.touched == frozenset()


def test_a_removed_forward_is_reported_once() -> None:
    """Its block empties: the chain above loses its jump, the block is deleted, and so is
    the first-level block above that, which held nothing else."""
    spec = FirewallSpec(forwards=(FWD80, FWD_BOUND, FWD6), bridges=(V_NET_0, BR1))
    batch = backend().plan(spec, in_place())
    assert payload_lines(batch, "4") == [
        ":NETAGENT-UDP-4096-8191 - [0:0]",
        ":NETAGENT-UDP-8000-8063 - [0:0]",
        ":NETAGENT-DNAT - [0:0]",
        f"-A NETAGENT-DNAT {dispatch('tcp', 0, 4095)}",
        "-X NETAGENT-UDP-4096-8191",
        "-X NETAGENT-UDP-8000-8063",
    ]
    assert batch.steps == [
        "delete chain NETAGENT-UDP-4096-8191 (ipv4)",
        "delete chain NETAGENT-UDP-8000-8063 (ipv4)",
        "rewrite chain NETAGENT-DNAT (ipv4, 1 rule)",
        "delete ports/udp/8000-8063",
        "delete DNAT 8000/udp -> 192.168.15.3:9000",
        "delete DNAT 8001/udp -> 192.168.15.3:9001",
        "delete ports/udp/4096-8191",
    ]
    assert batch.rebuild


def test_a_missing_jump_is_inserted_and_nothing_else() -> None:
    save = without(SAVE4, "-A OUTPUT -m comment")
    obs = Observed({4: parse_save(save), 6: parse_save(SAVE6)})
    batch = backend().plan(SPEC, obs)
    assert payload_lines(batch, "4") == ["-I OUTPUT 1 " + JUMPS["OUTPUT"]]
    assert batch.steps == ["add jump OUTPUT -> NETAGENT-OUTPUT (ipv4)"]
    assert batch.rebuild


def test_duplicate_jumps_are_deleted_down_to_one() -> None:
    extra = '-A POSTROUTING -m comment --comment "netagent:jump" -j NETAGENT-POSTROUTING\n'
    save = SAVE4.replace(
        "-A POSTROUTING -s 10.9.9.0/24", extra * 2 + "-A POSTROUTING -s 10.9.9.0/24"
    )
    obs = Observed({4: parse_save(save), 6: parse_save(SAVE6)})
    batch = backend().plan(SPEC, obs)
    assert payload_lines(batch, "4") == ["-D POSTROUTING " + JUMPS["POSTROUTING"]] * 2
    assert batch.steps == ["delete duplicate jump POSTROUTING -> NETAGENT-POSTROUTING (ipv4)"]


def test_a_stale_chain_of_ours_is_unhooked_flushed_and_deleted() -> None:
    save = SAVE4.replace(
        ":USER-CHAIN - [0:0]",
        ":USER-CHAIN - [0:0]\n:NETAGENT-OLD - [0:0]\n"
        '-A INPUT -m comment --comment "netagent:jump" -j NETAGENT-OLD\n'
        '-A NETAGENT-OLD -m comment --comment "netagent:old" -j RETURN',
    )
    obs = Observed({4: parse_save(save), 6: parse_save(SAVE6)})
    batch = backend().plan(SPEC, obs)
    assert payload_lines(batch, "4") == [
        ":NETAGENT-OLD - [0:0]",
        "-D INPUT -m comment --comment netagent:jump -j NETAGENT-OLD",
        "-X NETAGENT-OLD",
    ]
    assert batch.steps == [
        "delete jump INPUT -> NETAGENT-OLD (ipv4)",
        "delete chain NETAGENT-OLD (ipv4)",
        "delete old",
    ]
    assert_only_ours(batch)


def test_many_changes_are_summarized() -> None:
    many = tuple(I.make_forward(str(10000 + i), f"192.168.15.2:{80 + i}") for i in range(200))
    batch = backend((4,)).plan(FirewallSpec(forwards=many), nothing())
    # entry rules 2, localhost 1, jumps to blocks 1 + 4 (ports 10000-10199 fall in one
    # block of 4096 and four of 64), DNAT 200
    assert batch.steps[-1] == "add 208 rules, delete 0 (ipv4)"
    chains = [line for line in payload_lines(batch, "4") if line.startswith(":")]
    assert len(chains) == 4 + 1 + 4
    assert len(batch.steps) == len(chains) + 3 + 1
    assert len(payload_lines(batch, "4")) == len(chains) + 4 + 1 + 5 + 200 + 3


def test_ipv6_content_without_ip6tables_is_refused() -> None:
    with pytest.raises(BackendUnavailable, match="IPv6"):
        backend((4,)).plan(FirewallSpec(forwards=(FWD6,)), Observed({4: FamilyObserved()}))
    with pytest.raises(BackendUnavailable, match="IPv6"):
        backend((4,)).plan_update(SPEC, [FWD6], [])
    # IPv4-only specs are fine
    assert not backend((4,)).plan(FirewallSpec(forwards=(FWD80,)), nothing()).empty


def test_unknown_families_are_refused() -> None:
    with pytest.raises(ValueError, match="families"):
        IptablesBackend(families=(5,))


# ---- pure: same arguments, same batch; nothing stored ----------------------------------


def same_batch(a: Batch[RestorePayload], b: Batch[RestorePayload]) -> None:
    assert (a.steps, a.rebuild, a.touched) == (b.steps, b.rebuild, b.touched)
    if a.payload is None or b.payload is None:
        assert a.payload is b.payload is None
        return
    assert dict(a.payload) == dict(b.payload)
    assert a.payload.effects == b.payload.effects
    assert a.payload.spec == b.payload.spec
    assert a.payload.changes == b.payload.changes


def drifted() -> Observed:
    """Someone deleted a DNAT rule, a jump and the local-only rule."""
    save = without(SAVE4, "-A NETAGENT-TCP-64-127 -p tcp -m tcp --dport 80")
    save = without(save, "-A OUTPUT -m comment")
    save = without(save, "-A NETAGENT-PREROUTING -m addrtype")
    return Observed({4: parse_save(save), 6: parse_save(SAVE6)})


@pytest.mark.parametrize("observed", [nothing, in_place, drifted, Observed])
def test_plan_is_pure(observed: type[Observed]) -> None:
    be = backend()
    obs = observed()
    before_obs = copy.deepcopy(obs)
    before_be = dict(vars(be))
    before_cache = dict(vars(be.cache))
    first = be.plan(SPEC, obs)
    again = be.plan(SPEC, obs)
    same_batch(first, again)
    # the wanted chains are built anew each time (no memo), and equal
    assert first.payload is not None and again.payload is not None
    assert first.payload.wanted is not None and again.payload.wanted is not None
    assert first.payload.wanted is not again.payload.wanted
    assert first.payload.wanted.chains == again.payload.wanted.chains
    # nothing stored: not in the backend, its cache, or the observation
    assert obs == before_obs
    assert vars(be) == before_be
    assert vars(be.cache) == before_cache
    assert be.cache.wanted is None and be.cache.observed is None
    # and a new backend plans the same
    same_batch(first, backend().plan(SPEC, observed()))


def test_plan_update_is_pure() -> None:
    be = backend()
    new = I.make_forward("443", "192.168.15.2:443")
    grown = FirewallSpec(forwards=(*SPEC.forwards, new), bridges=SPEC.bridges)
    before_cache = dict(vars(be.cache))
    same_batch(be.plan_update(grown, [new], [FWD80]), be.plan_update(grown, [new], [FWD80]))
    same_batch(be.plan_update(grown, [new], [FWD80]), backend().plan_update(grown, [new], [FWD80]))
    assert vars(be.cache) == before_cache


@pytest.mark.parametrize("observed", [nothing, in_place, drifted])
def test_hints_change_nothing_but_the_cost(observed: type[Observed]) -> None:
    """The wanted chains of the same spec give the same batch; a hint for another spec
    is not used; ``in_sync`` with the spec is "nothing to do", with another is ignored."""
    plain = backend().plan(SPEC, observed())
    obs = observed()
    hinted = Observed(obs.families, wanted=Wanted.of(SPEC, (4, 6)))
    same_batch(plain, backend().plan(SPEC, hinted))
    other = FirewallSpec(forwards=SPEC.forwards[1:], bridges=SPEC.bridges)
    stale = Observed(obs.families, in_sync=other, wanted=Wanted.of(other, (4, 6)))
    same_batch(plain, backend().plan(SPEC, stale))
    # only a family the hint does not hold: built, not taken
    narrow = Observed(obs.families, wanted=Wanted.of(SPEC, (4,)))
    same_batch(plain, backend().plan(SPEC, narrow))
    assert backend().plan(SPEC, Observed(obs.families, in_sync=SPEC)) == Batch()


# ---- rebuild and touched ---------------------------------------------------------------


def test_from_nothing_everything_is_rebuilt_and_every_forward_touched() -> None:
    batch = backend().plan(SPEC, nothing())
    assert batch.rebuild
    assert batch.touched == {f.key for f in SPEC.forwards}


def test_a_missing_jump_is_a_rebuild_that_writes_no_forward() -> None:
    save = without(SAVE4, "-j NETAGENT-PREROUTING")
    obs = Observed({4: parse_save(save), 6: parse_save(SAVE6)})
    batch = backend().plan(SPEC, obs)
    assert batch.steps == ["add jump PREROUTING -> NETAGENT-PREROUTING (ipv4)"]
    assert batch.rebuild
    assert batch.touched == frozenset()
    assert batch.touches(FWD80.key)  # until it is applied, no forward works


def test_a_rewritten_dnat_root_is_a_rebuild() -> None:
    save = without(SAVE4, "-A NETAGENT-DNAT -p udp")
    batch = backend().plan(SPEC, Observed({4: parse_save(save), 6: parse_save(SAVE6)}))
    assert batch.steps[0] == "rewrite chain NETAGENT-DNAT (ipv4, 2 rules)"
    assert batch.rebuild


def test_a_rewritten_upper_block_touches_the_forwards_below_it() -> None:
    """The jump from NETAGENT-TCP-0-4095 to the block of 80 and 81 is gone: that chain is
    rewritten, and the forwards below it are touched (not the UDP one, nor IPv6)."""
    save = without(SAVE4, "-A NETAGENT-TCP-0-4095 -p tcp")
    batch = backend().plan(SPEC, Observed({4: parse_save(save), 6: parse_save(SAVE6)}))
    assert batch.steps[0] == "rewrite chain NETAGENT-TCP-0-4095 (ipv4, 1 rule)"
    assert not batch.rebuild
    assert batch.touched == {FWD80.key, FWD_BOUND.key}


def test_deleting_duplicate_or_stale_jumps_touches_nothing() -> None:
    extra = '-A POSTROUTING -m comment --comment "netagent:jump" -j NETAGENT-POSTROUTING\n'
    save = SAVE4.replace("-A POSTROUTING -s 10.9.9.0/24", extra + "-A POSTROUTING -s 10.9.9.0/24")
    save = save.replace(
        ":USER-CHAIN - [0:0]",
        ":USER-CHAIN - [0:0]\n:NETAGENT-OLD - [0:0]\n"
        '-A INPUT -m comment --comment "netagent:jump" -j NETAGENT-OLD',
    )
    batch = backend().plan(SPEC, Observed({4: parse_save(save), 6: parse_save(SAVE6)}))
    assert batch.steps == [
        "delete jump INPUT -> NETAGENT-OLD (ipv4)",
        "delete duplicate jump POSTROUTING -> NETAGENT-POSTROUTING (ipv4)",
        "delete chain NETAGENT-OLD (ipv4)",
    ]
    assert not batch.rebuild
    assert batch.touched == frozenset()


def test_an_ipv6_block_rewrite_touches_the_ipv6_forward_only() -> None:
    save = without(SAVE6, "-A NETAGENT-TCP-64-127 -p tcp")
    batch = backend().plan(SPEC, Observed({4: parse_save(SAVE4), 6: parse_save(save)}))
    assert not batch.rebuild
    assert batch.touched == {FWD6.key}


def test_plan_update_touches_what_it_adds_and_never_rebuilds() -> None:
    moved = I.make_forward("80", "192.168.15.9:8080")
    spec = FirewallSpec(forwards=(moved, FWD_RANGE, FWD_BOUND, FWD6), bridges=SPEC.bridges)
    batch = backend().plan_update(spec, [moved], [FWD80])
    assert batch.touched == {moved.key}
    assert not batch.rebuild
    gone = backend().plan_update(FirewallSpec(forwards=(FWD_BOUND,)), [], [FWD80])
    assert gone.touched == frozenset()
    assert not gone.rebuild


def test_an_update_of_ipv6_without_ip6tables_is_refused_before_anything() -> None:
    with pytest.raises(BackendUnavailable):
        IptablesBackend(families=(4,), generation=no_generation).plan_update(
            FirewallSpec(forwards=(FWD6,)), [FWD6], []
        )


FOREIGN = (
    ":NETAGENT-MINE - [0:0]\n:NETAGENT-FOO - [0:0]\n"
    "-A PREROUTING -j NETAGENT-FOO\n"
    "-A NETAGENT-FOO -j NETAGENT-MINE\n"
    "-A NETAGENT-MINE -p tcp -m tcp --dport 22 -j ACCEPT\n"
)


def with_foreign(text: str, extra: str = FOREIGN) -> str:
    return text.replace(":USER-CHAIN - [0:0]\n", ":USER-CHAIN - [0:0]\n" + extra)


def none_of_ours(text: str, name: str = "NETAGENT") -> str:
    return "".join(line for line in text.splitlines(keepends=True) if name not in line)


def test_foreign_netagent_chains_are_never_in_a_plan() -> None:
    """Issue 9, item 5: a rebuild leaves a user's NETAGENT-MINE (and the NETAGENT-FOO
    their own rule jumps to) alone: not deleted, not flushed, not in any step."""
    obs = Observed({4: parse_save(with_foreign(SAVE4)), 6: parse_save(SAVE6)})
    assert backend().plan(SPEC, obs).empty
    # the whole table planned from nothing of ours, beside them: still not a word of them
    obs = Observed({4: parse_save(with_foreign(none_of_ours(SAVE4)))})
    batch = backend().plan(FirewallSpec(forwards=(FWD80,)), obs)
    text = batch.payload["4"] if batch.payload else ""
    assert "NETAGENT-MINE" not in text and "NETAGENT-FOO" not in text
    assert not any("MINE" in s or "FOO" in s for s in batch.steps)


def test_a_chain_of_ours_someone_jumps_to_is_emptied_not_deleted() -> None:
    """No forward wants the UDP blocks any more, but the user's rule jumps into one:
    ``-X`` would fail the whole file, so that chain is only emptied."""
    extra = "-A PREROUTING -p udp -j NETAGENT-UDP-8000-8063\n"
    obs = Observed({4: parse_save(with_foreign(SAVE4, extra)), 6: parse_save(SAVE6)})
    spec = FirewallSpec(forwards=(FWD80, FWD_BOUND, FWD6), bridges=SPEC.bridges)
    batch = backend().plan(spec, obs)
    text = batch.payload["4"] if batch.payload else ""
    assert "-X NETAGENT-UDP-4096-8191" in text
    assert "-X NETAGENT-UDP-8000-8063" not in text
    assert ":NETAGENT-UDP-8000-8063 - [0:0]" in text
    assert "empty chain NETAGENT-UDP-8000-8063 (ipv4; someone else jumps to it)" in batch.steps


def test_a_name_we_need_held_by_someone_else_is_refused() -> None:
    mine = ":NETAGENT-DNAT - [0:0]\n-A NETAGENT-DNAT -j ACCEPT\n"
    taken = with_foreign(none_of_ours(SAVE4, "NETAGENT-DNAT"), mine)
    obs = Observed({4: parse_save(taken), 6: parse_save(SAVE6)})
    with pytest.raises(BackendFailed, match=r"NETAGENT-DNAT .* not netagent's"):
        backend().plan(SPEC, obs)
