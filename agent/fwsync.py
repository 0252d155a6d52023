"""The firewall as a whole, beside the reconciler: what changed since the last sync, and
how to bring the backend's rules to the desired forwards and bridges.

Forwards added or removed since the last good sync go to the backend as one small update
(``plan_update``: a change costs the same with 10 forwards as with 10,000); anything else
(a bridge changed, someone changed the rules, a failed sync, the periodic check) is a
full one: observe, plan, apply. Planning is pure and, for big states, runs in a worker
thread, so it never holds up the event loop. Connections of removed or retargeted
forwards are cleared beside the loop, right after the sync.
"""

from __future__ import annotations

import shutil
from typing import TYPE_CHECKING, Any

import anyio
import structlog

from netagent.backends.firewall import AnyBackend, Batch, FirewallSpec

from .errors import NetagentError

if TYPE_CHECKING:
    from .bus import EventBus
    from .kinds.forward import Forward
    from .state import Change, DesiredState

log = structlog.get_logger("netagent.firewall")

#: above this many forwards a full plan runs in a worker thread
THREAD_PLAN = 500
#: forwards tried together while isolating one the backend refuses
ISOLATE_CHUNK = 1024
#: seconds one conntrack run may take
CONNTRACK_TIMEOUT = 10.0


class FirewallSync:
    def __init__(self, backend: AnyBackend, bus: EventBus, conntrack: bool = True) -> None:
        self.backend = backend
        self.bus = bus
        self.conntrack = conntrack and shutil.which("conntrack") is not None
        self._added: list[Forward] = []
        self._removed: list[Forward] = []
        self._full = True
        #: what the last full plan found missing, until a sync succeeds
        self.pending: list[str] = []
        #: forward key -> why the backend refused it (kept out until the next full sync)
        self.quarantined: dict[str, str] = {}
        self._clear: list[Forward] = []
        self._clear_wake = anyio.Event()

    @property
    def name(self) -> str:
        return self.backend.name

    def spec(self, state: DesiredState) -> FirewallSpec:
        forwards: Any = tuple(state.of_kind("forward"))
        bridges: Any = tuple(state.of_kind("bridge"))
        return FirewallSpec(forwards=forwards, bridges=bridges)

    def note(self, change: Change) -> None:
        """A committed change of a firewall kind."""
        from .kinds.forward import Forward

        old, new = change.old, change.new
        if isinstance(old, Forward) or isinstance(new, Forward):
            if isinstance(old, Forward):
                self._removed.append(old)
            if isinstance(new, Forward):
                self._added.append(new)
        else:
            self._full = True  # a bridge: its rules are few, plan them whole

    def drifted(self, why: str) -> None:
        self._full = True

    async def _plan(self, spec: FirewallSpec, observed: object) -> Batch[object]:
        if len(spec.forwards) > THREAD_PLAN:
            return await anyio.to_thread.run_sync(self.backend.plan, spec, observed)
        return self.backend.plan(spec, observed)

    async def sync(self, state: DesiredState) -> list[str]:
        spec = self.spec(state)
        added, removed = self._added, self._removed
        self._added, self._removed = [], []
        full, self._full = self._full, True  # until this sync succeeds
        steps: list[str] = []
        if spec.empty:
            # nothing desired: the firewall holds nothing of netagent's (an empty table
            # or empty chains would be something left behind)
            steps = await self.backend.purge()
        else:
            if not full and (added or removed):
                batch = self.backend.plan_update(spec, added, removed)
                try:
                    await self.backend.apply(batch)
                    steps = batch.steps
                except NetagentError as exc:
                    # the rules drifted under us: observe and converge the whole of it
                    log.info("firewall update failed; planning it whole", error=exc.message)
                    full = True
            if full:
                steps = await self._full_sync(spec)
        self._full = False
        self.pending = []
        if removed and self.conntrack:
            self._clear.extend(removed)
            self._clear_wake.set()
        return steps

    async def _full_sync(self, spec: FirewallSpec) -> list[str]:
        observed = await self.backend.observe()
        batch = await self._plan(spec, observed)
        self.pending = batch.steps
        try:
            await self.backend.apply(batch)
        except NetagentError as exc:
            if not spec.forwards:
                raise
            # one transaction is all or nothing: a forward the backend cannot take must
            # not keep every other one out; find it, refuse it, install the rest
            log.warning("a full firewall sync failed; isolating what it refuses", error=exc.message)
            return await self._isolate(spec)
        self.quarantined.clear()
        return batch.steps

    async def _isolate(self, spec: FirewallSpec) -> list[str]:
        """Install the bridges' rules, then the forwards in chunks as updates; a chunk
        that fails is halved until the forwards the backend refuses are found. Those are
        reported (``quarantined``, their keys fail) and retried at the next full sync."""
        base = FirewallSpec(forwards=(), bridges=spec.bridges)
        batch = await self._plan(base, await self.backend.observe())
        await self.backend.apply(batch)  # if the bridges' own rules fail, that is the error
        installed: list[Forward] = []
        refused: dict[str, str] = {}

        async def add(group: list[Forward]) -> None:
            current = FirewallSpec(forwards=(*installed, *group), bridges=spec.bridges)
            try:
                await self.backend.apply(self.backend.plan_update(current, group, []))
                installed.extend(group)
            except NetagentError as exc:
                if len(group) == 1:
                    refused[group[0].key] = exc.message
                    return
                half = len(group) // 2
                await add(group[:half])
                await add(group[half:])

        forwards = list(spec.forwards)
        for start in range(0, len(forwards), ISOLATE_CHUNK):
            await add(forwards[start : start + ISOLATE_CHUNK])
        self.quarantined.clear()
        self.quarantined.update(refused)
        for key, why in refused.items():
            self.bus.publish("refused", f"the firewall refuses {key}: {why}", key=key)
        return [
            f"installed {len(installed)} forwards and the bridges' rules; the firewall "
            f"refused {len(refused)}: {', '.join(sorted(refused)[:5])}"
        ]

    async def inspect(self, state: DesiredState) -> Batch[object]:
        """What a full sync would do now (nothing is changed)."""
        spec = self.spec(state)
        return await self._plan(spec, await self.backend.observe())

    # ---- conntrack ------------------------------------------------------------------
    async def clear_connections(self) -> None:
        """Runs beside the loop: the tracked connections of removed or retargeted
        forwards are dropped, so existing flows do not keep the old destination. The
        conntrack tool takes ~20 ms a run; 50 removals in a row must not delay repairs."""
        tool = shutil.which("conntrack")
        if tool is None:
            return
        while True:
            await self._clear_wake.wait()
            self._clear_wake = anyio.Event()
            while self._clear:
                forwards, self._clear = self._clear, []
                for fwd in forwards:
                    await _clear_one(tool, fwd)


async def _clear_one(tool: str, fwd: Forward) -> None:
    for hport, dport in fwd.pairs()[:64]:
        argv = [
            tool,
            "-D",
            "-f",
            "ipv4" if fwd.family == 4 else "ipv6",
            "-p",
            fwd.proto,
            "--orig-port-dst",
            str(hport),
            "--reply-src",
            str(fwd.dest_ip),
            "--reply-port-src",
            str(dport),
        ]
        try:
            with anyio.fail_after(CONNTRACK_TIMEOUT):
                await anyio.run_process(argv, check=False)
        except (OSError, TimeoutError) as exc:
            log.warning("clearing conntrack entries failed", forward=fwd.key, error=str(exc))
