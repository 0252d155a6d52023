"""``FakeFirewall`` holds the backends' contract (``docs/backends.md``), so the tests that
use it see what a real backend would do: pure plans, all-or-nothing transactions, an
update that does not fit what is installed refused."""

from __future__ import annotations

import copy
import ipaddress

import anyio
import pytest

from netagent.agent import intents as I
from netagent.agent.errors import BackendFailed
from netagent.backends.fakefw import FakeFirewall, FakePayload, Op
from netagent.backends.firewall import Batch, FirewallSpec

BR = I.Bridge("v-net-0", (ipaddress.ip_interface("192.168.15.5/24"),), masquerade=True)
FWD80 = I.make_forward("80", "192.168.15.2:80")
FWD81 = I.make_forward("81", "192.168.15.2:81")
SPEC = FirewallSpec(forwards=(FWD80, FWD81), bridges=(BR,))


async def installed(spec: FirewallSpec = SPEC) -> FakeFirewall:
    fw = FakeFirewall()
    await fw.apply(fw.plan(spec, await fw.observe()))
    return fw


async def test_a_full_plan_creates_then_finds_nothing_to_do() -> None:
    fw = FakeFirewall()
    batch = fw.plan(SPEC, await fw.observe())
    assert batch.rebuild and batch.steps == ["create table (2 forwards, 2 rules)"]
    await fw.apply(batch)
    assert fw.dump().splitlines() == [
        "forward fwd/tcp/80: 80/tcp -> 192.168.15.2:80",
        "forward fwd/tcp/81: 81/tcp -> 192.168.15.2:81",
        "rule hairpin br/v-net-0 192.168.15.0/24",
        "rule masquerade br/v-net-0 192.168.15.0/24 oifname != v-net-0",
    ]
    again = fw.plan(SPEC, await fw.observe())
    assert again.empty and not again.rebuild


async def test_plans_are_pure_and_observations_are_copies() -> None:
    fw = await installed()
    obs = await fw.observe()
    before = copy.deepcopy(obs)
    spec = FirewallSpec(forwards=(FWD81,), bridges=())
    assert fw.plan(spec, obs) == fw.plan(spec, obs) == FakeFirewall().plan(spec, obs)
    assert obs == before
    fw.drop_forward("fwd/tcp/80")
    assert obs == before  # what was observed does not follow the live rules
    update = fw.plan_update(SPEC, [FWD81], [FWD80])
    assert update == fw.plan_update(SPEC, [FWD81], [FWD80])
    assert update.touched == {"fwd/tcp/81"}


async def test_a_diff_touches_only_the_forwards_it_adds() -> None:
    fw = await installed()
    fw.drop_forward("fwd/tcp/81")
    retargeted = I.make_forward("80", "192.168.15.3:80")
    batch = fw.plan(FirewallSpec((retargeted, FWD81), (BR,)), await fw.observe())
    assert batch.steps == [
        "delete forward fwd/tcp/80: 80/tcp -> 192.168.15.2:80",
        "add forward fwd/tcp/80: 80/tcp -> 192.168.15.3:80",
        "add forward fwd/tcp/81: 81/tcp -> 192.168.15.2:81",
    ]
    assert batch.touched == {"fwd/tcp/80", "fwd/tcp/81"} and not batch.rebuild


@pytest.mark.parametrize(
    ("added", "removed", "why"),
    [
        ([], [I.make_forward("82", "192.168.15.2:82")], "cannot delete fwd/tcp/82: not installed"),
        ([], [I.make_forward("80", "192.168.15.9:80")], "installed as 80/tcp -> 192.168.15.2:80"),
        ([I.make_forward("80", "192.168.15.9:80")], [], "fwd/tcp/80 exists as"),
    ],
    ids=["delete what is not there", "delete what points elsewhere", "add over another"],
)
async def test_an_update_that_does_not_fit_is_refused_whole(
    added: list[I.Forward], removed: list[I.Forward], why: str
) -> None:
    fw = await installed()
    before = fw.dump()
    fresh = I.make_forward("90", "192.168.15.2:90")  # would fit: refused with the rest
    with pytest.raises(BackendFailed, match=why):
        await fw.apply(fw.plan_update(SPEC, [fresh, *added], removed))
    assert fw.dump() == before


async def test_nothing_fits_while_the_table_is_gone() -> None:
    fw = await installed()
    fw.drop_table()
    with pytest.raises(BackendFailed, match="no table"):
        await fw.apply(fw.plan_update(SPEC, [I.make_forward("90", "192.168.15.2:90")], []))
    assert not await fw.present()
    await fw.apply(fw.plan(SPEC, await fw.observe()))  # a full plan creates it again
    assert await fw.present() and len(fw.dump().splitlines()) == 4


async def test_a_bad_operation_anywhere_changes_nothing() -> None:
    fw = await installed()
    before = fw.dump()
    ops = (Op("delete", FWD80.key, FWD80), Op("add-rule", "hairpin br/v-net-0 192.168.15.0/24"))
    with pytest.raises(BackendFailed, match="there already"):
        await fw.apply(Batch(["x"], FakePayload("full", ops)))
    assert fw.dump() == before


async def test_purge_removes_everything_once() -> None:
    fw = await installed()
    assert await fw.purge() == ["deleted table (4 entries)"]
    assert fw.dump() == "" and not fw.table
    assert await fw.purge() == []
    assert fw.calls[-2:] == [("fw.purge",), ("fw.purge",)]


async def test_faults_fail_or_hang_the_next_call_only() -> None:
    fw = await installed()
    fw.fail("observe", BackendFailed("nft: Error: Could not process rule"))
    with pytest.raises(BackendFailed):
        await fw.observe()
    assert (await fw.observe()).present
    fw.hang("apply")
    with anyio.move_on_after(0.05) as scope:
        await fw.apply(fw.plan_update(SPEC, [I.make_forward("90", "192.168.15.2:90")], []))
    assert scope.cancelled_caught
    assert "fwd/tcp/90" not in fw.dump()
    await fw.apply(fw.plan_update(SPEC, [I.make_forward("90", "192.168.15.2:90")], []))
    assert "fwd/tcp/90" in fw.dump()
