"""The daemon, built in order: nothing optional, nothing set late.

1. lock the state dir and take the socket (a second daemon stops before touching
   anything; early clients wait in the backlog);
2. load the desired state; open the kernel side and the firewall backend (removing the
   rules of another backend that wrote them last);
3. start the event source (subscribe, then dump into the link cache);
4. reconcile everything before serving, then serve, and tell systemd READY=1;
5. with ``--cluster-endpoints``, join the cluster (``agent/cluster.py``): etcd answering
   or not, the host is served and its data plane is back by then.

SIGTERM stops serving and exits; the data plane (links, rules) stays as it is (the
cluster lease is revoked, so the other hosts stop routing to this one at once).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import anyio
import structlog

from netagent.backends import firewall as fwreg
from netagent.backends.nftmonitor import NftMonitorWatcher
from netagent.backends.pyroute import PyrouteNetlink
from netagent.backends.xtfilter import FilterChains

from . import clusterapi, sdnotify
from .access import Policy
from .api import Counters, Service
from .bus import EventBus
from .cluster import Cluster
from .cni import replay_queue
from .config import Config
from .errors import NetagentError
from .events import EventSource
from .fwsync import FirewallSync
from .gcidle import collect_when_idle
from .hostcheck import HostCheck
from .kinds import default_kinds
from .kinds.base import Context
from .kinds.namespace import Claims
from .lag import measure_lag
from .linkcache import LinkCache
from .listen import bind_socket, lock_state_dir
from .paths import TrustedDir
from .probe import NOOP, Probe
from .reconcile import Reconciler
from .state import DesiredState
from .store import StateStore
from .subnets import Settings, node_id, open_store
from .transport import Server

log = structlog.get_logger("netagent")
#: another tool's changes make the findings be read again at most this often (seconds)
READ_EVERY = 0.5
#: seconds a thread waiting for the GIL waits before its holder is asked to let go
SWITCH_INTERVAL = 0.001


MARKER = "firewall-backend"


def check_state_extras(state_dir: Path) -> None:
    """The state dir's files besides the store's: the firewall-backend marker and the
    namespace claims (a claim planted by someone else would make netagent call their
    namespace its own). Links, and files others may write, stop the start."""
    with TrustedDir(state_dir, "state directory") as d:
        d.check(MARKER, "firewall-backend marker")
        if d.check("claims", "claims directory", kind="dir") is None:
            return
    with TrustedDir(state_dir / "claims", "claims directory") as claims:
        for name in claims.names():
            claims.check(name, "namespace claim file")


async def retire_other_firewall(state_dir: Path, current: str, bus: EventBus) -> None:
    """Starting with another backend than the one that wrote the rules: remove the old
    backend's rules first, so no forward is installed twice."""
    with TrustedDir(state_dir, "state directory") as d:
        raw = d.read(MARKER, "firewall-backend marker")
    previous = raw.decode(errors="replace").strip() if raw is not None else None
    if previous and previous != current:
        try:
            old = fwreg.get_backend(previous)()
            removed = await old.purge()
            await old.close()
            log.info(
                "removed the previous firewall backend's rules", backend=previous, removed=removed
            )
            bus.publish("firewall-switched", f"removed {previous} rules; now {current}")
        except NetagentError as exc:
            log.warning(
                "could not remove the previous backend's rules", backend=previous, error=exc.message
            )
    if previous != current:
        with TrustedDir(state_dir, "state directory") as d:
            d.write_atomic(MARKER, f"{current}\n".encode(), "firewall-backend marker")


async def wait_for_stop_signal() -> int:
    """Wait for SIGTERM or SIGINT sent to *this* process (a child that inherited the
    handler between fork and exec dies of the signal instead)."""
    loop = asyncio.get_running_loop()
    main_pid = os.getpid()
    stop = anyio.Event()
    received: list[int] = []

    def handler(signum: int, _frame: object) -> None:
        if os.getpid() != main_pid:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        received.append(signum)
        loop.call_soon_threadsafe(stop.set)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        await stop.wait()
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    return received[0]


