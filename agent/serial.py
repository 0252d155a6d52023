"""One thread of its own for a resource used one call at a time: the journal's disk
writes, libnftables' handle, the kernel sends of link requests.

``anyio.to_thread`` hands a call to a pool through a capacity limiter, a queue and a
condition, and its answer back: ~80 us a hop on this machine, where a thread of its own
waiting on a ``SimpleQueue`` and answering with ``call_soon_threadsafe`` is ~30 us. A
request that hops twice (the journal's fdatasync, then the nft commit of its pass) felt
it: adding a forward, 300 in a sandbox, 1.73-1.75 ms p50 through the pool, 1.44-1.51 ms
through such threads. Calls run in the order given, which is what those resources need
anyway (one libnftables handle; a journal's lines in order).

The thread ends after :data:`IDLE` seconds without work and starts again with the next
call, so an object that is dropped leaves no thread behind.

A call that is nearly always short (one nf_tables element, ~0.03 ms; a journal line's
flush on a disk that flushes in ~0.3 ms) costs more in the hop than in its work:
:meth:`SerialThread.call_quick` (and :meth:`SerialThread.start_quick`, for a call whose
result is awaited later) runs it in the caller's thread when nothing is queued for the
thread (the order holds). One that waited (off the CPU) longer than :data:`QUICK_LIMIT`
(or the thread's own ``quick_limit``), the kernel's commit mutex held by another
process's transaction or a slow disk, stalled the caller that long: the next such calls
go to the thread for :data:`QUICK_BACKOFF` seconds, twice as long after each stall, up
to :data:`QUICK_BACKOFF_MAX` (a host whose other tools make big transactions, or whose
disk is slow, settles in the thread). Time on the CPU (a garbage collection in the
middle) is not waiting.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import anyio
import structlog

log = structlog.get_logger("netagent.serial")

T = TypeVar("T")
#: seconds without work after which the thread ends (the next call starts one)
IDLE = 30.0
#: a quick call in the caller's thread that waited longer (s) sends the next to the thread
QUICK_LIMIT = 0.002
#: for this long (s) after the first stall, doubled after each one, up to the max
QUICK_BACKOFF = 30.0
QUICK_BACKOFF_MAX = 3600.0

_Job = tuple[Callable[..., Any], tuple[Any, ...]]


class SerialThread:
    """Runs calls one after the other, in the order given, in a thread of its own."""

    def __init__(self, name: str, quick_limit: float | None = None) -> None:
        self.name = name
        #: a quick call that waited longer (s) sends the next to the thread (None:
        #: QUICK_LIMIT)
        self.quick_limit = quick_limit
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._closed = False
        #: calls given and not yet finished (read without the lock: a hint)
        self._pending = 0
        #: no quick call in the caller's thread before this (``time.monotonic``)
        self._quick_after = 0.0
        self._quick_backoff = QUICK_BACKOFF
        #: quick calls that were slow (each sent the next ones to the thread)
        self.slow_quick = 0

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        """Call ``fn(*args)`` in the thread, after what was given before; what it raises
        is logged (nobody waits for it)."""
        with self._lock:
            if self._closed:
                raise RuntimeError(f"{self.name} is closed")
            self._jobs.put((fn, args))
            self._pending += 1
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
                self._thread.start()

    def start(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """``fn(*args)`` in the thread, given now; the future of its result (or of what
        it raised), to await later (a journal's sync beside the pass it covers)."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()

        def job() -> None:
            try:
                result = fn(*args)
            except BaseException as exc:  # the caller's to handle
                loop.call_soon_threadsafe(_settle, fut, None, exc)
            else:
                loop.call_soon_threadsafe(_settle, fut, result, None)

        self.submit(job)
        return fut

    async def call(self, fn: Callable[..., T], *args: Any, abandon_on_cancel: bool = False) -> T:
        """``fn(*args)`` in the thread: its result, or what it raised. Cancelled meanwhile
        (a time limit), the caller waits for the call to end unless ``abandon_on_cancel``
        (then it goes on, and the calls after it wait for it)."""
        fut = self.start(fn, *args)
        if abandon_on_cancel:
            return await fut
        with anyio.CancelScope(shield=True):
            result = await fut
        return result

    @property
    def idle(self) -> bool:
        """Nothing given is waiting or running (a hint, read without the lock)."""
        return not self._pending

    async def call_quick(
        self, fn: Callable[..., T], *args: Any, abandon_on_cancel: bool = False
    ) -> T:
        """``fn(*args)``, a call that is nearly always short: right here when nothing is
        queued for the thread and no such call stalled lately, else as :meth:`call`."""
        if not self._quick_now():
            return await self.call(fn, *args, abandon_on_cancel=abandon_on_cancel)
        return self._here(fn, args)

    def start_quick(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """:meth:`start` for a call that is nearly always short: when :meth:`call_quick`
        would run it here, it runs now and its future is done (with what it returned or
        raised), else it goes to the thread."""
        if not self._quick_now():
            return self.start(fn, *args)
        fut: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        try:
            fut.set_result(self._here(fn, args))
        except Exception as exc:  # the caller's, through the future, as from the thread
            fut.set_exception(exc)
        return fut

    def back_off(self) -> float:
        """Send the quick calls of the next while to the thread, as a quick call that
        stalled does: for QUICK_BACKOFF seconds, twice as long each time, up to
        QUICK_BACKOFF_MAX. The seconds."""
        backoff = self._quick_backoff
        self._quick_after = time.monotonic() + backoff
        self._quick_backoff = min(backoff * 2, QUICK_BACKOFF_MAX)
        return backoff

    def _quick_now(self) -> bool:
        return not self._pending and time.monotonic() >= self._quick_after

    def _here(self, fn: Callable[..., T], args: tuple[Any, ...]) -> T:
        """``fn(*args)`` in the caller's thread; one that waited (off the CPU) longer
        than the quick limit sends the next quick calls to the thread for a while."""
        t0, cpu0 = time.monotonic(), time.thread_time()
        try:
            return fn(*args)
        finally:
            took = time.monotonic() - t0
            waited = took - (time.thread_time() - cpu0)
            limit = QUICK_LIMIT if self.quick_limit is None else self.quick_limit
            if waited > limit:
                self.slow_quick += 1
                backoff = self.back_off()
                log.info(
                    "a quick call waited; the next go to the thread",
                    thread=self.name,
                    took_ms=round(took * 1000, 1),
                    waited_ms=round(waited * 1000, 1),
                    for_s=backoff,
                )

    def _run(self) -> None:
        while True:
            try:
                job = self._jobs.get(timeout=IDLE)
            except queue.Empty:
                with self._lock:
                    if self._jobs.empty():
                        self._thread = None
                        return
                continue
            if job is None:
                return
            fn, args = job
            try:
                fn(*args)
            except Exception:  # a bug: the thread goes on with what is queued
                log.exception("a queued call failed", thread=self.name)
            finally:
                with self._lock:
                    self._pending -= 1

    def close(self, timeout: float = 5.0) -> None:
        """Let what was given run, then end the thread (waiting ``timeout`` s at most)."""
        with self._lock:
            self._closed = True
            thread = self._thread
            if thread is not None:
                self._jobs.put(None)
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=timeout)


def _settle(fut: asyncio.Future[T], result: T | None, exc: BaseException | None) -> None:
    if fut.done():  # the caller stopped waiting (cancelled, abandoned)
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(result)  # type: ignore[arg-type]
