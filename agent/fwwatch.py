"""Firewall drift: the backend's own watcher kicks a firewall pass."""

from __future__ import annotations

from netagent.backends.firewall import AnyBackend

from .bus import EventBus
from .reconcile import FIREWALL_KEY, Reconciler


async def watch_firewall(rec: Reconciler, backend: AnyBackend, bus: EventBus) -> None:
    watcher = backend.drift_watcher()
    if watcher is None:
        return

    def on_drift(what: str) -> None:
        bus.publish("firewall-drift", what)
        rec.kick([FIREWALL_KEY])

    await watcher.run(on_drift)