async def run_daemon(config: Config, recover: bool = False) -> None:
    """``recover``: start from the last good sequence of a damaged state, keeping the
    damaged files aside (``netagent run --recover``, ``docs/state.md``)."""
    # Worker threads (nft transactions and counters, journal lines) and the netlink
    # sender hold the GIL now and then; a thread that wants it back waits up to the
    # switch interval before the holder is asked to let go. The default, 5 ms, is the
    # event loop's whole lag budget; 1 ms bounds that wait (docs/architecture.md).
    sys.setswitchinterval(SWITCH_INTERVAL)
    sdnotify.notify("STATUS=starting: loading state")
    state_dir = Path(config.state_dir)
    try:
        lock_fd = lock_state_dir(config.state_dir)
        raw, owned = bind_socket(config)
    except NetagentError as exc:
        sdnotify.notify(f"STATUS=failed to start: {sdnotify.one_line(exc.message)}")
        raise
    kinds = default_kinds()
    exporter = None
    probe: Probe = NOOP
    if config.metrics:  # prometheus_client is imported only then
        from .metrics import Exporter

        try:
            exporter = Exporter(config.metrics, kinds)
        except NetagentError:
            raw.close()
            if owned is not None:
                with contextlib.suppress(FileNotFoundError):
                    owned.unlink()
            os.close(lock_fd)
            raise
        probe = exporter.probe
    net = PyrouteNetlink()
    backend: fwreg.AnyBackend | None = None
    fw: FirewallSync | None = None
    store = StateStore(state_dir, kinds)
    try:
        t0 = time.perf_counter()
        try:
            links = LinkCache()
            state = DesiredState(
                kinds, external_namespace=net.ns_exists, name_in_use=links.foreign_name
            )
            check_state_extras(state_dir)
            state.load(store.load(recover=recover))
            await net.start()
            cls, why = fwreg.choose_backend(config.firewall)
            backend = cls()
            log.info("firewall backend chosen", backend=cls.name, why=why)
        except NetagentError as exc:
            sdnotify.notify(f"STATUS=failed to start: {sdnotify.one_line(exc.message)}")
            raise
        bus = EventBus(listeners=[probe.event] if exporter is not None else [])
        counters = Counters()
        await retire_other_firewall(state_dir, cls.name, bus)
        guard_in = None if backend.guards_localhost else backend.xt_flavour
        fw = FirewallSync(backend, bus, filters=FilterChains(guard_in))
        ctx = Context(
            net=net,
            state=state,
            bus=bus,
            links=links,
            claims=Claims(state_dir / "claims"),
            refused=fw.quarantined,
            quarantined=store.quarantine,
        )
        # after --recover, what the lost lines made is shown as orphans, not removed
        rec = Reconciler(
            state,
            ctx,
            fw,
            bus,
            config.resync_interval,
            remove_orphans_at_start=store.seq > 0 and not store.recovered,
            probe=probe,
        )
        checker = HostCheck(ctx, fw)
        rec.checker = checker
        events = EventSource(state, rec, net, links, bus, counters)
        cluster = None
        if config.cluster_endpoints:
            settings = Settings.from_config(config)
            cluster = Cluster(
                settings,
                open_store(settings),  # a bad TLS file stops the start, here
                state,
                net,
                bus,
                node_id(state_dir),
                clusterapi.state_of(rec),
            )
        api = Service(
            state=state,
            store=store,
            reconciler=rec,
            ctx=ctx,
            firewall=fw,
            bus=bus,
            counters=counters,
            about={"socket": config.socket, "state_dir": config.state_dir},
            cluster=cluster,
            checker=checker,
        )
        server = Server(
            api,
            Policy(config.socket_group, config.readonly_group),
            bus,
            counters,
            config.client_timeout,
            probe=probe,
        )
        listener = await anyio.abc.SocketListener.from_socket(raw)
        try:
            async with anyio.create_task_group() as tg:
                await tg.start(events.run)  # subscribed, and the link cache filled
                sdnotify.notify("STATUS=starting: reconciling")
                rec.mark_all("start")
                await rec.run_until_idle("start")
                log.info(
                    "state loaded and reconciled",
                    intents=len(state),
                    failing=len(rec.failing()),
                    duration_ms=round((time.perf_counter() - t0) * 1000, 1),
                )
                tg.start_soon(rec.run)
                tg.start_soon(events.watch_namespaces)
                tg.start_soon(replay_queue, api, state_dir / "cni-queue")  # queued CNI DELs
                tg.start_soon(measure_lag, counters, probe)
                if exporter is not None:
                    tg.start_soon(exporter.serve, api)
                watcher = backend.drift_watcher()
                # other tools' changes (their filter and nat tables): one nf_tables
                # watcher serves both when the backend's is ours
                host = watcher if isinstance(watcher, NftMonitorWatcher) else None
                if host is None:
                    host = NftMonitorWatcher(())
                    tg.start_soon(host.run, lambda what: None)
                seen = watch_others(host, rec, fw, checker)
                if watcher is not None:

                    def drifted(what: str) -> None:
                        on_drift(rec, fw, bus, what)
                        seen(frozenset(), what)  # the findings read again too

                    tg.start_soon(watcher.run, drifted)
                tg.start_soon(server.serve, listener)
                if cluster is not None:
                    # after the start-up pass: the data plane the journal holds is back
                    # and local requests are served whether or not etcd answers
                    tg.start_soon(cluster.run, api.mutate)
                gc.freeze()  # what start-up made lives forever: keep it out of GC passes
                # and what lives long after it is frozen in idle moments (agent/gcidle.py)
                tg.start_soon(collect_when_idle, lambda: (counters.requests, rec.passes))
                sdnotify.notify(f"READY=1\nSTATUS={sdnotify.one_line(api.summary())}")
                tg.start_soon(sdnotify.watchdog_loop, api.summary)
                log.info(
                    "netagent ready",
                    socket=config.socket,
                    firewall=why,
                    max_clients=server.max_clients,
                    watchdog_s=sdnotify.watchdog_interval(),
                )
                signum = await wait_for_stop_signal()
                log.info(
                    "stopping; links and rules stay in place", signal=signal.Signals(signum).name
                )
                sdnotify.notify("STOPPING=1")
                tg.cancel_scope.cancel()
        finally:
            with contextlib.suppress(Exception):
                await listener.aclose()
    finally:
        raw.close()
        if owned is not None:
            with contextlib.suppress(FileNotFoundError):
                owned.unlink()
        store.close()
        if fw is not None:
            fw.close()
        if backend is not None:
            with contextlib.suppress(Exception):
                await backend.close()
        await net.close()
        if exporter is not None:
            exporter.close()
        os.close(lock_fd)


