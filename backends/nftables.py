"""The nftables backend: one table, ``inet netagent``, driven with ``nft -f -``.

Forwards are elements of maps read by a few fixed rules, so a packet costs the same with
10,000 forwards as with one, and adding or removing a forward changes one element (see
``docs/kernel-facts.md``). Only traffic addressed to the host is translated: every
DNAT rule starts with ``fib daddr type local`` (CNI portmap's GHSA-jv3w-x3r3-g6rm).

    table inet netagent
      map dnat_{tcp,udp}{4,6}     port             : addr . port
      map dnat_{tcp,udp}{4,6}h    host addr . port : addr . port   (--host-ip)
      map dnat_{tcp,udp}{4,6}r    port interval    : addr          (a range that keeps
      map dnat_{tcp,udp}{4,6}hr   host addr . port interval : addr  its ports: one element)
      chain prerouting  nat/prerouting -100: fib daddr type local dnat ... map @...
      chain output      nat/output -100:     the same, for the host's own traffic
      chain postrouting nat/postrouting 100: masquerade for 127.0.0.1 -> forward,
                                             hairpin and --masquerade per bridge,
                                             forwarded connections out of the VXLAN
                                             device
      set vxlan_peers   ipv4_addr: the cluster's peers' underlay addresses
      chain input       filter/input -100:   VXLAN port from a non-peer: drop

Every change is one transaction of nft's language (atomic, all or nothing), run through
in-process libnftables when it is there (see ``LibNftables``), else as ``nft -f -`` with
the script on stdin (``NETAGENT_NFT=process`` forces that); what exists is read with
``nft -j list table``. Changes are written in nft's own syntax, not JSON, because nft
1.0.6 (Debian 12) crashes with a segmentation fault parsing a JSON ``dnat`` whose address
comes from a map of concatenations (``addr . port``), the rule this design needs. No
other table is ever read or written. Map elements alone go over raw nfnetlink
(``backends/nftelems.py``), and so do those of a table made anew, after it
(``TableScript``: nothing of a table that is not there works before it is made).
"""

from __future__ import annotations

import functools
import json
import os
import shutil
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import anyio

from netagent.agent import intents as I
from netagent.agent.errors import BackendFailed, HostTimeout
from netagent.agent.serial import SerialThread

from .firewall import Batch, Counts, DriftWatcher, FirewallBackend, FirewallSpec, VxlanGuard
from .libnft import open_lib
from .nftcount import Elem
from .nftelems import ElementScript, TableScript, Writer, split_writable
from .nftmonitor import NftMonitorWatcher
from .nftobserve import Observed, parse_table

TABLE = "netagent"
FAMILY = "inet"

T = TypeVar("T")


def map_name(proto: str, version: int, bound: bool, ranged: bool = False) -> str:
    return f"dnat_{proto}{version}{'h' if bound else ''}{'r' if ranged else ''}"


#: (protocol, IP version, bound to a host address, ranged): a map and its two rules each
MAPS = [
    (p, v, b, r) for p in I.PROTOS for v in (4, 6) for b in (False, True) for r in (False, True)
]
_ADDR_TYPE = {4: "ipv4_addr", 6: "ipv6_addr"}
_L3 = {4: "ip", 6: "ip6"}


def _dnat_rule(proto: str, version: int, bound: bool, ranged: bool) -> str:
    # the same words for both kinds of map: nft takes ``addr . port`` or the address
    # alone (the packet keeps its port) from the map's value type
    name = map_name(proto, version, bound, ranged)
    key = f"{_L3[version]} daddr . {proto} dport" if bound else f"{proto} dport"
    return (
        f"fib daddr type local meta nfproto ipv{version} meta l4proto {proto} "
        f'dnat {_L3[version]} to {key} map @{name} comment "{name}"'
    )


#: the set of the cluster's peers' underlay addresses
PEERS_SET = "vxlan_peers"

Rules = dict[str, tuple[str, str]]  # comment -> (chain, rule text)


