"""What the backend remembers between calls (``backends/iptables/cache.py``): when the
observation cache answers, when it is invalidated, and that the wanted chains it keeps
spare full plans from rebuilding 10,000 rules. Programs and the nf_tables generation are
faked; each fake restore commits once."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest

from netagent.agent import intents as I
from netagent.agent.errors import BackendFailed
from netagent.backends.firewall import FirewallSpec
from netagent.backends.iptables import IptablesBackend, rules
from netagent.backends.iptables.cache import ObservationCache
from netagent.backends.iptables.rules import desired_chains
from netagent.backends.iptables.save import FamilyObserved, Observed, parse_save
from tests.backends.iptables_samples import (
    EMPTY_SAVE,
    FWD80,
    SAVE4,
    SAVE6,
    SPEC,
    FakeRun,
    install_fake_run,
    nothing,
    payload,
    without,
)

NEW = I.make_forward("443", "192.168.15.2:443")
GROWN = FirewallSpec(forwards=(*SPEC.forwards, NEW), bridges=SPEC.bridges)


class Generation:
    """A fake nf_tables generation: each restore that runs commits once."""

    def __init__(self, fake_run: FakeRun) -> None:
        self.value = 100
        self.fake_run = fake_run
        self.seen = 0
        #: commits by someone else, with each of ours
        self.others = 0

    def __call__(self) -> int:
        restores = self.fake_run.restores()
        self.value += (restores - self.seen) * (1 + self.others)
        self.seen = restores
        return self.value


@pytest.fixture
def fake_run(monkeypatch: pytest.MonkeyPatch) -> FakeRun:
    return install_fake_run(monkeypatch)


@pytest.fixture
def generation(fake_run: FakeRun) -> Generation:
    return Generation(fake_run)


@pytest.fixture
def builds(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many times the chains a desired state wants are built from the intents."""
    calls: list[int] = []
    real = rules.desired_chains

    def counting(spec: FirewallSpec, version: int) -> dict[str, Any]:
        calls.append(version)
        return real(spec, version)

    monkeypatch.setattr(rules, "desired_chains", counting)
    return calls


def known_backend(generation: Callable[[], int | None]) -> IptablesBackend:
    return IptablesBackend(families=(4, 6), generation=generation)


def empty_table(fake_run: FakeRun) -> None:
    fake_run.answers["iptables-save"] = (0, EMPTY_SAVE, "")
    fake_run.answers["ip6tables-save"] = (0, EMPTY_SAVE, "")


async def full_pass(be: IptablesBackend, spec: FirewallSpec = SPEC) -> list[str]:
    batch = be.plan(spec, await be.observe())
    await be.apply(batch)
    return batch.steps


# ---- the observation, by generation --------------------------------------------------------


async def test_an_unchanged_generation_is_answered_from_memory(
    fake_run: FakeRun, generation: Generation
) -> None:
    be = known_backend(generation)
    first = await be.observe()
    assert fake_run.saves() == 3  # nat (IPv4, IPv6), filter (IPv4)
    assert await be.observe() is first
    assert fake_run.saves() == 3  # nat (IPv4, IPv6), filter (IPv4)
    generation.value += 1  # someone else committed something
    assert await be.observe() is not first
    assert fake_run.saves() == 6


async def test_legacy_iptables_always_reads(fake_run: FakeRun) -> None:
    be = known_backend(lambda: None)
    await be.observe()
    await be.observe()
    assert fake_run.saves() == 6


async def test_a_change_during_the_read_is_not_remembered(fake_run: FakeRun) -> None:
    values = iter([5, 6, 6, 6])  # before and after the first read, then the second's
    be = known_backend(lambda: next(values))
    await be.observe()
    assert be.cache.observed is None
    await be.observe()
    assert be.cache.observed is not None and be.cache.generation == 6


async def test_own_changes_are_remembered_and_the_next_pass_is_free(
    fake_run: FakeRun, generation: Generation, builds: list[int]
) -> None:
    """After a full plan is applied, and after updates on top of it, observing and
    planning the same desired state reads nothing, builds nothing and finds nothing to
    do; what is remembered is what the table then holds."""
    be = known_backend(generation)
    empty_table(fake_run)
    await full_pass(be)
    assert fake_run.saves() == 3  # nat (IPv4, IPv6), filter (IPv4)
    assert be.cache.observed is not None and be.cache.observed.in_sync is SPEC
    observed = await be.observe()
    assert fake_run.saves() == 3  # nat (IPv4, IPv6), filter (IPv4)
    assert be.plan(SPEC, observed).payload is None  # in sync: answered at once
    assert {v: f.chains for v, f in observed.families.items()} == {
        v: desired_chains(SPEC, v) for v in (4, 6)
    }

    await be.apply(be.plan_update(GROWN, [NEW], []))
    assert be.cache.observed is not None and be.cache.observed.in_sync is GROWN
    observed = await be.observe()
    assert fake_run.saves() == 3  # nat (IPv4, IPv6), filter (IPv4)
    assert be.plan(GROWN, observed).empty
    assert observed.families[4].chains == desired_chains(GROWN, 4)
    assert len(builds) == 2  # the first plan's, one per family
    # the memory does not hide a real difference: another desired state is planned
    assert not be.plan(SPEC, observed).empty


