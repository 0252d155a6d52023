"""What ``nft -j list table inet netagent`` says is there, read into :class:`Observed`:
the maps' elements (with their counters), the sets' elements, the chains, and the rules
by their comment (the planner in ``backends/nftables.py`` compares it with the spec).

Values are normalized to the planner's text form (``Elem``: map, key, value), so that
what nft lists (``{"concat": [...]}``, ``{"range": [...]}``, ``{"elem": {...}}`` around
an element with a counter, an IPv6 address in any spelling) equals what it writes.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any

from .firewall import Counts
from .nftcount import Elem


def _norm(value: Any) -> str:
    if isinstance(value, dict) and "concat" in value:
        return " . ".join(_norm(v) for v in value["concat"])
    if isinstance(value, dict) and "elem" in value:  # an element with its counter
        return _norm(value["elem"].get("val"))
    if isinstance(value, dict) and "range" in value:  # an interval of a ranged map
        lo, hi = value["range"]
        return f"{_norm(lo)}-{_norm(hi)}"
    if isinstance(value, str):
        try:
            return str(ipaddress.ip_address(value))
        except ValueError:
            return value
    return str(value)


@dataclass
class Observed:
    present: bool = False
    elems: set[Elem] = field(default_factory=set)
    rules: dict[str, list[tuple[str, int]]] = field(
        default_factory=dict
    )  # comment -> (chain, handle)
    chains: set[str] = field(default_factory=set)
    maps: set[str] = field(default_factory=set)
    sets: set[str] = field(default_factory=set)
    #: (set name, element)
    set_elems: set[tuple[str, str]] = field(default_factory=set)
    #: the maps declared with ``counter`` (a table written before counters has none)
    counted: set[str] = field(default_factory=set)
    #: (map, key) -> the element's counter, when it has one
    counts: dict[tuple[str, str], Counts] = field(default_factory=dict)


def _counter(key: Any) -> Counts | None:
    if isinstance(key, dict) and "elem" in key:
        c = key["elem"].get("counter")
        if isinstance(c, dict):
            return int(c.get("packets", 0)), int(c.get("bytes", 0))
    return None


def parse_table(doc: dict[str, Any]) -> Observed:
    obs = Observed(present=True)
    for item in doc.get("nftables", []):
        if "map" in item:
            m = item["map"]
            name = m["name"]
            obs.maps.add(name)
            if any(isinstance(st, dict) and "counter" in st for st in m.get("stmt", ())):
                obs.counted.add(name)
            for k, v in m.get("elem", []):
                key = _norm(k)
                obs.elems.add((name, key, _norm(v)))
                counts = _counter(k)
                if counts is not None:
                    obs.counts[(name, key)] = counts
        elif "set" in item:
            st = item["set"]
            obs.sets.add(st["name"])
            for e in st.get("elem", []):
                obs.set_elems.add((st["name"], _norm(e)))
        elif "chain" in item:
            obs.chains.add(item["chain"]["name"])
        elif "rule" in item:
            r = item["rule"]
            obs.rules.setdefault(r.get("comment", ""), []).append((r["chain"], r["handle"]))
    return obs
