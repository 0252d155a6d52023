"""The daemon's and the kernel's whole state, read to compare before and after."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

from .daemon import Daemon
from .protocol import request


def snapshot(d: Daemon) -> dict[str, Any]:
    """What netagent holds and what the kernel has: desired intents, the nft ruleset,
    links and namespaces in the sandbox. Equal snapshots mean nothing changed."""
    desired = request(d.socket, "show")["result"]
    nft = d.sh("nft", "list", "ruleset", check=False).stdout
    links = d.sh("ip", "-o", "link", "show").stdout
    names = sorted(line.split(":")[1].strip().split("@")[0] for line in links.splitlines())
    netns = sorted(d.sh("ip", "netns", "list").stdout.split())
    return {
        "intents": [i["intent"] for i in desired["intents"]],
        "nft": nft,
        "links": names,
        "netns": netns,
    }


def not_in_place(d: Daemon) -> list[Any]:
    """(key, what is missing, error) of each intent ``show`` finds not in place."""
    return [
        (i["key"], i["missing"], i["error"])
        for i in request(d.socket, "show")["result"]["intents"]
        if not i["in_place"]
    ]


def all_in_place(d: Daemon) -> bool:
    return not not_in_place(d)


def nft_forwards(d: Daemon) -> Counter[tuple[str, int, str]]:
    """The forwards in the kernel, from netagent's nft maps: (proto, host port,
    destination) -> how many times (1, or the map is wrong)."""
    out = d.sh("nft", "-j", "list", "table", "inet", "netagent", check=False).stdout
    found: Counter[tuple[str, int, str]] = Counter()
    if not out.strip():
        return found
    for item in json.loads(out).get("nftables", []):
        m = item.get("map")
        if not m or not m.get("name", "").startswith("dnat_") or m["name"].endswith("h"):
            continue
        proto = m["name"][len("dnat_") : -1]
        for key, value in m.get("elem", []):
            ip, port = value["concat"]
            if isinstance(key, dict) and "elem" in key:  # an element with its counter
                key = key["elem"]["val"]
            keys = range(key["range"][0], key["range"][1] + 1) if isinstance(key, dict) else [key]
            for offset, k in enumerate(keys):
                found[(proto, int(k), f"{ip}:{int(port) + offset}")] += 1
    return found