async def test_an_empty_plan_on_a_fresh_read_teaches_the_cache(
    fake_run: FakeRun, generation: Generation, builds: list[int]
) -> None:
    """At a restart the table already holds the desired state: the first plan finds
    nothing to write, and applying it (no program runs) marks the table in sync."""
    be = known_backend(generation)
    batch = be.plan(SPEC, await be.observe())
    assert batch.empty and batch.payload is not None
    await be.apply(batch)
    assert fake_run.restores() == 0
    assert be.plan(SPEC, await be.observe()).payload is None
    assert fake_run.saves() == 3  # nat (IPv4, IPv6), filter (IPv4)
    assert len(builds) == 2


async def test_someone_elses_commit_in_between_forgets(
    fake_run: FakeRun, generation: Generation
) -> None:
    be = known_backend(generation)
    await be.observe()
    assert be.cache.observed is not None
    batch = be.plan_update(GROWN, [NEW], [])
    generation.others = 1
    await be.apply(batch)
    assert be.cache.observed is None
    await be.observe()
    assert fake_run.saves() == 6


async def test_a_failed_restore_forgets(fake_run: FakeRun, generation: Generation) -> None:
    be = known_backend(generation)
    await be.observe()
    fake_run.answers["iptables-restore"] = (1, "", "iptables-restore: line 2 failed")
    with pytest.raises(BackendFailed):
        await be.apply(be.plan_update(GROWN, [NEW], []))
    assert be.cache.observed is None


async def test_an_unknown_generation_forgets(fake_run: FakeRun) -> None:
    """The netlink read failed (it returns None): nothing is answered from memory."""
    values: list[int | None] = [7, 7, 7, None, None]
    be = known_backend(lambda: values.pop(0))
    await be.observe()
    assert await be.observe() is be.cache.observed
    await be.observe()
    assert fake_run.saves() == 6
    assert be.cache.observed is None


async def test_purge_forgets(fake_run: FakeRun, generation: Generation) -> None:
    be = known_backend(generation)
    await be.observe()
    await be.purge()
    assert be.cache.observed is None


async def test_an_update_not_built_on_the_remembered_spec_is_not_trusted_as_in_sync(
    fake_run: FakeRun, generation: Generation
) -> None:
    be = known_backend(generation)
    empty_table(fake_run)
    await full_pass(be)
    other = I.make_forward("5000", "192.168.15.2:444")
    # the desired state also holds a forward no update ever added
    grown = FirewallSpec(forwards=(*GROWN.forwards, other), bridges=SPEC.bridges)
    await be.apply(be.plan_update(grown, [NEW], []))
    assert be.cache.observed is not None and be.cache.observed.in_sync is None
    assert be.cache.wanted is None
    batch = be.plan(grown, await be.observe())
    assert fake_run.saves() == 3  # nat (IPv4, IPv6), filter (IPv4)
    assert "add DNAT 5000/tcp -> 192.168.15.2:444" in batch.steps


# ---- the wanted chains: valid whatever the table holds ----------------------------------------


async def test_a_full_plan_after_drift_does_not_rebuild(
    fake_run: FakeRun, generation: Generation, builds: list[int]
) -> None:
    """Full plan, an update, then someone else deletes a rule: the observation is read
    again, and the plan compares it with the wanted chains the update advanced, instead
    of building them from 10,000 intents; it plans what a fresh backend plans."""
    be = known_backend(generation)
    empty_table(fake_run)
    await full_pass(be)
    await be.apply(be.plan_update(GROWN, [NEW], []))
    assert len(builds) == 2
    # someone deletes the DNAT rule of port 80 (the table read back lacks it)
    fake_run.answers["iptables-save"] = (
        0, without(SAVE4, "-A NETAGENT-TCP-64-127 -p tcp -m tcp --dport 80"), ""
    )  # fmt: skip
    fake_run.answers["ip6tables-save"] = (0, SAVE6, "")
    generation.value += 1
    observed = await be.observe()
    assert fake_run.saves() == 6
    assert observed.in_sync is None
    assert observed.wanted is not None and observed.wanted.spec is GROWN
    batch = be.plan(GROWN, observed)
    assert len(builds) == 2  # nothing rebuilt
    fresh = IptablesBackend(families=(4, 6), generation=lambda: None).plan(
        GROWN, Observed(observed.families)
    )
    assert len(builds) == 4
    assert batch.steps == fresh.steps
    assert (batch.rebuild, batch.touched) == (fresh.rebuild, fresh.touched)
    assert "add DNAT 80/tcp -> 192.168.15.2:80" in batch.steps
    # both leave the table as GROWN wants it (order within a chain aside); IPv6 is
    # already as it wants
    assert set(payload(batch)) == set(payload(fresh)) == {"4"}
    for version in (4,):
        a = payload(batch).effects[version].after(observed.families[version])
        b = payload(fresh).effects[version].after(observed.families[version])
        assert a is not None and b is not None
        assert {k: Counter(v) for k, v in a.chains.items()} == {
            k: Counter(v) for k, v in b.chains.items()
        }
        assert a.jumps == b.jumps


