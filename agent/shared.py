"""One build of an answer for every request that arrived while the previous one ran.

``show`` of a few thousand intents is ~30-60 ms of the loop to build. Sixty clients that
poll it each had their own build: the loop spent its time building the same answer
again and again, and each ``show`` waited seconds behind the others. Here a request
never gets an answer whose build started before it arrived (nothing older than the
request is told), and every request that arrived while a build ran shares the next
one: at most one build runs, and a request waits for at most the one running and its
own.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

import anyio

T = TypeVar("T")


class SharedBuild(Generic[T]):
    """``await get()``: the result of a ``build()`` that started after the call."""

    def __init__(self, build: Callable[[], Awaitable[T]]) -> None:
        self._build = build
        self._started = 0  # builds started so far
        self._current: tuple[int, asyncio.Future[T]] | None = None
        #: how many callers were answered by a build another caller started
        self.shared = 0

    async def get(self) -> T:
        arrived = self._started
        while True:
            current = self._current
            if current is not None and current[0] > arrived:
                self.shared += 1
                return await asyncio.shield(current[1])  # started after this call
            if current is not None and not current[1].done():
                await asyncio.wait([current[1]])  # too old for this call: the next one
                continue
            return await self._run()

    async def _run(self) -> T:
        self._started += 1
        fut: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        # a failure nobody else waits for is not "never retrieved"
        fut.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._current = (self._started, fut)
        try:
            with anyio.CancelScope(shield=True):  # the others wait for it too
                result = await self._build()
        except Exception as exc:
            fut.set_exception(exc)
            raise
        except BaseException:
            fut.cancel()
            raise
        fut.set_result(result)
        return result
