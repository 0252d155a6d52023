"""Fault injection shared by the fakes (``FakeNetlink``, ``FakeFirewall``): a test queues
what the next call of an operation does, raise or never answer, and the fake's method
awaits ``_fault(op)`` first. Unit tests only; the daemon never imports this."""

from __future__ import annotations

import anyio


class Faults:
    """A queue of faults per operation name; each call of that operation takes one."""

    def __init__(self) -> None:
        self._faults: dict[str, list[BaseException | None]] = {}

    def fail(self, op: str, exc: BaseException) -> None:
        """The next call of ``op`` raises ``exc``."""
        self._faults.setdefault(op, []).append(exc)

    def hang(self, op: str) -> None:
        """The next call of ``op`` never answers (until cancelled)."""
        self._faults.setdefault(op, []).append(None)

    async def _fault(self, op: str) -> None:
        queue = self._faults.get(op)
        if not queue:
            return
        exc = queue.pop(0)
        if exc is None:
            await anyio.sleep_forever()
        else:
            raise exc