def _vxlan_rules(guard: VxlanGuard | None) -> Rules:
    """The VXLAN port's guard (input) and the masquerade of forwarded connections that
    leave through the VXLAN device (postrouting); comments name what they depend on."""
    if guard is None:
        return {}
    c = f"vxlan-guard {guard.port}"
    drop = (
        f"meta nfproto ipv4 udp dport {guard.port} ip saddr != @{PEERS_SET} counter drop "
        f'comment "{c}"'
    )
    m = f"vxlan-dnat {guard.device}"
    masq = f'ct status dnat oifname "{guard.device}" masquerade comment "{m}"'
    return {c: ("input", drop), m: ("postrouting", masq)}


def _bridge_rules(br: I.Bridge) -> dict[str, str]:
    """comment -> rule text, for the postrouting chain. ``plan`` knows a rule by its
    comment alone (``parse_table`` keeps no expressions), so the comment names all the
    rule depends on: the bridge and its subnet (a bridge readdressed to another subnet
    gets new rules instead of keeping the old ones)."""
    rules: dict[str, str] = {}
    for addr in br.addresses:
        l3 = _L3[addr.version]
        net = addr.network
        # hairpin: a namespace reaching a forward through the host's address, DNATed back
        # onto its own bridge; without the masquerade the reply would skip the host
        c = f"hairpin {br.key} {net}"
        rules[c] = f'ct status dnat {l3} saddr {net} {l3} daddr {net} masquerade comment "{c}"'
        if br.masquerade:
            c = f"masquerade {br.key} {net}"
            rules[c] = f'{l3} saddr {net} oifname != "{br.name}" masquerade comment "{c}"'
    return rules


LOCALHOST_RULE = 'ct status dnat ip saddr 127.0.0.0/8 masquerade comment "localhost"'
#: CVE-2020-8558, as kube-proxy closed it: the bridges have ``route_localnet`` (for the
#: 127.0.0.1 forward path), so a namespace could reach host services bound to 127.0.0.1
#: only. Packets to 127.0.0.0/8 that did not come from the host itself (``lo``) are
#: dropped, unless they belong to a connection that is established (the host's own,
#: answered) or was DNATed (netagent's forwards, and the replies of the host's own
#: 127.0.0.1:PORT connections to a forward). The input hook: after routing has found
#: the packet local. Checked by interface, not by source address (a namespace's root
#: can send from 127.0.0.1 too, as route_localnet lets the bridge accept)
GUARD = "localhost-guard"
GUARD_RULE = (
    'iifname != "lo" ip daddr 127.0.0.0/8 ct state != { established, related } '
    f'ct status & dnat != dnat counter drop comment "{GUARD}"'
)
#: (chain, hook, priority, type)
CHAINS = (
    ("prerouting", "prerouting", -100, "nat"),
    ("output", "output", -100, "nat"),
    ("postrouting", "postrouting", 100, "nat"),
    ("input", "input", 0, "filter"),
)


def _extra_rules(spec: FirewallSpec) -> Rules:
    """comment -> (chain, rule text): the rules that depend on the bridges, the
    localhost guard (wanted while a bridge has an IPv4 address: that is when
    route_localnet is set), and the VXLAN guard and masquerade of a cluster host."""
    rules: Rules = {}
    for br in spec.bridges:
        rules.update((c, ("postrouting", r)) for c, r in _bridge_rules(br).items())
    if any(a.version == 4 for br in spec.bridges for a in br.addresses):
        rules[GUARD] = ("input", GUARD_RULE)
    rules.update(_vxlan_rules(spec.vxlan))
    return rules


def _table_text(extra: Rules) -> str:
    lines = [f"table {FAMILY} {TABLE} {{"]
    for proto, version, bound, ranged in MAPS:
        key_type = f"{_ADDR_TYPE[version]} . inet_service" if bound else "inet_service"
        addr = _ADDR_TYPE[version]
        # ``counter``: each element counts what its lookup matched (the first packet of
        # each connection; established flows skip nat), at no cost beyond the lookup.
        # A ranged map holds port intervals and gives the address alone
        value = f"{addr}; flags interval" if ranged else f"{addr} . inet_service"
        lines.append(
            f"  map {map_name(proto, version, bound, ranged)} "
            f"{{ type {key_type} : {value}; counter; }}"
        )
    lines.append(f"  set {PEERS_SET} {{ type ipv4_addr; }}")
    for chain, hook, prio, kind in CHAINS:
        lines.append(f"  chain {chain} {{")
        lines.append(f"    type {kind} hook {hook} priority {prio}; policy accept;")
        if chain in ("prerouting", "output"):
            lines.extend(f"    {_dnat_rule(*m)}" for m in MAPS)
        if chain == "postrouting":
            lines.append(f"    {LOCALHOST_RULE}")
        lines.extend(f"    {r}" for c, r in extra.values() if c == chain)
        lines.append("  }")
    lines.append("}")
    return "\n".join(lines)


