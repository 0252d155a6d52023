"""``netagent ctl events --json`` as a live stream: the real CLI in its own process,
read line by line by a thread, so a test can wait for what the daemon says it did (an
interface attached, one left alone, a repair) instead of guessing how long it takes."""

from __future__ import annotations

import json
import queue
import subprocess
import threading
from collections.abc import Callable
from typing import Any

from .daemon import Daemon, netagent_argv
from .wait import wait_for

Event = dict[str, Any]


class EventStream:
    """Subscribed once the daemon's ``watching`` event has arrived, so nothing the test
    does afterwards is missed. Events are kept in arrival order in :attr:`seen`."""

    def __init__(self, d: Daemon, timeout: float = 10) -> None:
        self.proc = subprocess.Popen(
            [*netagent_argv(), "ctl", "--socket", d.socket, "events", "--json"],
            stdout=subprocess.PIPE,
            text=True,
        )
        self._queue: queue.Queue[Event] = queue.Queue()
        self.seen: list[Event] = []
        self._checked = 0  # events in ``seen`` that no wait has looked at yet begin here
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.until(
            "the event stream to be subscribed",
            lambda e: e.get("type") == "watching",
            timeout=timeout,
        )

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._queue.put(json.loads(line))

    def _drain(self) -> None:
        while True:
            try:
                self.seen.append(self._queue.get_nowait())
            except queue.Empty:
                return

    def until(self, what: str, pred: Callable[[Event], bool], timeout: float = 10) -> Event:
        """The first event not yet looked at by an earlier ``until`` that matches; events
        before it are consumed (each wait goes forward in the stream)."""

        def match() -> Event | None:
            self._drain()
            while self._checked < len(self.seen):
                event = self.seen[self._checked]
                self._checked += 1
                if pred(event):
                    return event
            return None

        return wait_for(
            f"event: {what}",
            match,
            timeout=timeout,
            detail=lambda: f"events seen: {[self.brief(e) for e in self.seen[-30:]]}",
        )

    def any_seen(self, pred: Callable[[Event], bool]) -> Event | None:
        """An event seen so far that matches, wherever it is in the stream."""
        self._drain()
        return next((e for e in self.seen if pred(e)), None)

    @staticmethod
    def brief(event: Event) -> str:
        return " ".join(
            str(event[k]) for k in ("type", "ifname", "key", "bridge") if event.get(k) is not None
        )

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._reader.join(5)  # the pipe is at its end now: the reader stops by itself
        if self.proc.stdout is not None and not self._reader.is_alive():
            self.proc.stdout.close()

    def __enter__(self) -> EventStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
