"""The reconciler: one loop, one path, level-triggered.

Requests, kernel events and timers only *mark* what may differ from the desired state
(keys, and interfaces the kernel announced); the loop runs passes, and a request waits
for the pass that covers its keys (:meth:`Reconciler.note` returns a :class:`Ticket`).
Each pass, in one order:

1. the firewall, when a forward or a bridge changed or someone changed its rules (first,
   so forwarding stops before a target goes away);
2. removals, in reverse kind order;
3. ensures, in kind order; a key whose ensure changed something brings its dependents
   into the same pass (a bridge recreated brings back its plugs and attach rules, a
   namespace recreated its plugs and wires: the one dependents rule);
4. host settings (IP forwarding) when bridges or forwards changed;
5. interfaces the kernel announced, through the attach rules' one decision.

Each ensure observes first and acts on the difference only, so marking too much costs a
look, never a wrong action. Keys that keep failing back off exponentially. A periodic
full pass (every key, in chunks so requests and events are never held behind it) is the
safety net under the events. One log line per pass.
"""

from __future__ import annotations

import collections
import itertools
import time
from collections.abc import Awaitable, Iterable
from dataclasses import dataclass
from typing import Any

import anyio
import structlog

from . import orphans
from .alarm import Alarm
from .bus import EventBus
from .fwsync import FirewallSync
from .hostcheck import HostCheck
from .keystatus import PassResult, StatusBook, Ticket, attempt, attempt_now
from .kinds.attach import attach_links
from .kinds.base import Context, Intent
from .orphans import Orphan
from .probe import NOOP, Probe
from .state import Change, DesiredState
from .turns import Turns
from .waves import Outcome, ensure_wave, take_wave

log = structlog.get_logger("netagent.reconcile")

#: pseudo keys: the firewall as a whole, and the host's settings (IP forwarding)
FIREWALL = "firewall"
HOST = "host"
#: look for orphans (marked as netagent's, desired by nothing); and remove them
ORPHANS = "orphans"
PURGE_ORPHANS = "orphans/remove"
#: the doctor's findings: recompute them from the last reading of the host; and read
#: the host's firewalls again first (``agent/hostcheck.py``)
FINDINGS = "findings"
READ_HOST = "findings/read"
PSEUDO = frozenset({FIREWALL, HOST, ORPHANS, PURGE_ORPHANS, FINDINGS, READ_HOST})
#: keys of a periodic pass handled per pass (requests and events go between chunks)
CHUNK = 256
#: seconds of periodic ensures one pass may spend: it stops early, the rest waits for the
#: next pass, and it stops at once for a request (a request never waits behind a sweep)
PERIODIC_BUDGET = 0.05
#: announced interfaces handled per pass
LINK_CHUNK = 128
#: a burst of kernel events lands before the pass that handles them starts
COALESCE = 0.002
#: the findings after requests wait this many times what computing them last took
#: (a millisecond's: 25 ms; 1,000 containers' ~6 ms: 0.15 s), at most FINDINGS_DELAY_MAX
#: s after the first request they follow
FINDINGS_SPACING = 25.0
FINDINGS_DELAY_MAX = 2.0
#: after a slice of the sweep, the next waits this many times what the slice took: the
#: sweep (a safety net; kernel events repair at once) takes at most ~5% of the loop.
#: With 1,000 containers a sweep costs ~5 s of work: it is spread over ~100 s (longer
#: than the resync interval, which then means "as often as that allows"), and a
#: request seldom meets a slice (it would wait for the key being checked)
SWEEP_REST = 19.0
#: what marked a key, in the order a pass's trigger is named after them
WHYS = ("event", "retry", "resync", "start", "periodic", "foreign", "findings")


@dataclass
class _Batch:
    keys: set[str]
    links: set[int]
    tickets: list[Ticket]
    trigger: str
    #: when the oldest kernel event this pass acts on was marked (perf_counter)
    event_since: float | None = None
    #: the keys taken from the periodic sweep (put back when the pass stops early)
    periodic: frozenset[str] = frozenset()


