"""Rule counters of the forwards' DNAT rules, read without a process.

iptables-nft rules are nf_tables rules: in-process libnftables lists a chain of the
``ip nat`` table as JSON, each iptables rule with its native matches (``tcp dport``,
``ip daddr``) and its ``counter``; the comment and the DNAT target are compat (``xt``)
expressions listed by name only. So a rule is known by its chain (a port block: the
protocol), its destination port and its host address: that names one forward's port.
Starting ``iptables-save -c`` instead would hold the daemon's loop 6-8 ms (a process
from a large one) and read every rule. Legacy iptables rules are not in nf_tables:
there, no counters (None).
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterable, Sequence
from typing import Any

from netagent.agent import intents as I

from ..firewall import Counts
from .rules import leaf_name, leaves_of

#: above this many block chains, the whole table is listed at once
MANY_CHAINS = 16
#: (protocol, port, host address or None) -> (packets, bytes)
PortCounts = dict[tuple[str, int, str | None], Counts]


def _documents(raw: bytes) -> Iterable[dict[str, Any]]:
    """nft prints one JSON document per listing command."""
    text = raw.decode(errors="replace")
    decoder = json.JSONDecoder()
    at = 0
    while True:
        while at < len(text) and text[at].isspace():
            at += 1
        if at >= len(text):
            return
        doc, at = decoder.raw_decode(text, at)
        if isinstance(doc, dict):
            yield doc


def parse_rules(raw: bytes) -> PortCounts:
    """(protocol, port, host address) -> counter, for every DNAT rule of a port block
    in the listing (the chain name says the protocol; a ``--dport A:B`` rule counts at
    A)."""
    out: PortCounts = {}
    for doc in _documents(raw):
        for item in doc.get("nftables", ()):
            rule = item.get("rule") if isinstance(item, dict) else None
            if not isinstance(rule, dict):
                continue
            chain = str(rule.get("chain", ""))
            parts = chain.split("-")
            if len(parts) != 4 or parts[1] not in ("TCP", "UDP"):
                continue
            port: int | None = None
            host: str | None = None
            counts: Counts | None = None
            dnat = False
            for expr in rule.get("expr", ()):
                if not isinstance(expr, dict):
                    continue
                match = expr.get("match")
                if isinstance(match, dict) and match.get("op") == "==":
                    left = match.get("left", {})
                    payload = left.get("payload", {}) if isinstance(left, dict) else {}
                    field = payload.get("field")
                    right = match.get("right")
                    if field == "dport" and isinstance(right, int):
                        port = right
                    elif field == "dport" and isinstance(right, dict) and "range" in right:
                        port = int(right["range"][0])  # a range's rule, by its first port
                    elif field == "daddr" and isinstance(right, str):
                        host = str(ipaddress.ip_address(right))
                counter = expr.get("counter")
                if isinstance(counter, dict):
                    counts = (int(counter.get("packets", 0)), int(counter.get("bytes", 0)))
                xt = expr.get("xt")
                if (isinstance(xt, dict) and xt.get("name") == "DNAT") or "dnat" in expr:
                    dnat = True
            if dnat and port is not None and counts is not None:
                key = (parts[1].lower(), port, host)
                p, b = out.get(key, (0, 0))
                out[key] = (p + counts[0], b + counts[1])
    return out


def forward_counts(
    ports: dict[int, PortCounts], forwards: Sequence[I.Forward]
) -> dict[str, Counts]:
    """key -> (packets, bytes) summed over the forward's ports (``ports``: per family)."""
    out: dict[str, Counts] = {}
    for fwd in forwards:
        table = ports.get(fwd.family, {})
        host = str(fwd.host_ip) if fwd.host_ip is not None else None
        p = b = 0
        found = False
        for port in fwd.host_ports:
            c = table.get((fwd.proto, port, host))
            if c is not None:
                found = True
                p += c[0]
                b += c[1]
        if found:
            out[fwd.key] = (p, b)
    return out


def listing(forwards: Sequence[I.Forward]) -> dict[int, bytes]:
    """family -> the nft commands that list the block chains these forwards live in (or
    the whole nat table, when they are many)."""
    chains: dict[int, set[str]] = {}
    for fwd in forwards:
        chains.setdefault(fwd.family, set()).update(leaf_name(leaf) for leaf in leaves_of(fwd))
    out: dict[int, bytes] = {}
    for family, names in chains.items():
        table = "ip nat" if family == 4 else "ip6 nat"
        if len(names) > MANY_CHAINS:
            out[family] = f"list table {table}".encode()
        else:
            out[family] = "\n".join(f"list chain {table} {n}" for n in sorted(names)).encode()
    return out
