"""The daemon's own full collections: only when it has been idle, and only when the
collector has been at work since (no root)."""

from __future__ import annotations

import gc
import weakref
from typing import Any

import anyio
import pytest

from netagent.agent import gcidle

from ..support.wait import until

REAL = gcidle.collect_and_freeze


@pytest.fixture(autouse=True)
def freezes(monkeypatch: pytest.MonkeyPatch) -> Any:
    """The idle collections asked for (each: whether thawed), none made."""
    # binary fractions: the fake clock's sums are exact (a look is 1/64 s, quiet 4 looks)
    monkeypatch.setattr(gcidle, "QUIET", 4 / 64)
    monkeypatch.setattr(gcidle, "CHECK", 1 / 64)
    calls: list[bool] = []

    def asked(thaw: bool) -> float:
        calls.append(thaw)
        return 0.0

    monkeypatch.setattr(gcidle, "collect_and_freeze", asked)
    return calls


class Watcher:
    """``activity()`` for the idle watcher, counting its looks: the tests wait on looks
    (a condition), never on a fixed time. Its clock is the watcher's (``gcidle.time``):
    each look is CHECK seconds later, however long the machine took."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.looks = 0
        self.activity = 0
        self.clock = 1024.0
        monkeypatch.setattr(gcidle, "time", self)

    def monotonic(self) -> float:
        return self.clock

    def __call__(self) -> int:
        self.looks += 1
        self.clock += gcidle.CHECK
        return self.activity

    async def looked(self, times: int) -> None:
        """Until the watcher has looked ``times`` more times."""
        target = self.looks + times
        await until(lambda: self.looks >= target, f"{times} more looks")


#: looks that cover QUIET several times over
PAST_QUIET = 15


async def test_busy_never_collects_and_idle_collects_once(
    freezes: list[bool], monkeypatch: pytest.MonkeyPatch
) -> None:
    runs = [0]
    monkeypatch.setattr(gcidle, "_collections", lambda: (runs[0], 0))
    w = Watcher(monkeypatch)
    async with anyio.create_task_group() as tg:
        tg.start_soon(gcidle.collect_when_idle, w)
        for _ in range(PAST_QUIET):  # busy: something happened before every look
            w.activity += 1
            runs[0] += 1  # and the collector at work
            await w.looked(1)
        assert freezes == []
        quiet_from = w.looks  # then quiet: collected once QUIET has passed, not before
        collected_at: list[int] = []

        def collect(thaw: bool) -> float:
            freezes.append(thaw)
            collected_at.append(w.looks)
            return 0.0

        monkeypatch.setattr(gcidle, "collect_and_freeze", collect)
        await until(lambda: freezes, "an idle collection")
        assert collected_at[0] - quiet_from == round(gcidle.QUIET / gcidle.CHECK)
        await w.looked(PAST_QUIET)
        assert freezes == [False]  # once (the collector has not run since), not thawed
        tg.cancel_scope.cancel()


async def test_nothing_to_do_when_the_collector_has_not_run(
    freezes: list[bool], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(gcidle, "_collections", lambda: (7, 3))
    w = Watcher(monkeypatch)
    async with anyio.create_task_group() as tg:
        tg.start_soon(gcidle.collect_when_idle, w)
        await w.looked(PAST_QUIET)  # idle all along
        assert freezes == []
        tg.cancel_scope.cancel()


class _Node:
    def __init__(self) -> None:
        self.me = self  # a cycle: only the collector frees it


def test_the_collection_freezes_what_survives_and_a_thaw_finds_frozen_garbage() -> None:
    gc.unfreeze()
    try:
        garbage = weakref.ref(_Node())
        REAL(False)
        assert garbage() is None  # collected
        assert gc.get_freeze_count() > 0  # what survived is frozen
        node = _Node()
        frozen = weakref.ref(node)
        gc.freeze()
        del node
        REAL(False)
        assert frozen() is not None  # frozen: not scanned
        REAL(True)
        assert frozen() is None  # a thaw scans it all
    finally:
        gc.unfreeze()


def test_a_pause_holds_the_collector_until_the_last_one_ends() -> None:
    assert gc.isenabled()
    try:
        first, second = gcidle.paused(), gcidle.paused()
        first.__enter__()
        second.__enter__()  # a second request's pause, overlapping the first
        assert not gc.isenabled()
        first.__exit__(None, None, None)
        assert not gc.isenabled()  # the other still builds its objects
        second.__exit__(None, None, None)
        assert gc.isenabled()
        gc.disable()  # someone else's choice is kept
        with gcidle.paused():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_a_pause_ends_frozen() -> None:
    """What a paused request built is frozen when the pause ends (the collections after
    it do not walk it again)."""
    try:
        gc.unfreeze()
        with gcidle.paused():
            built = [object() for _ in range(10)] + [[i] for i in range(1000)]
        assert gc.get_freeze_count() >= len(built) - 10  # the lists (objects are untracked)
    finally:
        gc.unfreeze()


async def test_an_apply_collects_while_its_pass_runs(tmp_path: Any) -> None:
    """``apply`` pauses the collector while it parses and records, not while its pass
    makes the kernel's side (pyroute2's cyclic messages would pile up for one long
    collection after it)."""
    from .world import make_world

    w = make_world(tmp_path)
    seen: dict[str, bool] = {}
    add_bridge = w.net.add_bridge

    async def recording(name: str, mac: str | None = None) -> None:
        seen["pass"] = gc.isenabled()
        await add_bridge(name, mac)

    w.net.add_bridge = recording  # type: ignore[method-assign]
    kind = w.state.kinds.get("bridge")
    assert kind is not None
    add = kind.add

    def parsing(state: Any, req: Any) -> Any:
        seen["parse"] = gc.isenabled()
        return add(state, req)

    kind.add = parsing  # type: ignore[method-assign]
    try:
        async with w.running():
            await w.call("apply", intents=[{"kind": "bridge", "name": "br0"}])
        assert seen == {"parse": False, "pass": True}
        assert gc.isenabled()
    finally:
        gc.unfreeze()
