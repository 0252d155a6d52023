"""Where the rooms report what metrics count: one call at each place that knows.

The transport reports each request (op, result, duration), the reconciler each pass and
how long the oldest kernel event it acted on waited, the lag sampler each sample, the
event bus every event (repairs, attaches, connections cleared ...). This :class:`Probe`
does nothing with them: metrics are off unless ``netagent run --metrics ADDR:PORT``, and
then ``agent/metrics.py`` (which imports ``prometheus_client``, only then) gives the
rooms its own probe instead. Standard library only; each call costs a method call.
"""

from __future__ import annotations

from typing import Any


class Probe:
    def request(self, op: str, result: str, seconds: float) -> None:
        """One request answered: ``result`` is ``ok`` or the error's name."""

    def reconcile_pass(self, trigger: str, seconds: float) -> None:
        """One reconcile pass done (``trigger``: request, event, periodic ...)."""

    def event_lag(self, seconds: float) -> None:
        """A pass acted on kernel events: how long the oldest of them had waited since
        it was read (what an event costs before netagent has answered it)."""

    def loop_lag(self, seconds: float) -> None:
        """One sample of the event loop's lag (``agent/lag.py``)."""

    def event(self, event: dict[str, Any]) -> None:
        """One event the bus published (``ctl events`` shows the same)."""


#: the probe when metrics are off
NOOP = Probe()