#: an address as text: forwards share a few destinations, and ``str`` of an address
#: costs three times a cache lookup (10,000 forwards planned at once)
_ip_text = functools.lru_cache(maxsize=1024)(str)


def forward_elems(fwd: I.Forward) -> list[Elem]:
    """A forward's map elements: one interval when every port keeps its number
    (``1-32767`` to ``IP:1-32767``: one element, not 32,767), else one per port."""
    host = None if fwd.host_ip is None else _ip_text(fwd.host_ip)
    dest = _ip_text(fwd.dest_ip)
    if fwd.same_ports:
        ports = f"{fwd.host_port}-{fwd.host_port + fwd.count - 1}"
        key = f"{host} . {ports}" if host is not None else ports
        return [(map_name(fwd.proto, fwd.family, host is not None, True), key, dest)]
    name = map_name(fwd.proto, fwd.family, host is not None)
    pairs = [(fwd.host_port, fwd.dest_port)] if fwd.count == 1 else fwd.pairs()
    on = "" if host is None else f"{host} . "
    return [(name, f"{on}{hport}", f"{dest} . {dport}") for hport, dport in pairs]


def _elem_lines(verb: str, elems: list[Elem], keys_only: bool = False) -> list[str]:
    by_map: dict[str, list[Elem]] = {}
    for e in elems:
        by_map.setdefault(e[0], []).append(e)
    lines = []
    for name, group in sorted(by_map.items()):
        body = ", ".join(k if keys_only else f"{k} : {v}" for _m, k, v in group)
        lines.append(f"{verb} element {FAMILY} {TABLE} {name} {{ {body} }}")
    return lines


#: seconds one libnftables call may take (a full rebuild of 10,000 forwards: ~1 s)
LIB_TIMEOUT = 30.0
#: up to this many forwards, counters are read element by element
SINGLE_READS = 64
#: up to this many elements, an update is written on the loop (while writes are quick)
QUICK_ELEMENTS = 16


def forward_counts(observed: Observed, forwards: Sequence[I.Forward]) -> dict[str, Counts]:
    """key -> (packets, bytes) summed over each forward's elements, from a listing."""
    out: dict[str, Counts] = {}
    counts = observed.counts
    for fwd in forwards:
        p = b = 0
        found = False
        for name, key, _value in forward_elems(fwd):
            c = counts.get((name, key))
            if c is not None:
                found = True
                p += c[0]
                b += c[1]
        if found:
            out[fwd.key] = (p, b)
    return out


def _element_steps(gone: list[Elem], new: list[Elem], detail: int = 50) -> list[str]:
    """One line per element for small changes; a count for big ones (a 10,000-forward
    apply need not answer with 10,000 lines)."""
    if len(gone) + len(new) > detail:
        return [
            f"{verb} {len(elems)} map elements"
            for verb, elems in (("delete", gone), ("add", new))
            if elems
        ]
    steps = [f"delete element {m} {{ {k} : {v} }}" for m, k, v in gone]
    return steps + [f"add element {m} {{ {k} : {v} }}" for m, k, v in new]


def _set_lines(verb: str, elems: list[tuple[str, str]]) -> list[str]:
    if not elems:
        return []
    body = ", ".join(e for _s, e in elems)
    return [f"{verb} element {FAMILY} {TABLE} {PEERS_SET} {{ {body} }}"]


