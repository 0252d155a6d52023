"""SharedBuild: the requests that arrive while a build runs share the next one, and none
gets an answer whose build started before it arrived."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import pytest
from anyio import wait_all_tasks_blocked

from netagent.agent.shared import SharedBuild

from ..support.wait import until
from .world import make_world


class Builds:
    def __init__(self) -> None:
        self.started = 0
        self.gates: list[anyio.Event] = []
        self.fail: Exception | None = None
        self.finished: list[int] = []

    async def build(self) -> int:
        self.started += 1
        n = self.started
        gate = anyio.Event()
        self.gates.append(gate)
        await gate.wait()
        if self.fail is not None:
            raise self.fail
        self.finished.append(n)
        return n


async def until_started(b: Builds, n: int) -> None:
    await until(lambda: b.started >= n, f"build {n} started")


async def test_those_arriving_during_a_build_share_the_next_one() -> None:
    b = Builds()
    shared = SharedBuild(b.build)
    got: dict[str, int] = {}

    async def get(name: str) -> None:
        got[name] = await shared.get()

    async with anyio.create_task_group() as tg:
        tg.start_soon(get, "first")
        await until_started(b, 1)
        for name in ("second", "third", "fourth"):  # arrive while build 1 runs
            tg.start_soon(get, name)
        await wait_all_tasks_blocked()  # each has asked and waits
        assert b.started == 1  # they wait for it to end, not build beside it
        b.gates[0].set()
        await until_started(b, 2)
        tg.start_soon(get, "late")  # arrives while build 2 runs: gets build 3
        await wait_all_tasks_blocked()
        b.gates[1].set()
        await until_started(b, 3)
        b.gates[2].set()
    assert got == {"first": 1, "second": 2, "third": 2, "fourth": 2, "late": 3}
    assert b.started == 3 and shared.shared == 2


async def test_a_failed_build_fails_its_sharers_and_the_next_call_builds_again() -> None:
    b = Builds()
    shared = SharedBuild(b.build)
    errors: list[str] = []

    async def get() -> None:
        try:
            await shared.get()
        except RuntimeError as exc:
            errors.append(str(exc))

    b.fail = RuntimeError("the kernel did not answer")
    async with anyio.create_task_group() as tg:
        tg.start_soon(get)
        await until_started(b, 1)
        tg.start_soon(get)
        tg.start_soon(get)
        b.gates[0].set()
        await until_started(b, 2)
        b.gates[1].set()
    assert errors == ["the kernel did not answer"] * 3
    b.fail = None
    async with anyio.create_task_group() as tg:
        tg.start_soon(get)
        await until_started(b, 3)
        b.gates[2].set()
    assert b.started == 3 and len(errors) == 3


async def test_a_caller_that_goes_away_does_not_take_the_build_from_the_others() -> None:
    b = Builds()
    shared = SharedBuild(b.build)
    got: list[int] = []
    scopes: list[anyio.CancelScope] = []

    async def leaver() -> None:
        with anyio.CancelScope() as scope:
            scopes.append(scope)
            await shared.get()

    async def stayer() -> None:
        got.append(await shared.get())

    async with anyio.create_task_group() as tg:
        tg.start_soon(leaver)
        await until_started(b, 1)
        tg.start_soon(stayer)
        await wait_all_tasks_blocked()
        scopes[0].cancel()  # the builder's client left: its build goes on for the next
        await wait_all_tasks_blocked()  # the cancellation delivered
        b.gates[0].set()
        await until_started(b, 2)
        b.gates[1].set()
    assert got == [2] and b.finished == [1, 2]


async def test_shows_asked_together_share_a_build_and_none_is_older_than_its_request(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    w = make_world(tmp_path)
    async with w.running():
        await w.call("ns.add", name="red")
        counters = w.api.traffic.show
        gate = [anyio.Event()]

        async def held(items: Any) -> None:  # the kernel's counters, answered when let
            await gate[0].wait()
            await counters(items)

        monkeypatch.setattr(w.api.traffic, "show", held)
        replies: list[dict[str, Any]] = []

        async def show() -> None:
            replies.append(await w.call("show"))

        async with anyio.create_task_group() as tg:
            for _ in range(20):
                tg.start_soon(show)
            await wait_all_tasks_blocked()  # the first build runs, the 19 others wait
            gate[0].set()
        # the first builds alone; of the 19 asked meanwhile one builds, 18 share it
        assert len(replies) == 20 and w.api._shows.shared == 18
        assert all(r["intents"] == replies[0]["intents"] for r in replies)
        # asked after a change: the change is in it, whatever was being built before
        gate[0] = anyio.Event()
        replies.clear()
        async with anyio.create_task_group() as tg:
            tg.start_soon(show)
            await wait_all_tasks_blocked()  # its build waits for the counters
            await w.call("ns.add", name="blue")
            tg.start_soon(show)
            await wait_all_tasks_blocked()
            gate[0].set()
        assert len(replies) == 2
        late = replies[-1]
        assert {i["key"] for i in late["intents"]} == {"ns/red", "ns/blue"}
        assert {i["key"] for i in replies[0]["intents"]} == {"ns/red"}