class Reconciler:
    def __init__(
        self,
        state: DesiredState,
        ctx: Context,
        firewall: FirewallSync,
        bus: EventBus,
        resync_interval: float = 30.0,
        remove_orphans_at_start: bool = False,
        probe: Probe = NOOP,
    ) -> None:
        self.state = state
        self.probe = probe
        #: when the oldest kernel event not yet taken into a pass marked something
        self._event_since: float | None = None
        self._remove_orphans_once = remove_orphans_at_start
        self.ctx = ctx
        self.firewall = firewall
        self.bus = bus
        self.resync_interval = resync_interval
        #: key -> why it is marked ("request", "event", "retry", ...): the next pass's
        self._pending: dict[str, str] = {}
        #: the keys the periodic sweep has still to look at, in the order it looks (a key
        #: marked for anything sooner leaves it): apart, so that a pass never walks the
        #: sweep's thousands of keys to find the few a request or an event marked
        self._sweep: dict[str, None] = {}
        self._links: set[int] = set()
        self._tickets: list[Ticket] = []
        #: removed intents whose kernel side is still to go (retried until it is)
        self._removals: dict[str, Intent] = {}
        #: the intent an updated key replaced, until the key is ensured
        self._previous: dict[str, Intent] = {}
        self._alarm = Alarm()
        self.book = StatusBook(bus)
        #: each key's state, and what keeps one from working that no ensure can fix
        #: (the book's, read by the API; only the book changes them)
        self.status = self.book.status
        self.conditions = self.book.conditions
        self._retry = self.book.retry
        #: when the findings follow the requests' changes (time.monotonic())
        self._findings_at: float | None = None
        #: the latest the pending findings may wait till, however many requests come
        self._findings_by: float | None = None
        self.passes = 0
        self.last_pass: dict[str, Any] = {}
        #: the orphans the last look found, and when it looked (time.time())
        self.orphans: list[Orphan] = []
        self.orphans_checked: float | None = None
        #: the next look for orphans also looks inside namespaces (costly: not periodic)
        self._look_inside = True
        #: keeps the doctor's findings (``agent/hostcheck.py``); None: no findings
        self.checker: HostCheck | None = None
        self._next_full = time.monotonic() + resync_interval
        self._in_pass = False
        #: no slice of the sweep before this (``SWEEP_REST``)
        self._sweep_at = 0.0

    # ---- marking --------------------------------------------------------------------
    def note(self, changes: list[Change], also: Iterable[str] = ()) -> Ticket:
        """A request's committed changes: remember what to remove and what is replaced,
        tell the firewall, mark the keys (and ``also``); the ticket resolves after the
        pass that covers them."""
        keys: set[str] = set(also)
        removals, previous, book = self._removals, self._previous, self.book
        firewall_kinds, fw_note = self.state.kinds.firewall_names, self.firewall.note
        firewall = False
        for c in changes:  # an apply of 10,000 forwards: locals, not attribute lookups
            key, new = c.key, c.new
            if new is None:
                assert c.old is not None
                removals[key] = c.old
                previous.pop(key, None)
                kind = c.old.kind
            else:
                gone = removals.get(key)
                if gone is not None and gone == new:
                    del removals[key]  # wanted again as it was: nothing to remove
                if c.old is not None:
                    previous.setdefault(key, c.old)
                book.requested(key)
                kind = new.kind
            keys.add(key)
            if kind in firewall_kinds:
                fw_note(c)
                firewall = True
        if firewall:
            keys.update((FIREWALL, HOST))
        pending, sweep = self._pending, self._sweep
        for key in keys:
            pending[key] = "request"
            sweep.pop(key, None)
        ticket = Ticket(keys)
        self._tickets.append(ticket)
        self._alarm.ring()
        return ticket

    async def wait(self, ticket: Ticket) -> PassResult:
        await ticket.done.wait()
        return ticket.result

    def mark(self, keys: Iterable[str], why: str = "event") -> None:
        """Keys that may have drifted (events, retries)."""
        if why == "event" and self._event_since is None:
            self._event_since = time.perf_counter()
        for key in keys:
            if key not in self.state and key not in self._removals and key not in PSEUDO:
                continue
            self._mark(key, why)
            if why == "event":
                self.book.drifted(key, why)
        self._alarm.ring()

    def drift(self, key: str, reason: str) -> None:
        """Something the kernel said: ``key`` is not as wanted until repaired."""
        self.book.drifted(key, reason)
        self.mark([key], "event")

    def mark_links(self, indexes: Iterable[int]) -> None:
        """Interfaces the kernel announced: the attach rules decide on them."""
        if self._event_since is None:
            self._event_since = time.perf_counter()
        self._links.update(indexes)
        self._alarm.ring()

    def _mark(self, key: str, why: str) -> None:
        if why != "periodic":
            self._pending.setdefault(key, why)
            self._sweep.pop(key, None)  # served sooner than the sweep would
        elif key not in self._pending:
            self._sweep[key] = None

    def mark_all(self, why: str) -> None:
        keys = [*self.state.intents, *self._removals, FIREWALL, HOST, ORPHANS]
        if self.checker is not None:
            keys.append(READ_HOST)
        if why != "periodic":
            for key in keys:
                self._pending.setdefault(key, why)
            self._sweep.clear()
            self._look_inside = True
            self.firewall.drifted(why)
        else:
            # the sweep's order, made once per sweep: what others need comes first
            fresh = [k for k in keys if k not in self._pending and k not in self._sweep]
            if fresh:
                order = self.state.kinds.order_of_key
                self._sweep = dict.fromkeys(
                    sorted([*self._sweep, *fresh], key=lambda k: (order(k), k))
                )
            self.firewall.look()
        self._alarm.ring()

    def condition(self, key: str, reason: str | None) -> None:
        """Something outside the reconciler's reach keeps ``key`` from working (an empty
        namespace): not in place while it holds, whatever its ensure says."""
        self.book.condition(key, reason)

    # ---- status ---------------------------------------------------------------------
    def failing(self) -> dict[str, str]:
        return self.book.failing()

    def busy(self) -> bool:
        """Something is marked, waits, or a pass is running."""
        return bool(self._pending or self._sweep or self._links or self._tickets or self._in_pass)

    # ---- the loop -------------------------------------------------------------------
    async def run_until_idle(self, trigger: str) -> PassResult:
        """Run passes until nothing is marked (start-up, before the socket serves)."""
        total = PassResult()
        while self._pending or self._sweep or self._links:
            result = await self._pass(self._take(trigger))
            total.actions.update(result.actions)
            total.errors.update(result.errors)
        return total

    async def run(self) -> None:
        while True:
            await self._wait_for_work()
            try:
                await self._pass(self._take())
            except Exception:
                # a bug, or the host refusing in a way not foreseen: log it, keep the loop
                # alive, and converge everything on the next try
                log.exception("reconcile pass failed")
                self.mark_all("resync")
                await anyio.sleep(1)

    async def _wait_for_work(self) -> None:
        while True:
            now = time.monotonic()
            if now >= self._next_full:
                self._next_full = now + self.resync_interval
                self.mark_all("periodic")
            if self._findings_at is not None and self._findings_at <= now:
                self._findings_at = self._findings_by = None
                self._mark(FINDINGS, "findings")
            due = [k for k, at in self._retry.items() if at <= now]
            for key in due:
                self._mark(key, "retry")
            if self._tickets or self._links:
                return
            if self._pending:
                if set(self._pending.values()) <= {"event", "retry"}:
                    await anyio.sleep(COALESCE)  # let a burst land
                return
            if self._sweep and now >= self._sweep_at:
                return
            # nothing to do now: sleep till the next timer (the sweep's next slice keeps
            # its spacing; a retry or the findings falling due do not wait for it)
            wake_at = self._next_full
            if self._retry:
                wake_at = min(wake_at, *self._retry.values())
            if self._findings_at is not None:
                wake_at = min(wake_at, self._findings_at)
            if self._sweep:
                wake_at = min(wake_at, self._sweep_at)
            await self._alarm.sleep(wake_at - now)

    def _take(self, trigger: str | None = None) -> _Batch:
        """What the next pass covers: every requested, event and retry key, at most a
        chunk of the periodic ones, and what those need that is marked too."""
        urgent = set(self._pending)
        # a chunk of the sweep only when no request waits (a request's pass is its own)
        # and its spacing allows (``SWEEP_REST``)
        chunk: set[str] = set()
        if self._sweep and not self._tickets and time.monotonic() >= self._sweep_at:
            chunk = set(itertools.islice(self._sweep, CHUNK))
        keys = urgent | chunk
        # and what they need that the sweep holds (every other marked key is in already):
        # over the smaller of the sweep and the needed keys (10,000 forwards need nothing;
        # 1,000 containers' port mappings need 1,000 attachments, and the sweep is empty
        # but for its rounds)
        needed, sweep = self.state.needed(), self._sweep
        for key in sweep if len(sweep) < len(needed) else needed:
            users = needed.get(key)
            if users and key in sweep and key not in keys and not users.isdisjoint(keys):
                keys.add(key)
        whys = {self._pending.pop(k) for k in keys if k in self._pending}
        swept = [k for k in keys if k in self._sweep]
        for key in swept:
            del self._sweep[key]
        if swept:
            whys.add("periodic")
        if len(self._links) <= LINK_CHUNK:
            links, self._links = self._links, set()
        else:  # a burst: a slice per pass, so nothing waits long behind it
            links = set(sorted(self._links)[:LINK_CHUNK])
            self._links -= links
        tickets = [t for t in self._tickets if t.keys <= keys]
        self._tickets = [t for t in self._tickets if not t.keys <= keys]
        since = self._event_since
        if not self._links and not any(w == "event" for w in self._pending.values()):
            self._event_since = None  # else what is left of a burst waits since then
        if trigger is None:
            fallback = "event" if links else "periodic"
            trigger = "request" if tickets else next((w for w in WHYS if w in whys), fallback)
        return _Batch(
            keys,
            links,
            tickets,
            trigger,
            since if "event" in whys or links else None,
            frozenset(chunk - urgent),
        )

    # ---- a pass ---------------------------------------------------------------------
    async def _pass(self, batch: _Batch) -> PassResult:
        t0 = time.perf_counter()
        result = PassResult()
        self._in_pass = True
        try:
            if batch.keys:  # else announced interfaces alone: straight to their attach
                await self._keys(batch, result)
            if batch.links:
                links = [lk for i in batch.links if (lk := self.ctx.links.get(i)) is not None]
                try:
                    result.merge("attach", await attach_links(self.ctx, links))
                except Exception:  # each link's failure is caught inside: this is a bug
                    log.exception("attaching announced interfaces failed")
        finally:
            self._in_pass = False
            for ticket in batch.tickets:
                ticket.result = result.only(ticket.keys)
                ticket.done.set()
        if batch.tickets and self.checker is not None and batch.keys - PSEUDO:
            # the findings follow the desired state in a pass of their own, nobody's
            # request waits for them; each request moves them on (a burst of requests
            # gets one check at its end, a steady stream one at least every
            # FINDINGS_DELAY_MAX s), so they take a few percent of the loop at most
            now = time.monotonic()
            if self._findings_by is None:
                self._findings_by = now + FINDINGS_DELAY_MAX
            delay = min(FINDINGS_SPACING * self.checker.cost, FINDINGS_DELAY_MAX)
            self._findings_at = min(now + delay, self._findings_by)
        if batch.trigger != "request":
            self.book.publish_repairs(batch.trigger, result, quiet=(HOST, "attach", ORPHANS))
        if batch.periodic:
            self._sweep_at = time.monotonic() + SWEEP_REST * (time.perf_counter() - t0)
        await self._log_pass(batch, t0, result)
        return result

    async def _keys(self, batch: _Batch, result: PassResult) -> None:
        """The marked keys' part of a pass, in the one order."""
        kinds, intents, removals = self.state.kinds, self.state.intents, self._removals
        parts = kinds.split(batch.keys)
        # the firewall first (a forward's DNAT, a bridge's rules, a removal's rules gone
        # before its parts), unless the pass is peers' alone (the guard follows)
        firewall_last = FIREWALL in batch.keys and kinds.firewall_follows(parts)
        if FIREWALL in batch.keys and not firewall_last:
            await self._step(FIREWALL, self.firewall.sync(self.state), result)
        removing = [k for k in kinds.in_order(parts, True) if k in removals and k not in intents]
        for key in removing:
            await self._remove(key, result)
        ensuring = [k for k in kinds.in_order(parts) if k in intents]
        # what the sweep's budget left is marked again, and not this pass's
        batch.keys -= await self._ensure_all(ensuring, result, batch.periodic)
        if firewall_last:
            await self._step(FIREWALL, self.firewall.sync(self.state), result)
        if HOST in batch.keys:
            self._record(HOST, attempt_now(self._host, HOST), result)
        if batch.keys & {ORPHANS, PURGE_ORPHANS}:
            await self._step(ORPHANS, self._orphans(PURGE_ORPHANS in batch.keys), result)
        if batch.keys & {FINDINGS, READ_HOST} and self.checker is not None:
            await self._step(FINDINGS, self.checker.refresh(READ_HOST in batch.keys), result)

    async def _ensure_all(
        self, keys: list[str], result: PassResult, periodic: frozenset[str] = frozenset()
    ) -> set[str]:
        """Ensure ``keys`` in order, and what hangs off a changed one. The ``periodic``
        ones (the sweep's) only within PERIODIC_BUDGET and while no request waits; those
        left are marked again for the next pass, and returned.

        A key that fails while what it needs was not ensured in this pass is not failed
        yet: its prerequisites are ensured, then it is tried once more. The kernel
        announces a deleted bridge's ports leaving before the bridge itself goes, so a
        pass can start with the plugs alone and find their bridge gone."""
        deferred: set[str] = set()
        order = self.state.kinds.order_of_key
        done: set[str] = set()
        second: set[str] = set()  # tried again after its prerequisites
        queue = collections.deque(keys)  # popped from the front: 10,000 keys
        deadline = time.perf_counter() + PERIODIC_BUDGET
        swept = 0  # at least one per pass: the sweep always moves on
        turns, n = Turns(), 0
        intents, of, ctx, book = self.state.intents, self.state.kinds.of, self.ctx, self.book
        while queue:
            key = queue.popleft()
            if key in done:
                continue
            if key in periodic and (self._tickets or (swept and time.perf_counter() > deadline)):
                left = [k for k in (key, *queue) if k in periodic and k not in done]
                deferred.update(left)
                # what is left goes back to the sweep's front, in order (unless marked
                # for something sooner meanwhile)
                back = dict.fromkeys(k for k in left if k not in self._pending)
                self._sweep = {**back, **self._sweep}
                queue = collections.deque(k for k in queue if k not in periodic)
                self._alarm.ring()
                continue
            done.add(key)
            swept += key in periodic
            intent = intents.get(key)
            if intent is None:
                continue
            gone = self._removals.pop(key, None)
            if gone is not None and gone != intent:
                # replaced by a different intent of the same key: the old one goes first
                await self._remove_intent(key, gone, result)
            kind = of(intent)
            n += 1
            if not n % 64 and turns.due():  # 10,000 forwards' verdicts: let others in
                await anyio.sleep(0)
            if not kind.has_steps:
                # realized by the firewall step of this pass: only its verdict to record
                # (no task, no time limit: 10,000 forwards must cost microseconds each)
                why = kind.refused(ctx, intent)
                if why is None:
                    book.ok(key)
                else:
                    book.fail(key, why, result)
                continue
            old = self._previous.pop(key, None)
            wave = [(key, intent, old)]
            if kind.at_once and key not in periodic:  # and the keys that may go with it
                skip = periodic | self._removals.keys()  # the sweep's; replacements
                for k, i in take_wave(self.state, kind, intent, queue, done, skip):
                    wave.append((k, i, self._previous.pop(k, None)))
            # when it fails, the prerequisites not ensured in this pass go first, then it
            needs = {
                k: [n for n in kind.needs(i) if n not in done and n in self.state]
                for k, i, _old in wave
                if k not in second and not self.book.is_failing(k)
            }
            retry: list[str] = []  # after the prerequisites they failed for (a wave again)
            first: dict[str, None] = {}
            outcomes = await ensure_wave(self.ctx, kind, wave)
            for (k, _i, was), outcome in zip(wave, outcomes, strict=True):
                if needs.get(k) and outcome[0] is None and not outcome[2]:
                    second.add(k)
                    done.discard(k)
                    retry.append(k)
                    first.update(dict.fromkeys(needs[k]))
                elif self._record(k, outcome, result):
                    # what hangs off a changed (recreated, readdressed) key comes back
                    queue.extend(d.key for d in self.state.dependents(k) if d.key not in done)
                if was is not None and (k in retry or self.book.is_failing(k)):
                    # the retry must still know what this replaces (a stale address)
                    self._previous.setdefault(k, was)
            queue.extendleft(reversed([*sorted(first, key=lambda n: (order(n), n)), *retry]))
        return deferred

    async def _remove(self, key: str, result: PassResult) -> None:
        gone = self._removals.pop(key)
        await self._remove_intent(key, gone, result)

    async def _remove_intent(self, key: str, gone: Intent, result: PassResult) -> None:
        kind = self.state.kinds.of(gone)
        await self._step(key, kind.remove(self.ctx, gone), result)
        if key in result.errors:
            self._removals[key] = gone  # retried with backoff until it is gone
            return
        if key not in self.state:
            self.book.forget(key)
        try:
            await kind.released(self.ctx, gone)
        except Exception:  # closing a socket: never worth failing a removal
            log.exception("releasing failed", key=key)

    async def _orphans(self, purge: bool) -> list[str]:
        """Look for orphans; remove them on a purge, and at start when the desired state
        came from files: what carries netagent's mark for a key the acknowledged state
        no longer holds is a removal a crash cut short. (A state dir without history
        leaves them to ``purge``: they may be a whole data plane whose state was lost.)"""
        if self._remove_orphans_once:
            self._remove_orphans_once = False
            purge = True
        inside, self._look_inside = self._look_inside or purge, False
        pending = set(self._removals) | set(self.ctx.quarantined)
        found = await orphans.find(self.ctx, pending, inside=inside)
        done: list[str] = []
        if purge and found:
            done = await orphans.remove(self.ctx, found)
            found = await orphans.find(self.ctx, pending, inside=True)
        self.orphans, self.orphans_checked = found, time.time()
        return done

    def _host(self) -> list[str]:
        """IP forwarding on for each IP version something routed needs (kinds say so
        with the ``forwarding`` index: bridges' addresses, forwards)."""
        done = []
        net = self.ctx.net
        for version, path in ((4, "net/ipv4/ip_forward"), (6, "net/ipv6/conf/all/forwarding")):
            if self.state.has_indexed("forwarding", version) and net.sysctl(path) != "1":
                net.set_sysctl(path, "1")
                done.append(f"enabled {path.replace('/', '.')}")
        return done

    async def _step(self, key: str, aw: Awaitable[list[str]], result: PassResult) -> bool:
        """Run one ensure/remove; record what it did or why it failed. True when it
        changed something."""
        return self._record(key, await attempt(aw, key), result)

    def _record(self, key: str, outcome: Outcome, result: PassResult) -> bool:
        actions, error, _timed_out = outcome
        if actions is None:
            return self.book.fail(key, error or "failed", result)
        return self.book.record(key, actions, result)

    async def _log_pass(self, batch: _Batch, t0: float, result: PassResult) -> None:
        now = time.perf_counter()
        self.passes += 1
        ms = (now - t0) * 1000
        self.probe.reconcile_pass(batch.trigger, now - t0)
        if batch.event_since is not None:
            self.probe.event_lag(now - batch.event_since)
        changed = sum(len(a) for a in result.actions.values())
        self.last_pass = {
            "trigger": batch.trigger,
            "keys": len(batch.keys - PSEUDO),
            "links": len(batch.links),
            "changed": changed,
            "errors": len(result.errors),
            "ms": round(ms, 2),
            "at": time.time(),
        }
        # debug lines: passes that only looked at announced interfaces (a burst of 1,000
        # veths makes hundreds), and slices of the sweep that found everything in place
        quiet = not result.errors and (
            batch.keys <= {FINDINGS} or (batch.trigger == "periodic" and not changed)
        )
        if batch.tickets:  # the answers go out before the line is made
            await anyio.sleep(0)
        (log.debug if quiet else log.info)(
            "reconcile pass",
            trigger=batch.trigger,
            keys=len(batch.keys - PSEUDO),
            steps=sorted(batch.keys & PSEUDO) or None,
            links=len(batch.links),
            changed=changed,
            errors=result.errors or None,
            duration_ms=round(ms, 2),
        )
