"""What the agent sees and does, fanned out to ``ctl events`` watchers.

Each watcher has its own bounded buffer. Publishing never waits: a watcher that reads too
slowly loses events (and is told how many) instead of stalling the daemon.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

import anyio

BUFFER = 1024


class Watcher:
    def __init__(self) -> None:
        self.queue: deque[dict[str, Any]] = deque()
        self.dropped = 0
        self.wakeup = anyio.Event()

    def push(self, event: dict[str, Any]) -> None:
        if len(self.queue) >= BUFFER:
            self.dropped += 1
            return
        self.queue.append(event)
        self.wakeup.set()

    async def next_batch(self) -> list[dict[str, Any]]:
        while not self.queue and not self.dropped:
            self.wakeup = anyio.Event()
            await self.wakeup.wait()
        batch = list(self.queue)
        self.queue.clear()
        if self.dropped:
            batch.append(
                {
                    "ts": time.time(),
                    "type": "lagged",
                    "dropped": self.dropped,
                    "message": f"this watcher was too slow: {self.dropped} events dropped",
                }
            )
            self.dropped = 0
        return batch


class EventBus:
    def __init__(self, listeners: Iterable[Callable[[dict[str, Any]], None]] = ()) -> None:
        self.watchers: set[Watcher] = set()
        self.recent: deque[dict[str, Any]] = deque(maxlen=200)
        #: called with every event, at once, never dropping one (the metrics' probe)
        self.listeners = tuple(listeners)

    def publish(self, type_: str, message: str, **fields: Any) -> None:
        event = {"ts": time.time(), "type": type_, "message": message, **fields}
        self.recent.append(event)
        for listener in self.listeners:
            listener(event)
        for w in list(self.watchers):
            w.push(event)

    def subscribe(self) -> Watcher:
        w = Watcher()
        self.watchers.add(w)
        return w

    def unsubscribe(self, w: Watcher) -> None:
        self.watchers.discard(w)
