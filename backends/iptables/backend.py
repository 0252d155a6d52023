"""``IptablesBackend``: the I/O (``iptables-save``, ``iptables-restore``, the nf_tables
generation) and the wiring between the pure layers and the observation cache."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import anyio

from netagent.agent import intents as I
from netagent.agent.errors import BackendUnavailable

from ..firewall import Batch, Counts, DriftWatcher, FirewallBackend, FirewallSpec
from ..nftmonitor import NftMonitorWatcher
from . import counters
from . import plan as planner
from .cache import ObservationCache
from .genid import nf_genid, nft_flavour
from .process import SBIN, Programs
from .restore import RestorePayload, restore_text, rule_line
from .rules import CHAIN_DNAT, CHAIN_OUT, CHAIN_POST, CHAIN_PRE, jump_rule, jump_text, plural
from .save import FamilyObserved, Observed, parse_filter, parse_save

if TYPE_CHECKING:
    from ..libnft import LibNftables

#: per family: (the save program, the restore program); the same argv works for both
TOOLS = {4: ("iptables-save", "iptables-restore"), 6: ("ip6tables-save", "ip6tables-restore")}
#: how the drift watcher sees a change in iptables-nft's nat tables, and in the IPv4
#: filter table's INPUT chain and ours there (the VXLAN guard)
MONITOR_MARKERS = (" ip nat", " ip6 nat", " ip filter INPUT", " ip filter NETAGENT-")


def _resolve(program: str) -> str | None:
    search = os.environ.get("PATH", "")
    return shutil.which(program, path=f"{search}:{SBIN}" if search else SBIN)


def _ipv6_kernel() -> bool:
    # absent when the kernel has no IPv6 (ipv6.disable=1): ip6tables would only fail
    return os.path.exists("/proc/net/if_inet6")


def _no_generation() -> int | None:
    return None


def purge_steps(have: FamilyObserved, version: int) -> list[str]:
    """A line per chain deleted; past a few, the port blocks are counted, not listed."""

    def text(chain: str, rules: int) -> str:
        return f"deleted chain {chain} (ipv{version}, {plural(rules, 'rule')})"

    names = sorted(name for name in have.chains if name not in have.referenced)
    if len(names) <= 8:
        return [text(name, len(have.chains[name])) for name in names]
    fixed = [name for name in names if name in (CHAIN_PRE, CHAIN_OUT, CHAIN_POST, CHAIN_DNAT)]
    blocks = [name for name in names if name not in fixed]
    rules = sum(len(have.chains[name]) for name in blocks)
    return [text(name, len(have.chains[name])) for name in fixed] + [
        f"deleted {len(blocks)} other chains (ipv{version}, {plural(rules, 'rule')})"
    ]


class IptablesBackend(FirewallBackend[Observed, RestorePayload]):
    """NAT in netagent's own ``NETAGENT-*`` chains of the nat table, for IPv4 and IPv6.

    ``families`` is which IP versions to manage; by default IPv4, plus IPv6 when
    ``ip6tables-restore`` is installed and the kernel has IPv6. ``generation`` reads the
    nf_tables generation; by default the kernel's (:func:`~.genid.nf_genid`) when every
    program is iptables-nft, else none (legacy iptables: every observation reads the
    table). Constructing the backend runs nothing, so planning is tested without root."""

    name = "iptables"

    def __init__(
        self,
        families: tuple[int, ...] | None = None,
        generation: Callable[[], int | None] | None = None,
    ) -> None:
        if families is None:
            has6 = all(_resolve(p) for p in TOOLS[6]) and _ipv6_kernel()
            families = (4, 6) if has6 else (4,)
        if not families or set(families) - set(TOOLS):
            raise ValueError(f"families must be a non-empty subset of (4, 6), not {families}")
        self.families = tuple(sorted(set(families)))
        self.tools = {v: tuple(_resolve(p) or p for p in TOOLS[v]) for v in self.families}
        #: every program is iptables-nft: its changes are nf_tables commits
        self.nft_flavour = all(nft_flavour(p) for v in self.families for p in self.tools[v])
        #: where the daemon writes the localhost guard for this backend (the filter
        #: table of the same iptables flavour, ``backends/xtfilter.py``)
        self.xt_flavour = "nft" if self.nft_flavour else "legacy"
        if generation is None:
            generation = nf_genid if self.nft_flavour else _no_generation
        self.cache = ObservationCache(generation)
        self.programs = Programs()
        #: in-process libnftables, opened on the first read of counters
        self._lib: LibNftables | None = None

    def drift_watcher(self) -> DriftWatcher | None:
        """iptables-nft keeps its chains in nf_tables' ``ip nat`` / ``ip6 nat`` tables,
        so nf_tables' notifications show every change; the backend's own ``iptables-restore``
        processes are named to it as ours. Legacy iptables changes never reach nf_tables:
        None, and the reconciler's periodic pass finds them."""
        if not self.nft_flavour:
            return None
        return NftMonitorWatcher(MONITOR_MARKERS, own_pids=self.programs.own_pids)

    @classmethod
    def probe(cls) -> tuple[bool, str]:
        iptables = _resolve("iptables")
        for program in ("iptables", "iptables-save", "iptables-restore"):
            if _resolve(program) is None:
                return False, f"the {program} program is not installed (Debian package iptables)"
        assert iptables is not None
        env = Programs.env()
        try:
            result = subprocess.run(
                [iptables, "-w", "-t", "nat", "-S"],
                capture_output=True,
                env=env,
                check=False,
                timeout=30,
            )
            version = subprocess.run(
                [iptables, "--version"], capture_output=True, env=env, check=False, timeout=30
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            return False, f"iptables did not answer: {exc}"
        if result.returncode != 0:
            return False, f"iptables cannot read the nat table: {result.stderr.decode().strip()}"
        which = version.stdout.decode().strip() or iptables
        v6 = "; IPv6 through ip6tables" if 6 in cls().families else "; IPv4 only (no ip6tables)"
        return True, f"{which} reads the nat table{v6}"

    async def observe(self) -> Observed:
        """What of ours is there: from the cache while the nf_tables generation has not
        moved, else read (one ``iptables-save -t nat`` per family). Shared, not a copy:
        treat it as read-only."""
        before, known = self.cache.lookup()
        if known is not None:
            return known
        families: dict[int, FamilyObserved] = {}
        for version in self.families:
            save, _restore = self.tools[version]
            text = await self.programs.run([save, "-t", "nat"])
            families[version] = parse_save(text.decode(errors="replace"))
        save4 = self.tools[4][0] if 4 in self.tools else None
        filt = None
        if save4 is not None:
            text = await self.programs.run([save4, "-t", "filter"])
            filt = parse_filter(text.decode(errors="replace"))
        return self.cache.read(before, families, filt)

    def plan(self, spec: FirewallSpec, observed: Observed) -> Batch[RestorePayload]:
        """Pure: see :func:`~.plan.plan_full`."""
        return planner.plan_full(spec, observed, self.families)

    def plan_update(
        self, spec: FirewallSpec, added: list[I.Forward], removed: list[I.Forward]
    ) -> Batch[RestorePayload]:
        """Pure: see :func:`~.plan.plan_update`."""
        return planner.plan_update(spec, added, removed, self.families)

    async def _restore(self, version: int, text: str) -> None:
        if version not in self.tools:
            raise BackendUnavailable(f"the iptables backend does not manage IPv{version} here")
        _save, restore = self.tools[version]
        await self.programs.run([restore, "--noflush", "-w"], stdin=text.encode())

    async def apply(self, batch: Batch[RestorePayload]) -> None:
        """One ``iptables-restore --noflush`` per family (IPv4 first), each atomic; then
        the cache learns what the table holds now (a batch with no files only teaches it
        that the table is its spec's)."""
        payload = batch.payload
        if payload is None:
            return
        pending = self.cache.begin(payload)
        for version, text in payload.files():
            await self._restore(version, text)
        if payload.filter_text is not None:
            await self._restore(4, payload.filter_text)
        self.cache.commit(pending, payload)

    async def counters(self, forwards: Sequence[I.Forward]) -> dict[str, Counts] | None:
        """The DNAT rules' counters (``counters.py``), iptables-nft only, through
        in-process libnftables in a worker thread; None for legacy iptables or when
        libnftables is missing."""
        if not self.nft_flavour or not forwards:
            return None if not self.nft_flavour else {}
        if self._lib is None:
            from ..libnft import LibNftables

            try:
                self._lib = LibNftables()
            except OSError:
                return None
        lib = self._lib
        ports: dict[int, counters.PortCounts] = {}
        for family, commands in counters.listing(forwards).items():
            rc, raw, _err = await anyio.to_thread.run_sync(lib.run, commands, True)
            if rc != 0:  # a block chain is gone: the whole table, then
                table = "ip nat" if family == 4 else "ip6 nat"
                rc, raw, _err = await anyio.to_thread.run_sync(
                    lib.run, f"list table {table}".encode(), True
                )
                if rc != 0:
                    ports[family] = {}
                    continue
            ports[family] = counters.parse_rules(raw)
        return counters.forward_counts(ports, forwards)

    async def purge(self) -> list[str]:
        """Remove our jumps (by their exact rule), then flush and delete our chains: one
        restore per family, so a failure (say, someone else's rule jumping into one of our
        chains) leaves that family as it was instead of half purged."""
        observed = await self.observe()
        self.cache.forget()
        removed: list[str] = []
        for version, have in sorted(observed.families.items()):
            if not have.present:
                continue
            lines: list[str] = []
            for (builtin, target), count in sorted(have.jumps.items()):
                lines += [rule_line("-D", builtin, jump_rule(target))] * count
                removed += [f"deleted {jump_text(builtin, target, version)}"] * count
            lines += [f":{chain} - [0:0]" for chain in sorted(have.chains)]
            # a chain someone else's rule jumps to is emptied and left: deleting it would
            # fail the whole purge ("CHAIN_DEL ... busy"); that rule is not ours to touch
            lines += [
                f"-X {chain}" for chain in sorted(have.chains) if chain not in have.referenced
            ]
            removed += purge_steps(have, version)
            removed += [
                f"left chain {chain} (ipv{version}) empty: {by[0]} jumps to it"
                for chain, by in sorted(have.referenced.items())
            ]
            await self._restore(version, restore_text(lines))
        filt = observed.filter
        if filt is not None and filt.present:
            lines = []
            for (builtin, target), count in sorted(filt.jumps.items()):
                lines += [rule_line("-D", builtin, jump_rule(target))] * count
                removed += [f"deleted {jump_text(builtin, target, 4)} (filter)"] * count
            lines += [f":{chain} - [0:0]" for chain in sorted(filt.chains)]
            lines += [f"-X {chain}" for chain in sorted(filt.chains)]
            removed += [f"deleted chain {chain} (ipv4 filter)" for chain in sorted(filt.chains)]
            await self._restore(4, restore_text(lines, "filter"))
        return removed