async def test_legacy_iptables_keeps_the_wanted_chains(
    fake_run: FakeRun, builds: list[int]
) -> None:
    """No generation: every observation reads the table, but still carries the wanted
    chains, so a periodic pass compares without rebuilding."""
    be = known_backend(lambda: None)
    empty_table(fake_run)
    await full_pass(be)
    fake_run.answers["iptables-save"] = (0, SAVE4, "")
    fake_run.answers["ip6tables-save"] = (0, SAVE6, "")
    for _ in range(3):
        assert await full_pass(be) == []
    assert fake_run.saves() == 12
    assert len(builds) == 2


async def test_an_update_that_does_not_follow_drops_the_wanted_chains(
    fake_run: FakeRun, builds: list[int]
) -> None:
    be = known_backend(lambda: None)
    await full_pass(be)
    twin = I.make_forward("80", "192.168.15.2:80")  # equal to FWD80, not the same object
    await be.apply(be.plan_update(FirewallSpec(forwards=SPEC.forwards[1:]), [], [twin]))
    assert be.cache.wanted is None
    await full_pass(be, FirewallSpec(forwards=SPEC.forwards[1:]))
    assert len(builds) == 4


async def test_a_failed_full_plan_keeps_its_wanted_chains(
    fake_run: FakeRun, builds: list[int]
) -> None:
    """They depend on the desired state only: the retry after the failure reuses them."""
    be = known_backend(lambda: None)
    empty_table(fake_run)
    fake_run.answers["iptables-restore"] = (1, "", "iptables-restore: line 9 failed")
    with pytest.raises(BackendFailed):
        await full_pass(be)
    assert be.cache.wanted is not None and be.cache.wanted.spec is SPEC
    del fake_run.answers["iptables-restore"]
    await full_pass(be)
    assert len(builds) == 2


# ---- the cache object alone ------------------------------------------------------------------


def test_the_cache_advances_by_exactly_one_commit_per_file() -> None:
    gen = [10]
    cache = ObservationCache(lambda: gen[0])
    cache.read(10, {4: FamilyObserved(), 6: FamilyObserved()})
    from netagent.backends.iptables.plan import plan_full

    batch = plan_full(SPEC, nothing(), (4, 6))
    known = cache.observed
    assert known is not None
    pending = cache.begin(payload(batch))
    assert pending.known is known and cache.observed is None
    gen[0] = 12  # two files, two commits
    cache.commit(pending, payload(batch))
    assert cache.observed is not None and cache.generation == 12
    # planned on a hand-made observation, not the cached one: the effects are applied,
    # but in_sync is not claimed
    assert cache.observed.in_sync is None
    assert cache.observed.families[4].chains == desired_chains(SPEC, 4)

    batch = plan_full(SPEC, cache.observed, (4, 6))
    assert batch.empty
    pending = cache.begin(payload(batch))
    cache.commit(pending, payload(batch))
    assert cache.observed is not None and cache.observed.in_sync is SPEC

    update = plan_full(FirewallSpec(forwards=(FWD80,)), cache.observed, (4, 6))
    pending = cache.begin(payload(update))
    gen[0] += 3  # one more commit than files: someone else's
    cache.commit(pending, payload(update))
    assert cache.observed is None


def test_a_read_carries_the_wanted_chains_never_in_sync() -> None:
    cache = ObservationCache(lambda: 1)
    batch = IptablesBackend(families=(4, 6), generation=lambda: None).plan(SPEC, nothing())
    cache.begin(payload(batch))
    obs = cache.read(1, {4: parse_save(SAVE4), 6: parse_save(SAVE6)})
    assert obs.wanted is payload(batch).wanted
    assert obs.in_sync is None
    assert cache.observed is obs
