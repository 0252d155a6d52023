"""Long loops on the event loop take turns by time, not by count.

A count (every 32 datagrams, every 32 links) is a guess at a duration, and the guess is
wrong when the items grow (a datagram of 60 events, a bridge's link message with its
ports) or the machine is busy: the loop's lag (``agent/lag.py``) is the longest stretch
nothing else ran. A loop that checks :meth:`Turns.due` per item lets the loop run what is
ready once it has held it :data:`SLICE` seconds (a clock read per item, ~50 ns).
"""

from __future__ import annotations

import time

#: seconds a loop holds the event loop before it lets what is ready run. The loop's lag
#: is about two turns back to back (what is ready when a sample falls due, then the
#: sample's own wait): with 2 ms turns and the default switch interval the lag p99 under
#: `make bench`'s burst was 3-7 ms, with 1 ms turns and a 1 ms interval (``agent/main.py``)
#: 2.6-5.9 ms, for ~50 ns of clock per item and a ``sleep(0)`` per turn.
SLICE = 0.001


class Turns:
    __slots__ = ("_since", "_slice")

    def __init__(self, slice_s: float = SLICE) -> None:
        self._since = time.perf_counter()
        self._slice = slice_s

    def due(self) -> bool:
        """True once this slice has run its time (then ``await anyio.sleep(0)``)."""
        now = time.perf_counter()
        if now - self._since < self._slice:
            return False
        self._since = now
        return True
