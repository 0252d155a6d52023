"""The reconciler's sleep that a ring ends early (``agent/alarm.py``). No root."""

from __future__ import annotations

import asyncio
import time

import anyio
import pytest

from netagent.agent.alarm import Alarm

from ..support.wait import LIMIT, until


def test_a_ring_ends_the_sleep_at_once() -> None:
    async def main() -> float:
        alarm = Alarm()
        loop = asyncio.get_running_loop()
        loop.call_later(0.01, alarm.ring)
        t0 = time.monotonic()
        with anyio.fail_after(LIMIT):
            await alarm.sleep(LIMIT * 2)  # would outlast the limit unless rung
        return time.monotonic() - t0

    assert anyio.run(main) < LIMIT


def test_without_a_ring_it_sleeps_its_time() -> None:
    async def main() -> float:
        alarm = Alarm()
        t0 = time.monotonic()
        await alarm.sleep(0.05)
        return time.monotonic() - t0

    assert anyio.run(main) >= 0.05


def test_a_ring_while_nobody_sleeps_is_not_kept() -> None:
    async def main() -> None:
        alarm = Alarm()
        alarm.ring()  # the sleeper looks at its work before it sleeps: this is no news
        sleeping = asyncio.ensure_future(alarm.sleep(LIMIT * 2))
        await until(lambda: alarm._waiter is not None, "the sleep begun")
        waiter = alarm._waiter
        assert waiter is not None and not waiter.done()  # a kept ring would have ended it
        assert not sleeping.done()
        alarm.ring()
        with anyio.fail_after(LIMIT):
            await sleeping

    anyio.run(main)


def test_a_cancelled_sleep_leaves_no_timer_and_can_sleep_again() -> None:
    async def main() -> None:
        alarm = Alarm()
        loop = asyncio.get_running_loop()
        before = len(loop._scheduled)  # type: ignore[attr-defined]
        with anyio.move_on_after(0.01):
            await alarm.sleep(LIMIT * 2)
        live = [h for h in loop._scheduled if not h.cancelled()]  # type: ignore[attr-defined]
        assert len(live) <= before
        loop.call_later(0.01, alarm.ring)
        with anyio.fail_after(LIMIT):
            await alarm.sleep(LIMIT * 2)
        alarm.ring()  # after the sleep: nothing to end, no error

    anyio.run(main)


@pytest.mark.parametrize("seconds", [0.0, -1.0])
def test_a_sleep_of_no_time_returns(seconds: float) -> None:
    async def main() -> None:
        with anyio.fail_after(LIMIT):
            await Alarm().sleep(seconds)

    anyio.run(main)
