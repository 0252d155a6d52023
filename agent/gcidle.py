"""The garbage collector's full passes, moved to moments when the daemon is idle.

A full collection (generation 2) scans every object that has lived long: the intents and
their indexes, the reconciler's status, the link cache, the doctor's last reading. It
stops the event loop while it runs, wherever the interpreter starts it: with 600
namespaces and 1,000 forwards, ``make bench SECTIONS=doctor`` saw nine of 2-28 ms (180 ms
in all) in the middle of requests, and the loop's lag p99 was 12.7 ms.

So when the daemon has been idle for :data:`QUIET` seconds (no request, no reconcile
pass) and the collector has been at work since the last time, the daemon collects in
full itself and freezes what survives (:func:`gc.freeze`): frozen objects are left out of
the collector's scans but still freed by their reference counts, so the interpreter's own
full passes scan only what is newer. An idle collection scans what is not frozen yet
(a few milliseconds); every :data:`THAW_EVERY` seconds one unfreezes first and scans it
all (~90 ms in that benchmark, at a moment nothing waits), so cyclic garbage among frozen
objects is found too.
"""

from __future__ import annotations

import contextlib
import gc
import time
from collections.abc import Callable, Iterator

import anyio
import structlog

log = structlog.get_logger("netagent.gc")

#: seconds without requests or passes before the daemon counts as idle
QUIET = 2.0
#: how often to look, seconds
CHECK = 1.0
#: seconds between idle collections that scan the frozen objects too
THAW_EVERY = 600.0


_paused = 0
_was_enabled = True


@contextlib.contextmanager
def paused() -> Iterator[None]:
    """No collection while a big request builds its objects (``apply`` of 10,000
    forwards makes ~200,000, and the collector ran ~300 times in it, three of them full:
    ~80 ms of ~550). Nested and concurrent uses share one pause; when the last ends,
    what is there is frozen and the collector runs again (the idle collection's thaw
    finds any cycle among the frozen). Keep the kernel's work out of it: pyroute2's
    messages are cyclic garbage, and an apply that paused through its pass of 600 plugs
    left 390,000 of them to one collection of 300 ms on the loop."""
    global _paused, _was_enabled
    if _paused == 0:
        _was_enabled = gc.isenabled()
    _paused += 1
    gc.disable()
    try:
        yield
    finally:
        _paused -= 1
        if _paused == 0:
            # what the request built lives on (intents, their indexes): frozen, the
            # collections in the pass that follows do not walk those ~200,000 objects
            gc.freeze()
            if _was_enabled:
                gc.enable()


def _collections() -> tuple[int, int]:
    """How many generation-1 and -2 collections the interpreter has run."""
    stats = gc.get_stats()
    return stats[1]["collections"], stats[2]["collections"]


def collect_and_freeze(thaw: bool) -> float:
    """Collect in full (all of it with ``thaw``: unfrozen first), freeze what survives;
    the seconds it took."""
    t0 = time.perf_counter()
    if thaw:
        gc.unfreeze()
    gc.collect()
    gc.freeze()
    return time.perf_counter() - t0


async def collect_when_idle(activity: Callable[[], object]) -> None:
    """Runs until cancelled. ``activity()`` changes whenever the daemon did something
    (a request served, a pass run): the daemon is idle once it has not changed for
    QUIET seconds."""
    seen = activity()
    since = thawed = time.monotonic()
    done = _collections()
    while True:
        await anyio.sleep(CHECK)
        now, current = time.monotonic(), activity()
        if current != seen:
            seen, since = current, now
            continue
        if now - since < QUIET or _collections() == done:
            continue  # busy lately, or nothing has lived long enough to matter since
        thaw = now - thawed >= THAW_EVERY
        took = collect_and_freeze(thaw)
        if thaw:
            thawed = now
        done = _collections()
        log.debug(
            "idle full collection",
            ms=round(took * 1000, 1),
            thawed=thaw,
            frozen=gc.get_freeze_count(),
        )
