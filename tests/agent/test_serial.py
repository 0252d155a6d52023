"""``agent/serial.py``: calls run in order in one thread of their own; a caller that is
cancelled waits for its call unless it abandons it; the thread ends when idle and comes
back with the next call; closed, it takes nothing more (no root)."""

from __future__ import annotations

import threading
import time

import anyio
import pytest

from netagent.agent import serial
from netagent.agent.serial import SerialThread

from ..support.wait import until


async def test_calls_run_in_order_in_the_thread_and_answer_what_they_returned() -> None:
    worker = SerialThread("test-serial")
    seen: list[tuple[int, str]] = []
    try:

        def step(n: int) -> int:
            seen.append((n, threading.current_thread().name))
            return n * 10

        for n in range(3):
            worker.submit(step, n)
        assert await worker.call(step, 3) == 30
        assert seen == [(n, "test-serial") for n in range(4)]
        with pytest.raises(ZeroDivisionError):
            await worker.call(lambda: 1 // 0)
        worker.submit(lambda: 1 // 0)  # nobody waits: logged, and the thread goes on
        assert await worker.call(step, 5) == 50
    finally:
        worker.close()


async def test_a_cancelled_caller_waits_for_its_call_unless_it_abandons_it() -> None:
    worker = SerialThread("test-serial")
    release = threading.Event()
    done: list[str] = []
    try:

        def slow(name: str) -> str:
            release.wait(5)
            done.append(name)
            return name

        t0 = time.monotonic()
        with anyio.move_on_after(0.05):
            await worker.call(slow, "abandoned", abandon_on_cancel=True)
        assert time.monotonic() - t0 < 1.0 and done == []  # it stopped waiting at once
        release.set()
        await until(lambda: done == ["abandoned"], "the abandoned call to finish anyway")
        release.clear()
        timer = threading.Timer(0.2, release.set)
        timer.start()
        with anyio.move_on_after(0.05) as scope:
            got = await worker.call(slow, "kept")
        # the time limit fell due, and the call was waited for all the same
        assert scope.cancel_called and got == "kept" and done[-1] == "kept"
        timer.join()
    finally:
        release.set()
        worker.close()


async def test_the_thread_ends_when_idle_and_starts_again(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(serial, "IDLE", 0.05)
    worker = SerialThread("test-serial")
    assert await worker.call(lambda: 6) == 6
    first = worker._thread
    assert first is not None
    await until(lambda: worker._thread is None, "the idle thread to end")
    first.join(timeout=5)  # (it returns right after saying so)
    assert not first.is_alive()
    assert await worker.call(lambda: 7) == 7
    second = worker._thread
    assert second is not None and second is not first
    worker.close()
    assert not second.is_alive()
    with pytest.raises(RuntimeError, match="closed"):
        worker.submit(print)


async def test_a_quick_call_runs_here_when_nothing_is_queued(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``call_quick`` runs in the caller's thread when the thread has nothing to do;
    behind a queued call it waits its turn in the thread (the order holds); one that waited
    off the CPU sends the next ones to the thread for ``QUICK_BACKOFF`` seconds, twice
    as long after the next stall; time on the CPU is no stall."""
    worker = SerialThread("test-serial")
    release = threading.Event()
    order: list[tuple[str, str]] = []
    try:

        def note(what: str, wait: float = 0.0) -> str:
            if wait:
                time.sleep(wait)
            order.append((what, threading.current_thread().name))
            return what

        here = threading.current_thread().name
        assert worker.idle
        assert await worker.call_quick(note, "idle") == "idle"
        with pytest.raises(ZeroDivisionError):
            await worker.call_quick(lambda: 1 // 0)
        worker.submit(release.wait, 5)  # the thread is busy, and more is queued
        worker.submit(note, "queued")
        assert not worker.idle
        threading.Timer(0.05, release.set).start()
        assert await worker.call_quick(note, "behind") == "behind"
        assert order == [("idle", here), ("queued", "test-serial"), ("behind", "test-serial")]
        await until(lambda: worker.idle, "the thread to finish")
        monkeypatch.setattr(serial, "QUICK_LIMIT", 0.01)
        order.clear()

        def busy() -> str:  # 30 ms on the CPU (a garbage collection, say): no wait
            end = time.thread_time() + 0.03
            while time.thread_time() < end:
                pass
            return "busy"

        for _ in range(10):  # a try that this shared machine itself preempted is no proof
            t0, cpu0 = time.monotonic(), time.thread_time()
            assert await worker.call_quick(busy) == "busy"
            if time.monotonic() - t0 - (time.thread_time() - cpu0) < serial.QUICK_LIMIT / 2:
                break
            worker.slow_quick, worker._quick_after = 0, 0.0
        assert worker.slow_quick == 0
        t0 = time.monotonic()
        await worker.call_quick(note, "slow", 0.03)  # here, but it waited (off the CPU)
        await worker.call_quick(note, "after")
        assert order == [("slow", here), ("after", "test-serial")] and worker.slow_quick == 1
        assert worker._quick_after >= t0 + serial.QUICK_BACKOFF
        worker._quick_after = 0.0  # the back-off is over
        await until(lambda: worker.idle, "the thread to finish")
        t1 = time.monotonic()  # (before "again": were it preempted, its back-off counts)
        await worker.call_quick(note, "again")
        assert order[-1] == ("again", here)
        await worker.call_quick(note, "slow again", 0.03)  # twice as long a back-off now
        assert worker._quick_after >= t1 + 2 * serial.QUICK_BACKOFF
    finally:
        release.set()
        worker.close()


async def test_a_quick_start_is_done_at_once_when_the_thread_is_idle() -> None:
    """``start_quick`` (the journal's flush): with nothing queued it runs here and its
    future is done, with the result or what was raised; behind a queued call it goes to
    the thread, in order; one that waited too long sends the next to the thread."""
    worker = SerialThread("test-serial")
    worker.quick_limit = 0.5  # no stall of this shared machine's own sends these away
    release = threading.Event()
    here = threading.current_thread().name
    try:
        fut = worker.start_quick(lambda: threading.current_thread().name)
        assert fut.done() and fut.result() == here
        failed = worker.start_quick(lambda: 1 // 0)
        assert failed.done() and isinstance(failed.exception(), ZeroDivisionError)
        worker.submit(release.wait, 5)
        behind = worker.start_quick(lambda: threading.current_thread().name)
        assert not behind.done()
        release.set()
        assert await behind == "test-serial"
        await until(lambda: worker.idle, "the thread to finish")
        worker.quick_limit = 0.01
        stalled = worker.start_quick(time.sleep, 0.03)
        assert stalled.done() and worker.slow_quick == 1
        after = worker.start_quick(lambda: threading.current_thread().name)
        assert await after == "test-serial"  # backed off: in the thread
    finally:
        release.set()
        worker.close()
