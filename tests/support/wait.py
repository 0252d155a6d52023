"""Waiting on a condition with a deadline: the one way the tests wait.

A fixed sleep before a check is too short on a loaded machine (the check fails for no
reason) and, before a check that something did *not* happen, proves nothing: the daemon
may not have looked yet. So tests wait for a condition, with a deadline, and a check
that something did not happen first waits for positive evidence that the daemon has
processed what it would have reacted to. On timeout the error says what was awaited and
what was seen last, so a failure reads as what did not happen.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

import anyio

T = TypeVar("T")

#: seconds any one wait of the in-process (unit) tests may take
LIMIT = 5.0
#: how much of the last value or error a timeout message shows
_SHOWN = 600


class WaitTimeout(AssertionError):
    """A condition did not come true in time (an assertion failure: the test fails)."""


def wait_for(
    what: str,
    predicate: Callable[[], T | None],
    *,
    timeout: float = 10.0,
    interval: float = 0.02,
    ignore: tuple[type[BaseException], ...] = (),
    detail: Callable[[], object] | None = None,
) -> T:
    """Call ``predicate`` until it returns something true, and return that.

    ``what`` names the condition for the error message. Exceptions of the types in
    ``ignore`` count as "not yet" (a daemon that is restarting refuses connections);
    any other exception propagates at once. ``detail`` is called on timeout only, to
    add context (the daemon's log, say). The predicate is always called once more at
    the deadline, so a slow first call still gets its answer checked."""
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            value = predicate()
        except ignore as exc:
            last = exc
        else:
            if value:
                return value
            last = value
        if time.monotonic() >= deadline:
            break
        time.sleep(interval)
    shown = repr(last)
    if len(shown) > _SHOWN:
        shown = shown[:_SHOWN] + " ..."
    message = f"timed out after {timeout:g} s waiting for {what}; last seen: {shown}"
    if detail is not None:
        message += f"\n{detail()}"
    raise WaitTimeout(message)


async def until(cond: Callable[[], object], what: str, timeout: float = LIMIT) -> None:
    """``wait_for`` inside an event loop (the in-process tests): polls ``cond`` every
    2 ms without blocking the loop, and fails with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise WaitTimeout(f"not within {timeout:g} s: {what}")
        await anyio.sleep(0.002)
