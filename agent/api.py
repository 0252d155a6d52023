"""The API: a parsed request in, an answer out.

Each request is parsed once into its typed value (``agent/ops.py``), checked against the
caller's access, and handled. A change is *proposed* against the desired state (the kind
validates it), checked against the kernel (nothing that exists and is someone else's is
taken over), made durable (the journal, fsynced, in a worker thread), *committed*, and
then realized by the reconciler; the request waits for the pass that covers its keys.
Changes are serialized by one lock; the kernel work is the reconciler's, in its one loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio
import structlog

from . import clusterapi, doctor_api, gcidle, ops, quarantine
from .errors import BackendFailed, InvalidArgument, NetagentError, NotFound, ReadOnly, UnknownOp
from .keystatus import IN_PLACE, PENDING, PassResult, Ticket
from .reconcile import FIREWALL, PURGE_ORPHANS, Reconciler
from .schema import Request, prefix_error
from .serial import SerialThread
from .shared import SharedBuild
from .traffic import Traffic
from .turns import Turns

if TYPE_CHECKING:
    from .bus import EventBus
    from .cluster import Cluster
    from .fwsync import FirewallSync
    from .hostcheck import HostCheck
    from .kinds import Registry
    from .kinds.base import Context, Intent
    from .state import Change, DesiredState
    from .store import StateStore

log = structlog.get_logger("netagent.api")

#: a 10,000-intent apply answers with the first ones and the count
MAX_LISTED = 200
#: seconds a request waits for the disk to confirm its journal line (fdatasync)
FLUSH_TIMEOUT = 30.0
#: a journal flush on the loop that took longer (s, the loop's lag budget) sends the
#: next ones to the journal's thread for a while (``SerialThread.start_quick``)
FLUSH_QUICK_LIMIT = 0.005
#: the turns of a ``show`` build (see ``_build_show``)
SHOW_SLICE = 0.005
#: up to this many mirrored changes (a peer or a few) are journaled on the event loop
MIRROR_INLINE = 16


@dataclass(frozen=True)
class Peer:
    pid: int
    uid: int
    gid: int
    access: str  # "rw" | "ro"


def kind_change(kinds: Registry, req: Request) -> Callable[[DesiredState], None]:
    """What an add or del request of a kind does to the desired state."""
    kind = kinds.get(req.kind or "")
    assert kind is not None, req.kind
    if req.verb == "add":

        def add(s: DesiredState) -> None:
            s.put(kind.add(s, req))

        return add

    def remove(s: DesiredState) -> None:
        for key in kind.delete(s, req):
            intent = s.get(key)
            assert intent is not None
            s.remove(key, intent.describe())

    return remove


class Counters:
    """What other rooms count and ``status`` shows (each room updates its own)."""

    def __init__(self) -> None:
        self.requests = 0
        self.clients = 0
        self.refused = 0
        self.timeouts = 0
        self.event_resyncs = 0
        #: event-loop lag, seconds, of the last samples (see ``agent/lag.py``)
        self.loop_lag_p99 = 0.0
        self.loop_lag_max = 0.0


Handler = Callable[[Any], Awaitable[Any]]


class Service:
    def __init__(
        self,
        *,
        state: DesiredState,
        store: StateStore,
        reconciler: Reconciler,
        ctx: Context,
        firewall: FirewallSync,
        bus: EventBus,
        counters: Counters,
        about: Mapping[str, Any],
        cluster: Cluster | None = None,
        checker: HostCheck | None = None,
    ) -> None:
        self.state = state
        self.kinds: Registry = state.kinds
        self.store = store
        self.reconciler = reconciler
        self.ctx = ctx
        self.firewall = firewall
        self.bus = bus
        self.counters = counters
        self.about = dict(about)
        self.cluster = cluster
        self.started = time.time()
        self._commit = anyio.Lock()
        #: the journal's appends, one after the other in a thread of their own (``serial``)
        self._journal = SerialThread("netagent-journal", quick_limit=FLUSH_QUICK_LIMIT)
        self._static_memo: dict[str, tuple[Intent, dict[str, Any]]] = {}
        self._shows = SharedBuild(self._build_show)
        self.traffic = Traffic(state, firewall, ctx.net)
        #: the doctor's findings about other tools (``agent/hostcheck.py``)
        self.checker = checker
        self._handlers: dict[type[Request], Handler] = {
            ops.Status: self._status,
            ops.Show: self._show,
            ops.Apply: self._apply,
            ops.Purge: self._purge,
            ops.Links: self._kernel_view,
            ops.Neigh: self._kernel_view,
            ops.Routes: self._kernel_view,
            ops.Forget: lambda req: quarantine.forget(self, req),
            ops.Peers: self._peers,
            ops.Doctor: lambda req: doctor_api.doctor(self, req),
            ops.Explain: lambda req: doctor_api.explain_op(self, req),
        }
        from .cni import handlers as cni_handlers

        self._handlers.update(cni_handlers(self))  # CNI, plug --netns|--pid

    # ---- dispatch -------------------------------------------------------------------
    async def handle(self, op: str, args: Mapping[str, object], peer: Peer) -> Any:
        cls = ops.BY_OP.get(op)
        if cls is None or cls is ops.Events:
            known = ", ".join(sorted(r.op for r in ops.REQUESTS))
            raise UnknownOp(f"unknown op {op!r}; known: {known}")
        if cls.mutating and peer.access != "rw":
            raise ReadOnly(f"uid {peer.uid} may only look; {cls.op} changes state")
        req = cls.parse(args)
        handler = self._handlers.get(cls)
        if handler is not None:
            return await handler(req)
        if cls.kind is not None:
            return await self._kind_op(req)
        raise UnknownOp(f"op {op!r} has no handler")  # a request declared but not served

    async def _kind_op(self, req: Request) -> Any:
        if req.verb == "list":
            kind = self.kinds.get(req.kind or "")
            assert kind is not None, req.kind
            rows = kind.rows(self.ctx)
            return await self.traffic.rows(rows) if kind.name == "forward" else rows
        if isinstance(req, ops.ForwardAdd):
            # who else has the port, said at once (a DNAT of another tool, a listener):
            # looked at while the pass puts the forward in place, not after it
            looked: list[list[str]] = []

            async def look() -> None:
                looked.append(await doctor_api.forward_warnings(self, req))

            try:
                reply = await self.mutate(kind_change(self.kinds, req), meanwhile=look)
            except BackendFailed as exc:
                warnings = looked[0] if looked else await doctor_api.forward_warnings(self, req)
                if warnings:
                    exc.message += "; " + "; ".join(warnings)
                    exc.args = (exc.message,)
                raise
            if reply["changed"]:
                reply["warnings"] = looked[0]
            return reply
        return await self.mutate(kind_change(self.kinds, req))

    # ---- changes --------------------------------------------------------------------
    async def mutate(
        self,
        fn: Callable[[DesiredState], object],
        *,
        mirror: bool = False,
        meanwhile: Callable[[], Coroutine[Any, Any, None]] | None = None,
    ) -> dict[str, Any]:
        """Validate and record a change, realize it; then answer.

        The change is the state once its journal line is written (:meth:`_record`);
        the line's fdatasync follows at once, on the loop while the disk's flushes are
        quick, else in the journal's thread beside the pass that realizes the change
        (``SerialThread.start_quick``, docs/architecture.md); the answer waits for both:
        nothing is acknowledged before it is on disk.

        ``meanwhile`` runs once the change is recorded (not at all when nothing changed
        or the change was refused), while the reconciler's pass realizes it; the answer
        waits for both.

        ``mirror``: the change mirrors records kept durable elsewhere (the cluster's
        peers, in etcd), and nobody waits for an answer: its journal line goes into the
        page cache, not through fdatasync (a disk flush costs 1-5 ms of a peer's ~10;
        the next synced line takes it to disk). A crash of the host may lose it, and etcd
        lists it again. A write that fails does not hold the peer back (etcd is the
        truth): it is realized all the same, the log says so, and the next change writes
        a whole snapshot."""
        result: PassResult | None = None
        changes, ticket, synced = await self._record(fn, mirror)
        if ticket is not None:
            if meanwhile is not None and changes:
                # the pass is the reconciler's task: it runs while this one looks
                await meanwhile()
            result = await self._realized(ticket, synced)
        if result is None:
            return {"changed": False, "changes": [], "changes_total": 0}
        reply: dict[str, Any] = {
            "changed": True,
            "changes": [c.to_wire() for c in changes[:MAX_LISTED]],
            "changes_total": len(changes),
            "actions": result.actions,
        }
        if result.errors:
            first_key, first = next(iter(result.errors.items()))
            raise BackendFailed(
                f"recorded, but not in place yet: {first_key}: {first}; netagent keeps "
                "retrying (see `netagent ctl show`), or undo the request",
                errors=result.errors,
            )
        return reply

    async def _record(
        self,
        fn: Callable[[DesiredState], object],
        mirror: bool,
        also: tuple[str, ...] = (),
    ) -> tuple[list[Change], Ticket | None, asyncio.Future[None] | None]:
        """Make a change the state, under the commit lock: validated, checked, its
        journal line written; the reconciler's ticket for it (None when nothing changed
        and nothing is ``also`` asked) and the future of the line's fdatasync (None for a
        mirrored change, or none).

        A change is the state only when nothing can refuse it any more: the event source
        and a running pass read committed state only. Most changes are checked without a
        wait and written at once (a line into the page cache: ~20 us; ~18 ms for an
        apply of 10,000, whose validation took ~130 ms of the loop already). One that
        must ask the kernel first (a name of it exists: is it someone else's?) or a big
        mirrored line (written in the thread) is taken back meanwhile and made again."""
        async with self._commit:
            changes = self.state.apply(fn)
            if not changes:
                ticket = self.reconciler.note([], also=also) if also else None
                return changes, ticket, None
            big = mirror and len(changes) > MIRROR_INLINE
            if big or self._must_look(changes):
                self.state.take_back(changes)
                await self._check_free(changes)
                if big:  # a listing of 1,000 peers is ~20 ms of encoding: not on the loop
                    await self._journal.call(self._write, changes, True)
                self.state.commit(changes)
            if not big:
                try:
                    self._write(changes, mirror)
                except BackendFailed:
                    self.state.take_back(changes)
                    raise
            synced = None if mirror else self._journal.start_quick(self.store.sync)
            await self._compact_if_due()
            return changes, self.reconciler.note(changes, also=also), synced

    async def _realized(self, ticket: Ticket, synced: asyncio.Future[None] | None) -> PassResult:
        """The pass's result for a ticket, once the change's journal line is on disk
        too (BackendFailed when the disk refused the flush: in place, not durable)."""
        result = await self.reconciler.wait(ticket)
        if synced is not None:
            try:
                if synced.done():  # the usual case: the flush ended during the pass
                    synced.result()
                else:
                    with anyio.CancelScope(shield=True), anyio.fail_after(FLUSH_TIMEOUT):
                        await asyncio.shield(synced)  # the flush goes on; the answer not
            except TimeoutError:  # the line is written: the flush takes it when it can
                raise BackendFailed(
                    f"in place, but the disk has not confirmed the journal in "
                    f"{self.store.dir} within {FLUSH_TIMEOUT:g} s; the change may not "
                    "survive a crash of the host"
                ) from None
            except OSError as exc:
                self.store.behind = True  # the next change writes a whole snapshot
                raise BackendFailed(
                    f"in place, but not on disk: the journal in {self.store.dir} could not "
                    f"be flushed ({exc.strerror or exc}); the change may not survive a "
                    "crash of the host (netagent writes a whole snapshot with the next "
                    "change)"
                ) from None
        return result

    def _must_look(self, changes: list[Change]) -> bool:
        looking = self.kinds.looking_names  # 10,000 forwards: none of them may look
        for c in changes:
            new = c.new
            if (
                c.old is None
                and new is not None
                and new.kind in looking
                and self.kinds.of(new).must_look(self.ctx, new)
            ):
                return True
        return False

    async def _check_free(self, changes: list[Change]) -> None:
        for c in changes:
            if c.old is None and c.new is not None:
                await self.kinds.of(c.new).check_free(self.ctx, c.new)

    def _write(self, changes: list[Change], mirror: bool) -> None:
        """The change's journal line (into the page cache). If the disk refuses, the
        request fails (BackendFailed; the caller undoes the change in memory); a
        ``mirror`` change is realized all the same (see :meth:`mutate`)."""
        try:
            self.store.write(changes)
        except OSError as exc:
            if not mirror:
                raise BackendFailed(
                    f"cannot record the change in {self.store.dir}: {exc.strerror or exc}; "
                    "nothing was changed"
                ) from None
            self.store.behind = True
            log.warning("a mirrored change not journaled; realized all the same", error=str(exc))

    async def _persist(self, changes: list[Change]) -> None:
        """A change of the journal alone (a quarantined intent forgotten), on disk
        before the answer; under the commit lock."""
        try:
            await self._journal.call(self.store.append, changes)
        except OSError as exc:
            raise BackendFailed(
                f"cannot record the change in {self.store.dir}: {exc.strerror or exc}; "
                "nothing was changed"
            ) from None
        await self._compact_if_due()

    async def _compact_if_due(self) -> None:
        """Now and then, a snapshot of the state instead of a long journal: in the
        journal's thread, after the flushes asked before it, while the commit lock
        keeps the state as it is."""
        if not self.store.needs_compaction():
            return
        try:
            await self._journal.call(self._compact)
        except OSError as exc:  # the journal holds it all: compaction can wait
            log.warning("state compaction failed; will retry", error=str(exc))

    def _compact(self) -> None:
        ordered = sorted(self.state.intents.values(), key=self.kinds.sort_key)
        self.store.compact([i.to_dict() for i in ordered])

    # ---- apply and purge ------------------------------------------------------------
    async def _apply(self, req: Request) -> Any:
        """A declarative document of the kinds' add requests: add or update each, in
        one pass; with ``prune`` also remove what the document does not name."""
        assert isinstance(req, ops.Apply)
        with contextlib.ExitStack() as pause:
            pause.enter_context(gcidle.paused())

            async def realizing() -> None:
                # the pass makes the kernel's side through pyroute2, whose messages are
                # cyclic garbage: collected as they come, not 390,000 of them at once
                # (600 plugs: a 300 ms collection on the loop after the apply)
                pause.close()

            return await self._apply_parsed(req, realizing)

    async def _apply_parsed(
        self, req: ops.Apply, realizing: Callable[[], Coroutine[Any, Any, None]]
    ) -> Any:
        # the entries by kind, in the kinds' order (stable: in the document's order
        # within a kind); 10,000 entries are ~70 ms of parsing: not in one stretch
        by_kind: dict[str, list[tuple[int, str, Request]]] = {k.name: [] for k in self.kinds}
        turns = Turns()
        for n, item in enumerate(req.intents, 1):
            if not n % 64 and turns.due():
                await anyio.sleep(0)
            if not isinstance(item, dict):
                raise InvalidArgument(f"intent #{n}: must be an object")
            name = item.get("kind")
            if not isinstance(name, str) or (cls := ops.BY_KIND.get(name)) is None:
                known = ", ".join(k.name for k in self.kinds)
                raise InvalidArgument(f"intent #{n}: unknown kind {name!r}; use {known}")
            try:
                by_kind[cls.kind or ""].append((n, name, cls.parse(item, ignore="kind")))
            except NetagentError as exc:
                raise prefix_error(exc, f"intent #{n} ({name})") from None
        parsed = [(k, by_kind[k.name]) for k in self.kinds if by_kind[k.name]]

        def run(s: DesiredState) -> None:
            named: set[str] = set()
            for kind, entries in parsed:
                add, put = kind.add, s.put
                for n, name, r in entries:
                    try:
                        intent = add(s, r)
                        put(intent)
                    except NetagentError as exc:
                        raise prefix_error(exc, f"intent #{n} ({name})") from None
                    named.add(intent.key)
            if req.prune:
                for intent in s.ordered(reverse=True):
                    if intent.key not in named and self.kinds.of(intent).prunable(intent):
                        s.forget(intent.key)
                s.check_references()

        return await self.mutate(run, meanwhile=realizing)

    async def _purge(self, req: Request) -> Any:
        """Remove everything netagent made (its orphans too), and forget the desired
        state; with ``orphans``, only the orphans. If recording that fails, nothing is
        forgotten and nothing removed."""
        assert isinstance(req, ops.Purge)

        def run(s: DesiredState) -> None:
            for intent in s.ordered(reverse=True):
                s.forget(intent.key)

        also = (PURGE_ORPHANS,) if req.orphans else (FIREWALL, PURGE_ORPHANS)
        changes, ticket, synced = await self._record(
            (lambda s: None) if req.orphans else run, False, also=also
        )
        assert ticket is not None  # ``also`` asks for a pass
        result = await self._realized(ticket, synced)
        return {
            "changed": bool(changes) or any(result.actions.values()),
            "changes": [c.to_wire() for c in changes[:MAX_LISTED]],
            "changes_total": len(changes),
            "actions": result.actions,
            "errors": result.errors,
        }

    # ---- reads ----------------------------------------------------------------------
    def summary(self) -> str:
        parts = [
            f"{self.state.count(k.name)} {k.plural}"
            for k in self.kinds
            if k.plural
            and (
                k.name in ("ns", "bridge", "plug", "forward")
                or (k.name == "attachment" and self.state.count(k.name))
            )
        ]
        failing = len(self.reconciler.failing())
        held = len(self.store.quarantine)
        return (
            ", ".join(parts)
            + (f", {failing} failing" if failing else "")
            + (f", {held} quarantined" if held else "")
        )

    async def _status(self, req: Request) -> Any:
        from netagent import __version__

        c = self.counters
        return {
            "version": __version__,
            "pid": os.getpid(),
            "uptime_s": round(time.time() - self.started, 1),
            **self.about,
            "firewall": self.firewall.name,
            "summary": self.summary(),
            "intents": len(self.state),
            "requests": c.requests,
            "passes": self.reconciler.passes,
            "last_pass": self.reconciler.last_pass,
            "failing": self.reconciler.failing(),
            "stale": dict(self.reconciler.conditions),
            "quarantined": {q.key: q.reason for q in self.store.quarantine.entries()},
            "state_notes": list(self.store.notes),
            "event_resyncs": c.event_resyncs,
            "conntrack_walks_skipped": self.firewall.walks_skipped,
            "findings": self.checker.summary() if self.checker is not None else None,
            "clients": c.clients,
            "refused": c.refused,
            "timeouts": c.timeouts,
            "loop_lag_ms": {
                "p99": round(c.loop_lag_p99 * 1000, 2),
                "max": round(c.loop_lag_max * 1000, 2),
            },
            "cluster": clusterapi.status(self.cluster),
        }

    async def _peers(self, req: Request) -> Any:
        return clusterapi.peers(self.cluster)

    async def _show(self, req: Request) -> Any:
        return await self._shows.get()  # the requests arriving meanwhile share a build

    async def _build_show(self) -> dict[str, Any]:
        """What is desired and whether each part is in place, as the reconciler last
        saw it: in place once its ensure succeeded and nothing the kernel said since
        (events, drift) contradicts it; a firewall kind only while the firewall is."""
        rec = self.reconciler
        fw = rec.status.get(FIREWALL)
        fw_ok = fw is not None and fw.state == IN_PLACE
        items = []
        # longer turns than a request's own: one build answers every show asked while
        # the one before it ran (``agent/shared.py``), and among dozens of clients that
        # ask without pause each turn costs a round of all of them
        turns = Turns(SHOW_SLICE)
        for intent in self.state.ordered():
            if turns.due():
                await anyio.sleep(0)  # thousands of items: let cheap requests go between
            kind = self.kinds.of(intent)
            st = rec.status.get(intent.key)
            state = st.state if st is not None else PENDING
            missing: list[str] = []
            if st is not None and st.state != IN_PLACE and st.reason:
                missing.append(st.reason)
            if kind.firewall and not fw_ok and state == IN_PLACE:
                state = fw.state if fw is not None else PENDING
                missing.append("the firewall is not in place")
            condition = rec.conditions.get(intent.key)
            if condition is not None and state == IN_PLACE:
                state = "stale"
                missing.append(condition)
            item = {
                **self._static(intent),
                "in_place": state == IN_PLACE,
                "state": state,
                "missing": missing,
                "error": st.error if st is not None else None,
                "checked": st.checked if st is not None else None,
                **kind.details(self.ctx, intent),
            }
            doctor_api.annotate(self.checker, item)
            items.append(item)
        await self.traffic.show(items)
        return {
            "intents": items,
            "orphans": [o.to_wire() for o in rec.orphans],
            "orphans_checked": rec.orphans_checked,
            "quarantined": quarantine.report(self),
            "firewall": {
                "backend": self.firewall.name,
                "in_place": fw_ok,
                "state": fw.state if fw is not None else PENDING,
                "pending": self.firewall.pending[:50],
                "error": fw.error if fw is not None else None,
            },
            "findings": self.checker.summary() if self.checker is not None else None,
            "counters_at": self.traffic.read_at(),
        }

    def _static(self, intent: Intent) -> dict[str, Any]:
        """What ``show`` says of an intent that does not change while it does (computed
        once per intent object)."""
        held = self._static_memo.get(intent.key)
        if held is not None and held[0] is intent:
            return held[1]
        static = {
            "key": intent.key,
            "kind": intent.kind,
            "describe": intent.describe(),
            "intent": intent.to_dict(),
        }
        if len(self._static_memo) > 2 * len(self.state) + 1024:
            self._static_memo.clear()
        self._static_memo[intent.key] = (intent, static)
        return static

    async def _kernel_view(self, req: Request) -> Any:
        assert isinstance(req, (ops.Links, ops.Neigh, ops.Routes))
        ns = req.ns
        net = self.ctx.net
        if ns is not None and not net.ns_exists(ns):
            raise NotFound(f"namespace {ns} does not exist; `ns list` shows the namespaces")
        fn = {ops.Links: net.show_links, ops.Neigh: net.show_neigh, ops.Routes: net.show_routes}
        try:
            return await fn[type(req)](ns)
        finally:
            if ns is not None and not self.state.lookup("ns", ns):
                await net.forget(ns)  # looking keeps nothing open
