"""The daemon's own full collections: only when it has been idle, and only when the
collector has been at work since (no root)."""

from __future__ import annotations

import gc
import weakref
from typing import Any

import anyio
import pytest

from netagent.agent import gcidle

REAL = gcidle.collect_and_freeze


@pytest.fixture(autouse=True)
def freezes(monkeypatch: pytest.MonkeyPatch) -> Any:
    """The idle collections asked for (each: whether thawed), none made."""
    monkeypatch.setattr(gcidle, "QUIET", 0.05)
    monkeypatch.setattr(gcidle, "CHECK", 0.01)
    calls: list[bool] = []

    def asked(thaw: bool) -> float:
        calls.append(thaw)
        return 0.0

    monkeypatch.setattr(gcidle, "collect_and_freeze", asked)
    return calls


async def _run_for(seconds: float, activity: Any) -> None:
    with anyio.move_on_after(seconds):
        await gcidle.collect_when_idle(activity)


async def test_busy_never_collects_and_idle_collects_once(
    freezes: list[bool], monkeypatch: pytest.MonkeyPatch
) -> None:
    now = {"collector runs": 0, "activity": 0}
    monkeypatch.setattr(gcidle, "_collections", lambda: (now["collector runs"], 0))
    async with anyio.create_task_group() as tg:
        tg.start_soon(gcidle.collect_when_idle, lambda: now["activity"])
        for _ in range(30):  # busy: something happens at every look, the collector runs
            now["activity"] += 1
            now["collector runs"] += 1
            await anyio.sleep(0.01)
        assert freezes == []
        await anyio.sleep(0.3)  # then quiet
        assert freezes == [False]  # once (the collector has not run since), not thawed
        tg.cancel_scope.cancel()


async def test_nothing_to_do_when_the_collector_has_not_run(
    freezes: list[bool], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(gcidle, "_collections", lambda: (7, 3))
    await _run_for(0.3, lambda: 0)
    assert freezes == []


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
