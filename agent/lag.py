"""Event-loop lag: how late the loop runs a task that asked to wake at a given time.

Every event the daemon handles waits behind whatever runs on the loop at that moment, so
the lag is what a kernel event or a request pays before netagent even looks at it.
Sampled every :data:`INTERVAL`; ``status`` shows the p99 and the maximum of the last
:data:`WINDOW` samples (five seconds).
"""

from __future__ import annotations

import time
from collections import deque

import anyio

from .api import Counters
from .probe import NOOP, Probe

INTERVAL = 0.01
WINDOW = 500  # five seconds


async def measure_lag(counters: Counters, probe: Probe = NOOP) -> None:
    samples: deque[float] = deque(maxlen=WINDOW)
    n = 0
    while True:
        t0 = time.perf_counter()
        await anyio.sleep(INTERVAL)
        sample = max(0.0, time.perf_counter() - t0 - INTERVAL)
        samples.append(sample)
        probe.loop_lag(sample)
        n += 1
        if n % 50 == 0:
            ordered = sorted(samples)
            counters.loop_lag_p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
            counters.loop_lag_max = ordered[-1]