def watch_others(
    watcher: NftMonitorWatcher, rec: Reconciler, fw: FirewallSync, checker: HostCheck
) -> Callable[[frozenset[str], str], None]:
    """Tell the watcher our filter chains' restores are ours, and what to do when
    another tool changes a table: a filter table (Docker starting, ufw reloading) is
    looked at again at once, so netagent's accepts follow within the pass."""
    backend_pids = watcher.own_pids
    filters = fw.filters

    def own() -> set[int]:
        mine = set(backend_pids())
        if filters is not None:
            mine |= filters.programs.own_pids()
        return mine

    def other(tables: frozenset[str], who: str) -> None:
        from .reconcile import FIREWALL, READ_HOST

        checker.note_foreign()
        if tables & {"ip filter", "ip6 filter"}:
            fw.look()
            rec.mark([FIREWALL], "foreign")
        # the findings: read again, at most every READ_EVERY seconds (Docker starting
        # commits dozens of transactions in a row)
        now = time.monotonic()
        if now - last[0] >= READ_EVERY:
            last[0] = now
            rec.mark([READ_HOST], "foreign")
        elif not pending[0]:
            pending[0] = True

            def later() -> None:
                pending[0] = False
                last[0] = time.monotonic()
                rec.mark([READ_HOST], "foreign")

            asyncio.get_running_loop().call_later(READ_EVERY, later)

    last, pending = [0.0], [False]

    watcher.own_pids = own
    watcher.on_foreign = other
    return other


def on_drift(rec: Reconciler, fw: FirewallSync, bus: EventBus, what: str) -> None:
    """Someone changed the firewall's rules: a full firewall sync, now."""
    from .reconcile import FIREWALL

    bus.publish("firewall-drift", what)
    fw.drifted(what)
    rec.drift(FIREWALL, what)