def _peer_steps(gone: list[tuple[str, str]], new: list[tuple[str, str]]) -> list[str]:
    if len(gone) + len(new) > 50:
        return [
            f"{verb} {len(elems)} VXLAN peers"
            for verb, elems in (("delete", gone), ("add", new))
            if elems
        ]
    return [f"delete VXLAN peer {e}" for _s, e in gone] + [f"add VXLAN peer {e}" for _s, e in new]


class NftablesBackend(FirewallBackend[Observed, list[str]]):
    name = "nftables"
    guards_localhost = True
    update_reads_forwards = False  # an update is the changed forwards' elements alone

    def __init__(self) -> None:
        from .nftcount import Reader

        self.nft = shutil.which("nft") or "nft"
        self.lib = open_lib()
        #: the counters' one nfnetlink socket (``backends/nftcount.py``)
        self._counters = Reader()
        #: an update's map elements, by nfnetlink (``backends/nftelems.py``)
        self._elements = Writer()
        #: libnftables' calls and the element writer, and the counter reads, each in a
        #: thread of its own (``agent/serial.py``); a removal's counters: ``apply_counted``
        self._lib_thread = SerialThread("netagent-nft")
        self._count_thread = SerialThread("netagent-nftcount")

    @classmethod
    def probe(cls) -> tuple[bool, str]:
        nft = shutil.which("nft")
        if nft is None:
            return False, "the nft program is not installed (Debian package nftables)"
        import subprocess

        result = subprocess.run(
            [nft, "-j", "list", "tables"], capture_output=True, env={"LANG": "C"}, check=False
        )
        if result.returncode != 0:
            return False, f"nft cannot talk to the kernel: {result.stderr.decode().strip()}"
        return True, f"{nft} answers and the kernel has nf_tables"

    async def _in_lib_thread(self, fn: Callable[..., T], *args: Any, quick: bool = False) -> T:
        """In the nft thread (libnftables' and the element writer's, in order): a big
        transaction takes ~0.1-1 s, and a commit waits for any other process's (its
        mutex). A ``quick`` one (a few elements: ~0.03 ms, the hop ~0.25) runs on the loop
        unless one stalled lately (``SerialThread.call_quick``, docs/architecture.md)."""
        call = self._lib_thread.call_quick if quick else self._lib_thread.call
        try:
            with anyio.fail_after(LIB_TIMEOUT):
                return await call(fn, *args, abandon_on_cancel=True)
        except TimeoutError:
            raise HostTimeout(
                f"nftables did not answer within {LIB_TIMEOUT:g} s (its call goes on in "
                "a worker thread; the next one waits for it)"
            ) from None

    async def _nft(self, *args: str, stdin: bytes | None = None) -> bytes:
        """Run one nft command line (``args``) or script (``-f -`` with ``stdin``)."""
        if self.lib is not None:
            json_output = args[:1] == ("-j",)
            words = args[1:] if json_output else args
            script = (
                stdin if words == ("-f", "-") and stdin is not None else " ".join(words).encode()
            )
            rc, out, err = await self._in_lib_thread(self.lib.run, script, json_output)
            if rc != 0:
                raise BackendFailed(f"nft: {err.decode(errors='replace').strip()}")
            return out
        result = await anyio.run_process(
            [self.nft, *args],
            input=stdin,
            check=False,
            env={"LANG": "C", "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin")},
        )
        if result.returncode != 0:
            raise BackendFailed(f"nft {' '.join(args)}: {result.stderr.decode().strip()}")
        return bytes(result.stdout)

    async def observe(self) -> Observed:
        try:
            out = await self._nft("-j", "list", "table", FAMILY, TABLE)
        except BackendFailed as exc:
            if "No such file or directory" in exc.message:
                return Observed(present=False)
            raise
        return parse_table(json.loads(out))

    def drift_watcher(self) -> DriftWatcher:
        return NftMonitorWatcher((f" {FAMILY} {TABLE}",))

    def plan(self, spec: FirewallSpec, observed: Observed) -> Batch[list[str]]:
        want_elems = {e for f in spec.forwards for e in forward_elems(f)}
        extra = _extra_rules(spec)
        want_peers = {(PEERS_SET, p) for p in (spec.vxlan.peers if spec.vxlan else ())}
        names = {map_name(*m) for m in MAPS}
        intact = (
            observed.present
            and names <= observed.maps
            # maps without counters (a table from before counters): written anew once
            and names <= observed.counted
            and PEERS_SET in observed.sets
            and {c for c, _h, _p, _t in CHAINS} <= observed.chains
            and all(
                sorted(c for c, _h in observed.rules.get(map_name(*m), []))
                == ["output", "prerouting"]
                for m in MAPS
            )
            and [c for c, _h in observed.rules.get("localhost", [])] == ["postrouting"]
        )
        if not intact:
            return self._full(extra, want_elems, want_peers, observed.present)
        lines: list[str] = []
        steps: list[str] = []
        static = {map_name(*m) for m in MAPS} | {"localhost"}
        # per-bridge rules, the guards and the VXLAN masquerade: delete the ones no longer
        # wanted (or in the wrong chain, or twice), add the missing ones
        for comment, handles in sorted(observed.rules.items()):
            if comment in static:
                continue
            if comment in extra and [c for c, _h in handles] == [extra[comment][0]]:
                continue
            for chain, h in handles:
                lines.append(f"delete rule {FAMILY} {TABLE} {chain} handle {h}")
            steps.append(f"delete rule {comment or '(no comment)'}")
        for comment, (chain, rule) in extra.items():
            if [c for c, _h in observed.rules.get(comment, [])] != [chain]:
                lines.append(f"add rule {FAMILY} {TABLE} {chain} {rule}")
                steps.append(f"add rule {comment}")
        surplus = sorted(observed.elems - want_elems)
        missing = sorted(want_elems - observed.elems)
        lines += _elem_lines("delete", surplus, keys_only=True) + _elem_lines("add", missing)
        steps += _element_steps(surplus, missing)
        gone_peers = sorted(observed.set_elems - want_peers)
        new_peers = sorted(want_peers - observed.set_elems)
        lines += _set_lines("delete", gone_peers) + _set_lines("add", new_peers)
        steps += _peer_steps(gone_peers, new_peers)
        touched: frozenset[str] = frozenset()
        if missing:
            lost = set(missing)
            touched = frozenset(
                f.key for f in spec.forwards if not lost.isdisjoint(forward_elems(f))
            )
        return Batch(steps=steps, payload=lines, touched=touched)

    def _full(
        self,
        extra: Rules,
        elems: set[Elem],
        peers: set[tuple[str, str]],
        present: bool,
    ) -> Batch[list[str]]:
        # add + delete + create: atomic whether or not the table exists now
        table = [f"add table {FAMILY} {TABLE}", f"delete table {FAMILY} {TABLE}"]
        table.append(_table_text(extra))
        ordered, peer_lines = sorted(elems), _set_lines("add", sorted(peers))
        lines = [*table, *_elem_lines("add", ordered), *peer_lines]
        what = "rebuild" if present else "create"
        count = 2 * len(MAPS) + 1 + len(extra)
        peers_text = f", {len(peers)} VXLAN peers" if peers else ""
        steps = [
            f"{what} table {FAMILY} {TABLE} ({count} rules, {len(elems)} map elements{peers_text})"
        ]
        if present:
            # what is there keeps working until the one transaction replaces it
            return Batch(steps=steps, payload=lines, rebuild=True)
        # nothing there to keep: the table, then its elements by nfnetlink (TableScript)
        direct, intervals = split_writable(ordered)
        head = [*table, *_elem_lines("add", intervals), *peer_lines]
        return Batch(steps=steps, payload=TableScript(lines, head, direct), rebuild=True)

    def plan_update(
        self, spec: FirewallSpec, added: list[I.Forward], removed: list[I.Forward]
    ) -> Batch[list[str]]:
        gone = [e for f in removed for e in forward_elems(f)]
        new = [e for f in added for e in forward_elems(f)]
        lines = _elem_lines("delete", gone, keys_only=True) + _elem_lines("add", new)
        return Batch(
            steps=_element_steps(gone, new),
            payload=ElementScript(lines, gone, new),
            touched=frozenset(f.key for f in added),
        )

    def plan_guard(
        self, spec: FirewallSpec, added: set[str], removed: set[str]
    ) -> Batch[list[str]]:
        """Elements of ``vxlan_peers`` only; deleting one that is not there fails the
        transaction (then a full sync follows)."""
        gone = sorted((PEERS_SET, ip) for ip in removed)
        new = sorted((PEERS_SET, ip) for ip in added)
        return Batch(
            steps=_peer_steps(gone, new),
            payload=_set_lines("delete", gone) + _set_lines("add", new),
        )

    async def apply(self, batch: Batch[list[str]]) -> None:
        if batch.empty or batch.payload is None:
            return
        if isinstance(batch.payload, ElementScript) and batch.payload.writable:
            # elements alone, by nfnetlink (backends/nftelems.py: ~0.03 ms, not ~0.26)
            await self._write_elements(batch.payload)
            return
        if isinstance(batch.payload, TableScript):
            # a new table: its rules by libnftables, then its elements by nfnetlink
            await self._nft("-f", "-", stdin=("\n".join(batch.payload.head) + "\n").encode())
            await self._write_elements(batch.payload.elements)
            return
        script = "\n".join(batch.payload) + "\n"
        await self._nft("-f", "-", stdin=script.encode())

    async def counters(self, forwards: Sequence[I.Forward]) -> dict[str, Counts] | None:
        """Packets and bytes each forward's map elements counted (its DNAT: the first
        packet of each connection), by key. A few forwards are read element by element
        over nfnetlink (``backends/nftcount.py``: ~30 us each, where ``nft get element``
        costs 30-40 ms at 10,000 elements, refetching its cache); many, with one dump of
        each map they are in, in a worker thread. A forward not installed has no entry."""
        if not forwards:
            return {}
        read, wanted = self._counts_read(forwards)
        try:
            return await self._count_thread.call(read, FAMILY, TABLE, wanted)
        except OSError:
            return None

    def _counts_read(
        self, forwards: Sequence[I.Forward]
    ) -> tuple[Callable[[str, str, list[tuple[str, Elem]]], dict[str, Counts]], list[Any]]:
        """How to read their counters (a few by element, many by a map's dump), and what."""
        wanted = [(f.key, e) for f in forwards for e in forward_elems(f)]
        if len(forwards) > SINGLE_READS:
            return self._counters.dumped_counts, wanted
        return self._counters.forward_counts, wanted

    async def _write_elements(self, payload: ElementScript, before: Any = None) -> Any:
        """The elements' batch, after ``before()`` (its result returned): in the nft
        thread, or a few elements on the loop (``_in_lib_thread``; with ``before``, a
        counter read, only while no other read holds the counters' socket)."""

        def job() -> Any:
            result = before() if before is not None else None
            self._elements.write(FAMILY, TABLE, payload.gone, payload.new)
            return result

        quick = payload.size <= QUICK_ELEMENTS and (before is None or self._count_thread.idle)
        try:
            return await self._in_lib_thread(job, quick=quick)
        except OSError as exc:
            raise BackendFailed(f"nft: could not process the map elements: {exc}") from None

    async def apply_counted(
        self, batch: Batch[list[str]], forwards: Sequence[I.Forward]
    ) -> dict[str, Counts] | None:
        """A removal's update: the removed forwards' counters read right before their
        elements go, in the same call to the kernel's thread (one hop, not two)."""
        payload = batch.payload
        if not isinstance(payload, ElementScript) or not payload.writable:
            return await super().apply_counted(batch, forwards)
        read, wanted = self._counts_read(forwards)

        def counts() -> dict[str, Counts] | None:
            try:
                return read(FAMILY, TABLE, wanted)
            except OSError:  # the counters are a help: the write goes on
                return None

        return await self._write_elements(payload, counts)  # type: ignore[no-any-return]

    async def close(self) -> None:
        self._count_thread.close()
        self._lib_thread.close()
        self._counters.close()
        self._elements.close()

    async def purge(self) -> list[str]:
        if not (await self.observe()).present:
            return []
        await self._nft("delete", "table", FAMILY, TABLE)
        return [f"deleted table {FAMILY} {TABLE}"]
