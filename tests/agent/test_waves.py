"""Waves (``agent/waves.py``): a recreated bridge's plugs are ensured at once, never two
that act in one namespace, and the pass records them as it would one after the other.

Over the fakes (``tests/agent/world.py``); each plug's ensure is held open a moment so
that the ones running together can be seen together.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import anyio
import pytest

from netagent.agent import waves
from netagent.agent.keystatus import IN_PLACE

from ..support.wait import LIMIT
from .world import World, make_world

NAMESPACES = ("red", "blue", "green", "grey")
BRIDGES = ("v-net-0", "v-net-1")


def plug_key(ns: str, bridge: str) -> str:
    return f"plug/{ns}/{bridge}"


async def built(tmp_path: Path) -> World:
    """Four namespaces plugged into v-net-0; red into v-net-1 as well."""
    w = make_world(tmp_path)
    async with w.running():
        for i, br in enumerate(BRIDGES):
            await w.call("bridge.add", name=br, addresses=[f"192.168.{15 + i}.5/24"])
        for i, ns in enumerate(NAMESPACES):
            await w.call("ns.add", name=ns)
            await w.call("plug.add", ns=ns, bridge="v-net-0", addresses=[f"192.168.15.{i + 1}/24"])
        await w.call("plug.add", ns="red", bridge="v-net-1", addresses=["192.168.16.1/24"])
    return w


def watch_ensures(w: World, monkeypatch: pytest.MonkeyPatch, name: str = "plug") -> dict[str, Any]:
    """Record which ensures of kind ``name`` run together: each one's key is in ``active``
    for as long as its ensure lasts (held open for a few turns of the loop: the others
    started beside it enter meanwhile; one started after it cannot)."""
    kind = w.state.kinds.get(name)
    assert kind is not None and kind.at_once
    seen: dict[str, Any] = {"active": set(), "together": [], "calls": []}
    real = kind.ensure

    async def ensure(ctx: Any, intent: Any, old: Any) -> list[str]:
        seen["calls"].append(intent.key)
        seen["active"].add(intent.key)
        seen["together"].append(frozenset(seen["active"]))
        try:
            for _ in range(3):
                await anyio.lowlevel.checkpoint()
            return await real(ctx, intent, old)
        finally:
            seen["active"].discard(intent.key)

    monkeypatch.setattr(kind, "ensure", ensure)
    return seen


async def test_a_recreated_bridge_brings_its_plugs_back_at_once_never_two_of_a_namespace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    w = await built(tmp_path)
    seen = watch_ensures(w, monkeypatch)
    for br in BRIDGES:  # someone deletes both bridges
        await w.net.del_link(None, w.link(br).index)
        w.rec.drift(f"br/{br}", f"{br} was deleted")
    with anyio.fail_after(LIMIT):
        result = await w.rec.run_until_idle("event")
    assert result.errors == {}
    v0 = {plug_key(ns, "v-net-0") for ns in NAMESPACES}
    # the four plugs of v-net-0 ran together; red's second plug (the same namespace:
    # both look for its default route) not beside red's first
    assert max(len(t) for t in seen["together"]) == len(NAMESPACES)
    assert any(t == v0 for t in seen["together"])
    for together in seen["together"]:
        spaces = [key.split("/")[1] for key in together]
        assert len(spaces) == len(set(spaces)), f"two plugs of one namespace at once: {together}"
    # recorded in the pass's order, as one after the other would be
    plugs = [k for k in result.actions if k.startswith("plug/")]
    assert plugs == [*sorted(v0), plug_key("red", "v-net-1")]
    for ns, br in itertools.chain(((ns, "v-net-0") for ns in NAMESPACES), [("red", "v-net-1")]):
        assert result.actions[plug_key(ns, br)] == [
            f"enslave {w.state.get(plug_key(ns, br)).host_ifname} to {br}"  # type: ignore[union-attr]
        ]
        host = w.state.get(plug_key(ns, br)).host_ifname  # type: ignore[union-attr]
        assert w.link(host).master == w.link(br).index
        assert w.rec.status[plug_key(ns, br)].state == IN_PLACE


async def test_plugs_that_find_their_bridge_gone_together_are_tried_again_together(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The kernel announces the ports leaving before the bridge goes: a pass can start
    with the plugs alone. They fail together for want of the bridge; that is no failure
    of theirs: the bridge is ensured, then they are tried again, at once again."""
    w = await built(tmp_path)
    seen = watch_ensures(w, monkeypatch)
    await w.net.del_link(None, w.link("v-net-0").index)
    v0 = sorted(plug_key(ns, "v-net-0") for ns in NAMESPACES)
    w.rec.mark(v0)
    with anyio.fail_after(LIMIT):
        result = await w.rec.run_until_idle("event")
    assert result.errors == {} and w.published("error") == []
    assert result.actions["br/v-net-0"][0] == "create bridge v-net-0"
    assert sorted(seen["calls"]) == sorted(v0 * 2)  # each tried twice, no more
    assert seen["together"].count(frozenset(v0)) == 2  # both times all four at once
    assert all(w.rec.status[k].state == IN_PLACE for k in v0)


async def test_a_wave_holds_at_most_WAVE_keys(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    w = await built(tmp_path)
    seen = watch_ensures(w, monkeypatch)
    monkeypatch.setattr(waves, "WAVE", 3)
    await w.net.del_link(None, w.link("v-net-0").index)
    w.rec.drift("br/v-net-0", "v-net-0 was deleted")
    with anyio.fail_after(LIMIT):
        result = await w.rec.run_until_idle("event")
    assert result.errors == {}
    assert [len(t) for t in seen["together"]] == [1, 2, 3, 1]  # a wave of 3, then 1
    assert all(w.rec.status[plug_key(ns, "v-net-0")].state == IN_PLACE for ns in NAMESPACES)


async def test_namespaces_asked_for_together_are_made_together(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    w = make_world(tmp_path)
    seen = watch_ensures(w, monkeypatch, "ns")
    items = [{"kind": "ns", "name": ns} for ns in NAMESPACES]
    async with w.running():
        await w.call("apply", intents=items)
    assert frozenset(f"ns/{ns}" for ns in NAMESPACES) in seen["together"]
    assert sorted(w.net.ns_names()) == sorted(NAMESPACES)
    assert all(w.rec.status[f"ns/{ns}"].state == IN_PLACE for ns in NAMESPACES)
