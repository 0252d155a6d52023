"""The update planner (``backends/iptables/plan.py``, ``plan_update``): one request's
forwards changed against what is installed, checked against full plans. Pure functions:
no process, no kernel, no backend state."""

from __future__ import annotations

import random
from collections import Counter

from netagent.agent import intents as I
from netagent.backends.firewall import Batch, FirewallSpec
from netagent.backends.iptables.cache import ObservationCache
from netagent.backends.iptables.restore import RestorePayload
from netagent.backends.iptables.rules import HOOKS, Rule, desired_chains
from netagent.backends.iptables.save import FamilyObserved, Observed
from tests.backends.iptables_samples import (
    DNAT80,
    ENTRY,
    FWD6,
    FWD80,
    FWD_BOUND,
    FWD_RANGE,
    JUMPS,
    SPEC,
    assert_only_ours,
    backend,
    dispatch,
    no_generation,
    nothing,
    payload,
    payload_lines,
)

# ---- plan_update ---------------------------------------------------------------------


def chains_after(
    spec: FirewallSpec, batch: Batch[RestorePayload], version: int = 4
) -> dict[str, Counter[Rule]]:
    """The family as the spec's full plan leaves it, then with ``batch`` applied: each
    chain's rules, in any order."""
    have = FamilyObserved(desired_chains(spec, version), Counter(dict.fromkeys(HOOKS, 1)))
    after = payload(batch).effects[version].after(have)
    assert after is not None
    return {name: Counter(rules) for name, rules in after.chains.items()}


def wanted(spec: FirewallSpec, version: int = 4) -> dict[str, Counter[Rule]]:
    return {name: Counter(rules) for name, rules in desired_chains(spec, version).items()}


def test_plan_update_checks_the_path_and_creates_a_block() -> None:
    """Without an observation the jumps and entry rules are checked (``-C``), never added:
    if one is missing the restore fails, and the reconciler's fallback (observe + plan)
    puts it back. 443 opens a new block of 64 in the existing block 0-4095: the jump into
    that one is checked, and one into the new block appended to it."""
    new = I.make_forward("443", "192.168.15.2:443")
    spec = FirewallSpec(forwards=(*SPEC.forwards, new), bridges=SPEC.bridges)
    batch = backend().plan_update(spec, [new], [])
    assert set(payload(batch)) == {"4"}
    assert payload_lines(batch, "4") == [
        *(f"-C {chain} {rule}" for chain, rule in JUMPS.items()),
        *(line.replace("-A", "-C", 1) for line in ENTRY),
        f"-C NETAGENT-DNAT {dispatch('tcp', 0, 4095)}",
        ":NETAGENT-TCP-384-447 - [0:0]",
        "-A NETAGENT-TCP-384-447 -p tcp -m tcp --dport 443 -m comment --comment "
        "netagent:fwd/tcp/443 -j DNAT --to-destination 192.168.15.2:443",
        f"-A NETAGENT-TCP-0-4095 {dispatch('tcp', 384, 447)}",
    ]
    assert batch.steps == ["add DNAT 443/tcp -> 192.168.15.2:443"]
    assert not batch.rebuild
    assert_only_ours(batch)
    # what it writes is exactly what a full plan wants
    assert chains_after(SPEC, batch) == wanted(spec)


def test_plan_update_into_an_existing_block_appends_one_rule() -> None:
    """Nothing is flushed or deleted: a file that deletes waits for a grace period."""
    new = I.make_forward("100", "192.168.15.2:100")
    spec = FirewallSpec(forwards=(*SPEC.forwards, new), bridges=SPEC.bridges)
    batch = backend().plan_update(spec, [new], [])
    assert payload_lines(batch, "4")[7:] == [
        f"-C NETAGENT-TCP-0-4095 {dispatch('tcp', 64, 127)}",
        "-A NETAGENT-TCP-64-127 -p tcp -m tcp --dport 100 -m comment --comment "
        "netagent:fwd/tcp/100 -j DNAT --to-destination 192.168.15.2:100",
    ]
    assert chains_after(SPEC, batch) == wanted(spec)


def test_plan_update_removal_deletes_by_spec_and_emptied_blocks_whole() -> None:
    spec = FirewallSpec(forwards=(FWD80, FWD_BOUND), bridges=SPEC.bridges)
    batch = backend().plan_update(spec, [], [FWD6, FWD_RANGE])
    assert set(payload(batch)) == {"4", "6"}
    assert batch.steps == [
        "delete DNAT 80/tcp -> [fd00:15::2]:8080",
        "delete DNAT 8000/udp -> 192.168.15.3:9000",
        "delete DNAT 8001/udp -> 192.168.15.3:9001",
    ]
    # the UDP blocks empty: the jump into them goes, they are flushed and deleted
    assert payload_lines(batch, "4")[7:] == [
        ":NETAGENT-UDP-4096-8191 - [0:0]",
        ":NETAGENT-UDP-8000-8063 - [0:0]",
        f"-D NETAGENT-DNAT {dispatch('udp', 4096, 8191)}",
        "-X NETAGENT-UDP-4096-8191",
        "-X NETAGENT-UDP-8000-8063",
    ]
    # the last IPv6 forward: NETAGENT-DNAT stays, empty
    assert payload_lines(batch, "6")[7:] == [
        ":NETAGENT-TCP-0-4095 - [0:0]",
        ":NETAGENT-TCP-64-127 - [0:0]",
        f"-D NETAGENT-DNAT {dispatch('tcp', 0, 4095)}",
        "-X NETAGENT-TCP-0-4095",
        "-X NETAGENT-TCP-64-127",
    ]
    assert chains_after(SPEC, batch) == wanted(spec)
    assert chains_after(SPEC, batch, 6) == wanted(spec, 6)
    assert_only_ours(batch)
    # one forward out of a block that keeps others: its rule, by its exact text
    spec = FirewallSpec(forwards=(FWD_RANGE, FWD_BOUND, FWD6), bridges=SPEC.bridges)
    batch = backend().plan_update(spec, [], [FWD80])
    assert payload_lines(batch, "4")[7:] == [
        f"-C NETAGENT-TCP-0-4095 {dispatch('tcp', 64, 127)}",
        f"-D NETAGENT-TCP-64-127 {DNAT80}",
    ]
    assert chains_after(SPEC, batch) == wanted(spec)


