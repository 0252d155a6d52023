"""The doctor's findings, kept: read on the periodic pass and when another tool changes a
table, recomputed (without reading the host again) when the desired state changes, and
never per ``show``.

``show`` and ``status`` ask :meth:`HostCheck.of` for a key: a finding that ``blocks``
makes the key not in place, with its reason and the doctor's line; others are warnings.
``forward`` asks :meth:`HostCheck.forward_warnings` right after a forward is added: a
fresh look at the listening sockets, and the last reading of the firewalls for DNATs of
the same port.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import anyio
import structlog

from . import doctor, findings, hostview

if TYPE_CHECKING:
    from netagent.backends.libnft import LibNftables

    from .fwsync import FirewallSync
    from .kinds.base import Context
    from .kinds.forward import Forward

log = structlog.get_logger("netagent.doctor")

#: seconds reading the host may take in all (each program has its own limit)
READ_TIMEOUT = 30.0
#: from this many forwards on, the checks run in a worker thread (as a firewall plan
#: does): below it they are a few milliseconds, and the hop is not worth it
THREAD_FROM = 500
#: (sysctl paths, forwarded (protocol, port) pairs, an nft lister) -> a snapshot
Reader = Callable[[list[str], set[tuple[str, int]], Any], hostview.HostView]


class HostCheck:
    def __init__(self, ctx: Context, firewall: FirewallSync, reader: Reader | None = None) -> None:
        self.ctx = ctx
        self.firewall = firewall
        #: reads the host (``hostview.gather``; unit tests give a fake snapshot)
        self.reader: Reader = reader or hostview.gather
        self.view: hostview.HostView | None = None
        self.findings: list[findings.Finding] = []
        self.checked: list[str] = []
        #: when the findings were last computed (time.time())
        self.at: float | None = None
        self._by_key: dict[str, list[findings.Finding]] = {}
        #: each forward's checks, kept while the reading stays (``findings.ForwardMemo``)
        self._memo = findings.ForwardMemo()
        #: seconds the last ``refresh`` took, reading included (the reconciler spaces
        #: the findings' passes by it)
        self.cost = 0.0
        self._lib: LibNftables | None = None
        self._lib_tried = False
        #: other tools' changes noted, and how many the last reading had seen; our
        #: own filter chains' writes the last reading had seen
        self._foreign = 0
        self._read_foreign = -1
        self._writes_seen = -1

    # ---- reading and checking -----------------------------------------------------------
    def _nft_list(self, command: str) -> str | None:
        """One nft listing through in-process libnftables (None: use the program)."""
        if not self._lib_tried:
            self._lib_tried = True
            from netagent.backends.libnft import LibNftables

            try:
                self._lib = LibNftables()
            except OSError:
                self._lib = None
        if self._lib is None:
            return None
        rc, out, _err = self._lib.run(command.encode(), True)
        return out.decode(errors="replace") if rc == 0 else None

    def _bridge_ports(self) -> dict[str, int]:
        links = self.ctx.links
        out: dict[str, int] = {}
        bridges: Sequence[Any] = self.ctx.state.of_kind("bridge")
        for br in bridges:
            link = links.named(br.name)
            if link is not None:
                out[br.name] = sum(1 for lk in links if lk.master == link.index)
        return out

    async def read(self) -> hostview.HostView:
        state = self.ctx.state
        found: Sequence[Any] = state.of_kind("bridge")
        forwards: Sequence[Any] = state.of_kind("forward")
        bridges = [br.name for br in found]
        ports = {(f.proto, p) for f in forwards for p in _few(f.host_ports)}
        with anyio.fail_after(READ_TIMEOUT):
            return await anyio.to_thread.run_sync(
                self.reader, doctor.sysctl_paths(bridges), ports, self._nft_list
            )

    def _sysctls(self) -> dict[str, str]:
        """The sysctls the checks read, through the netlink protocol (the daemon's own
        namespace; a file each)."""
        bridges: Sequence[Any] = self.ctx.state.of_kind("bridge")
        out: dict[str, str] = {}
        for path in doctor.sysctl_paths([br.name for br in bridges]):
            value = self.ctx.net.sysctl(path)
            if value is not None:
                out[path] = value
        return out

    def _doctor(self, view: hostview.HostView) -> doctor.Doctor:
        filters = self.firewall.filters
        failed = {t.name: why for t, why in filters.state.failed.items()} if filters else {}
        desired = findings.desired_of(self.ctx.state, self._bridge_ports())
        return doctor.Doctor(view, desired, failed, self.firewall.name, self._memo)

    def compute(self) -> list[findings.Finding]:
        if self.view is None:
            return []
        doc = self._doctor(self.view)
        return self._found(doc, doc.run())

    async def _compute(self, view: hostview.HostView) -> list[findings.Finding]:
        """:meth:`compute`, in a worker thread when there are many forwards: the checks
        are pure over the reading and a flattened copy of the desired state, and 10,000
        new forwards' checks are ~60 ms (on the loop, one stretch after an ``apply``)."""
        doc = self._doctor(view)
        if len(doc.d.forwards) < THREAD_FROM:
            return self._found(doc, doc.run())
        return self._found(doc, await anyio.to_thread.run_sync(doc.run))

    def _found(self, doc: doctor.Doctor, found: list[findings.Finding]) -> list[findings.Finding]:
        self.findings = found
        self.checked = doc.checked
        self.at = time.time()
        by_key: dict[str, list[findings.Finding]] = {}
        for f in self.findings:
            for key in f.keys:
                by_key.setdefault(key, []).append(f)
        self._by_key = by_key
        return self.findings

    def note_foreign(self) -> None:
        """Another tool changed a table: the last reading is stale until the next."""
        self._foreign += 1

    @property
    def stale(self) -> bool:
        filters = self.firewall.filters
        writes = filters.writes if filters is not None else 0
        return (
            self.view is None or self._foreign != self._read_foreign or writes != self._writes_seen
        )

    async def refresh(self, read: bool) -> list[str]:
        """The reconciler's step: read the host (``read``, or when the last reading is
        stale: another tool changed a table since, or netagent wrote its own filter
        chains), else only its sysctls (a file each: netagent itself turns forwarding
        on, in the pass before), then check. Says nothing in the pass's actions:
        findings are not changes."""
        t0 = time.perf_counter()
        try:
            return await self._refresh(read)
        finally:
            self.cost = time.perf_counter() - t0

    async def _refresh(self, read: bool) -> list[str]:
        if read or self.stale:
            filters = self.firewall.filters
            foreign, writes = self._foreign, filters.writes if filters is not None else 0
            try:
                self.view = await self.read()
                self._read_foreign, self._writes_seen = foreign, writes
            except (OSError, TimeoutError) as exc:
                log.warning("reading the host's firewalls failed", error=str(exc))
                if self.view is None:
                    return []
        assert self.view is not None
        self.view.sysctls = self._sysctls()
        before = {f.line() for f in self.findings}
        await self._compute(self.view)
        new = [
            f for f in self.findings if f.line() not in before and f.severity == findings.PROBLEM
        ]
        for f in new:
            self.ctx.bus.publish("finding", f.line(), key=f.keys[0] if f.keys else None)
        return []

    # ---- what show, status and forward ask ------------------------------------------------
    def of(self, key: str) -> list[findings.Finding]:
        return self._by_key.get(key, [])

    def summary(self) -> dict[str, Any]:
        problems = [f.line() for f in self.findings if f.severity == findings.PROBLEM]
        return {
            "problems": len(problems),
            "notes": sum(1 for f in self.findings if f.severity == findings.NOTE),
            "checked": self.at,
            "lines": problems[:20],
        }

    async def forward_warnings(self, fwd: Forward) -> list[str]:
        """Who else has this forward's host port: a DNAT of another tool (the last
        reading of the firewalls, read again first when another tool changed a table
        since) or a process listening on it (read now)."""
        if self.stale:
            await self.refresh(read=True)
        ports = set(_few(fwd.host_ports))
        try:
            # sock_diag answers in ~25 us: less than a worker thread's hop costs
            listeners = hostview.listeners_now(fwd.proto, fwd.family)
        except OSError:
            with anyio.fail_after(READ_TIMEOUT):
                listeners = await anyio.to_thread.run_sync(hostview.read_listeners)
        hit = [
            lst
            for lst in listeners
            if lst.proto == fwd.proto and lst.port in ports and lst.family == fwd.family
        ]
        if hit:
            deadline = time.monotonic() + 0.5
            owners = await anyio.to_thread.run_sync(
                hostview.socket_owners, {lst.inode for lst in hit}, deadline
            )
        else:
            owners = {}
        base = self.view or hostview.HostView(firewall=_empty())
        view = hostview.HostView(base.firewall, hit, base.sysctls, owners, base.managers)
        desired = findings.Desired(
            forwards=[(fwd.key, fwd.proto, fwd.family, fwd.host_ports, fwd.dest_ip, fwd.dest_port)]
        )
        doc = doctor.Doctor(view, desired)
        doc.listeners()
        doc.competing_dnat()
        return [f.line() for f in doc.found]


def _few(ports: range) -> range:
    """The ports whose listeners are named: a range of 60,000 forwarded ports would make
    the /proc scan look for every socket on the host."""
    return ports if len(ports) <= 1024 else range(ports.start, ports.start + 1024)


def _empty() -> Any:
    from netagent.backends.hostfw import HostFirewall

    return HostFirewall()
