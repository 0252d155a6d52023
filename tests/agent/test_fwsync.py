"""``FirewallSync`` over the fake firewall: the counters spare the conntrack walk for a
removed forward that never carried a connection, and only when they can say so.

The conntrack client is a recording stand-in (the real one is a netlink socket: its own
tests are privileged); the number of walks is what the counters should cut.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from netagent.agent.errors import BackendFailed

from ..support.wait import until
from .world import World, make_world

F80: dict[str, Any] = {"host_ports": "80", "destination": "192.168.15.1:80"}
F81: dict[str, Any] = {"host_ports": "81", "destination": "192.168.15.1:81"}
F82: dict[str, Any] = {"host_ports": "82", "destination": "192.168.15.1:82"}


class Walks:
    """Stands in for ``backends.conntrack.Conntrack``: counts the dumps asked for."""

    def __init__(self) -> None:
        self.flows: list[set[tuple[int, int, bytes, int]]] = []

    async def clear_flows(self, family: int, flows: set[tuple[int, int, bytes, int]]) -> dict:  # type: ignore[type-arg]
        self.flows.append(set(flows))
        return {}

    def close(self) -> None:
        pass


def with_walks(tmp_path: Path) -> tuple[World, Walks]:
    w = make_world(tmp_path)
    walks = Walks()
    w.sync.conntrack = True
    w.sync._client = walks  # type: ignore[assignment]
    return w, walks


def ports(walks: Walks) -> list[list[int]]:
    return [sorted(f[1] for f in flows) for flows in walks.flows]


async def test_an_idle_forward_is_removed_without_a_walk(tmp_path: Path) -> None:
    w, walks = with_walks(tmp_path)
    async with w.running():
        await w.call("forward.add", **F80)  # the first sync is a full one: not counted
        await w.call("forward.add", **F81)  # an update: counted from its first packet
        await w.call("forward.add", **F82)
        w.fw.carry("fwd/tcp/82")  # a connection went through 82
        await w.call("forward.del", host_ports="81")
        assert walks.flows == []  # 81 never carried one: no walk
        assert w.sync.walks_skipped == 1
        await w.call("forward.del", host_ports="82")
        await w.call("forward.del", host_ports="80")  # its counter is older than this run
        assert ports(walks) == [[82], [80]]


async def test_a_rebuild_makes_counters_start_over_so_every_removal_walks(
    tmp_path: Path,
) -> None:
    w, walks = with_walks(tmp_path)
    async with w.running():
        await w.call("forward.add", **F80)
        await w.call("forward.add", **F81)
        w.fw.drop_table()  # someone flushed the ruleset: flows of 81 may still be tracked
        w.sync.drifted("flush")
        w.rec.drift("firewall", "flush")
        await w.call("forward.add", **F82)  # this pass rebuilds the table
        await w.call("forward.del", host_ports="81")
        assert ports(walks) == [[81]]


async def test_counters_that_cannot_be_read_mean_a_walk(tmp_path: Path) -> None:
    w, walks = with_walks(tmp_path)
    async with w.running():
        await w.call("forward.add", **F80)
        await w.call("forward.add", **F81)
        w.fw.fail("counters", BackendFailed("no counters today"))
        await w.call("forward.del", host_ports="81")
        assert ports(walks) == [[81]]


async def test_a_drift_while_a_sync_runs_is_repaired_by_the_next(tmp_path: Path) -> None:
    """Another tool flushes the rules while a sync is applying (the second of two `nft
    flush ruleset` in a row, during the repair of the first): the drift asks for a full
    sync, and the sync that was running must not clear that request when it ends. It
    once did: the next pass changed nothing, the rules stayed gone, `status` said all
    was in place."""
    from netagent.agent.main import on_drift

    w = make_world(tmp_path)
    async with w.running():
        await w.call("forward.add", **F80)
        real_apply = w.fw.apply
        flushed: list[bool] = []

        async def apply_then_flushed(batch: Any) -> None:
            await real_apply(batch)
            if not flushed:  # as this sync's apply returns, someone flushes everything
                flushed.append(True)
                w.fw.drop_table()
                on_drift(w.rec, w.sync, w.bus, "the rules were flushed")

        w.fw.apply = apply_then_flushed  # type: ignore[method-assign]
        await w.call("forward.add", **F81)
        await until(
            lambda: {"fwd/tcp/80", "fwd/tcp/81"} <= set(w.fw.forwards), "both forwards back"
        )
        assert flushed and w.fw.table


async def test_an_update_gets_a_lean_spec_and_a_failed_one_a_full_sync_of_all(
    tmp_path: Path,
) -> None:
    """A backend whose update reads no forwards (nftables, the fake) is given none (a
    copy of 10,000 per change costs ~0.1 ms); when the update fails, the full sync that
    follows plans every forward."""
    w = make_world(tmp_path)
    async with w.running():
        await w.call("forward.add", **F80)  # the first sync is a full one
        specs: list[Any] = []
        real_update, real_plan = w.fw.plan_update, w.fw.plan

        def update(spec: Any, added: Any, removed: Any) -> Any:
            specs.append(("update", spec))
            return real_update(spec, added, removed)

        def plan(spec: Any, observed: Any) -> Any:
            specs.append(("plan", spec))
            return real_plan(spec, observed)

        w.fw.plan_update = update  # type: ignore[method-assign]
        w.fw.plan = plan  # type: ignore[method-assign]
        await w.call("forward.add", **F81)
        ((what, spec),) = specs
        assert what == "update" and spec.forwards == () and spec.lean_count == 2
        assert not spec.empty
        specs.clear()
        w.fw.drop_forward("fwd/tcp/80")  # someone deleted one: the next update fails
        w.fw.fail("apply", BackendFailed("nft: No such file or directory"))
        await w.call("forward.del", host_ports="80")
        assert [s[0] for s in specs] == ["update", "plan"]
        assert {f.key for f in specs[1][1].forwards} == {"fwd/tcp/81"}
        assert set(w.fw.forwards) == {"fwd/tcp/81"}


async def test_a_lean_update_tells_the_filter_chains_every_destination(tmp_path: Path) -> None:
    """The filter chains accept forwarded traffic to each destination outside the
    bridges: a lean update (no forwards in its spec) still tells them every destination,
    each once, from the desired state's index, as it changes."""
    from netagent.backends.xtfilter import FilterChains, outside_bridges

    w = make_world(tmp_path)
    filters = FilterChains()
    filters.targets = lambda guard: []  # type: ignore[method-assign]
    seen: list[tuple[int, list[str]]] = []
    real_sync = filters.sync

    async def sync(spec: Any, look: bool) -> list[str]:
        seen.append((len(spec.forwards), [str(ip) for ip in outside_bridges(spec, 4)]))
        return await real_sync(spec, look)

    filters.sync = sync  # type: ignore[method-assign]
    w.sync.filters = filters
    async with w.running():
        await w.call("forward.add", **F80)  # the first sync is a full one
        await w.call("forward.add", **F81)  # the same destination
        await w.call("forward.add", host_ports="90", destination="192.168.16.7:90")
        await w.call("forward.del", host_ports="80")
        await w.call("forward.del", host_ports="81")
        assert seen == [
            (1, ["192.168.15.1"]),
            (0, ["192.168.15.1"]),
            (0, ["192.168.15.1", "192.168.16.7"]),
            (0, ["192.168.15.1", "192.168.16.7"]),
            (0, ["192.168.16.7"]),
        ]