def test_plan_update_retarget_deletes_and_appends() -> None:
    """The same key to a new destination: removed and added in one change."""
    moved = I.make_forward("80", "192.168.15.9:8080")
    spec = FirewallSpec(forwards=(moved, FWD_RANGE, FWD_BOUND, FWD6), bridges=SPEC.bridges)
    batch = backend((4, 6)).plan_update(spec, [moved], [FWD80])
    assert set(payload(batch)) == {"4"}
    assert payload_lines(batch, "4")[7:] == [
        f"-C NETAGENT-TCP-0-4095 {dispatch('tcp', 64, 127)}",
        f"-D NETAGENT-TCP-64-127 {DNAT80}",
        "-A NETAGENT-TCP-64-127 -p tcp -m tcp --dport 80 -m comment --comment "
        "netagent:fwd/tcp/80 -j DNAT --to-destination 192.168.15.9:8080",
    ]
    assert chains_after(SPEC, batch) == wanted(spec)


def test_plan_update_matches_full_plans_through_random_changes(rng_seed: int) -> None:
    """A random walk of adds and removes (single ports, ranges across blocks, host
    addresses, both protocols, IPv6): after each update, the chains are what a full plan
    of the new desired state wants, so planning it finds nothing to do."""
    rng = random.Random(rng_seed)
    be = backend()
    # what the backend's apply does with each batch's wanted chains, without the table
    cache = ObservationCache(no_generation)
    cache.begin(payload(be.plan(FirewallSpec(), nothing())))
    current: list[I.Forward] = []
    have = {v: FamilyObserved(desired_chains(FirewallSpec(), v)) for v in (4, 6)}
    for v in have:
        have[v].jumps.update(dict.fromkeys(((b, c) for b, c in HOOKS), 1))
    assert be.plan(FirewallSpec(), Observed(dict(have))).empty
    for _ in range(300):
        added: list[I.Forward] = []
        removed: list[I.Forward] = []
        if current and rng.random() < 0.4:
            removed = rng.sample(current, rng.randint(1, min(3, len(current))))
        for _ in range(rng.randint(0 if removed else 1, 3)):
            first = rng.choice([rng.randint(1, 65535), rng.randint(4000, 4200)])
            count = min(rng.choice([1, 1, 1, 2, 70]), 65536 - first)
            six = rng.random() < 0.2
            dest = f"[fd00::{rng.randint(1, 99)}]" if six else f"10.0.0.{rng.randint(1, 99)}"
            host_ip = rng.choice([None, None, "fd00::1" if six else "10.1.1.1"])
            ports = range(first, first + count)
            proto = rng.choice(["tcp", "udp"])
            taken = {
                (f.proto, f.family, p)
                for f in current + added
                if f not in removed
                for p in f.host_ports
            }
            if any((proto, 6 if six else 4, p) in taken for p in ports):
                continue
            spec_text = str(first) if count == 1 else f"{first}-{first + count - 1}"
            dport = rng.randint(1, 65536 - count)
            dspec = str(dport) if count == 1 else f"{dport}-{dport + count - 1}"
            added.append(I.make_forward(spec_text, f"{dest}:{dspec}", proto, host_ip))
        if not added and not removed:
            continue
        current = [f for f in current if f not in removed] + added
        spec = FirewallSpec(forwards=tuple(rng.sample(current, len(current))))
        batch = be.plan_update(spec, added, removed)
        # the cache's wanted chains follow the update
        cache.begin(payload(batch))
        assert cache.wanted is not None and cache.wanted.spec is spec
        for version in (4, 6):
            assert {k: Counter(v) for k, v in cache.wanted.chains[version].items()} == wanted(
                spec, version
            )
        for version, effect in payload(batch).effects.items():
            after = effect.after(have[version])
            assert after is not None
            have[version] = after
            assert_only_ours(batch)
        plan = be.plan(spec, Observed(dict(have)))
        assert plan.empty, plan.steps
        assert be.plan(spec, Observed(dict(have), wanted=cache.wanted)).empty


def test_plan_update_with_nothing_changed_is_empty() -> None:
    assert backend().plan_update(SPEC, [], []).empty


def test_plan_update_cost_does_not_grow_with_the_forwards() -> None:
    """10,000 forwards: one more is a file of a few lines, checked and written against
    small chains only."""
    many = tuple(I.make_forward(str(10000 + i), f"192.168.15.2:{1 + i}") for i in range(10_000))
    new = I.make_forward("40000", "192.168.15.2:80")
    batch = backend((4,)).plan_update(FirewallSpec(forwards=(*many, new)), [new], [])
    # checks; two new blocks (of 4096 and of 64), the rule, two jumps into them
    assert len(payload_lines(batch, "4")) == 7 + 2 + 1 + 2
    gone = backend((4,)).plan_update(FirewallSpec(forwards=many[1:]), [], [many[0]])
    lines = payload_lines(gone, "4")
    # the checks, the jump into the block, the rule
    assert len(lines) == 7 + 1 + 1
