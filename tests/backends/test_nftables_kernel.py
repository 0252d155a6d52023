"""The nftables backend's full syncs against the real kernel (in a sandbox).

A table that is not there is made in two transactions (``nftelems.TableScript``: the
table by libnftables, its map elements by nfnetlink); a table that is there is replaced
in one. Both must leave the same table: the same elements (each with its counter), the
same intervals and sets, and nothing left for the next plan to do.
"""

from __future__ import annotations

import json
import sys

import pytest

from tests.support.sandbox import open_sandbox

pytestmark = pytest.mark.privileged

SCRIPT = r"""
import ipaddress, json
import anyio
from netagent.agent import intents as I
from netagent.backends.firewall import FirewallSpec, VxlanGuard
from netagent.backends.nftables import NftablesBackend
from netagent.backends.nftelems import TableScript
from netagent.backends.nftobserve import Observed

forwards = tuple(I.make_forward(str(10000 + i), f"192.168.15.2:{1 + i}") for i in range(1500))
forwards += (
    I.make_forward("7000-7099", "192.168.15.3:7000-7099"),  # an interval: libnftables'
    I.make_forward("8000-8001", "192.168.15.3:9000-9001", "udp"),
    I.make_forward("81", "10.0.0.9:81", host_ip="10.0.0.1"),
    I.make_forward("80", "[fd00:15::2]:8080"),
)
bridge = I.Bridge("v-net-0", (ipaddress.ip_interface("192.168.15.1/24"),), masquerade=True)
guard = VxlanGuard("netagent.1", 4789, frozenset({"198.51.100.2", "198.51.100.3"}))
spec = FirewallSpec(forwards=forwards, bridges=(bridge,), vxlan=guard)

def table(obs):
    return {"elems": sorted(obs.elems), "sets": sorted(obs.set_elems),
            "counted": sorted(obs.counted), "chains": sorted(obs.chains),
            "rules": sorted(obs.rules), "counts": len(obs.counts)}

async def main():
    b = NftablesBackend()
    out = {"lib": b.lib is not None}
    before = await b.observe()
    batch = b.plan(spec, before)
    out["absent"] = not before.present
    out["two_parts"] = isinstance(batch.payload, TableScript)
    out["head_elements"] = [l.split(" {")[0] for l in batch.payload.head if "element" in l]
    out["by_nfnetlink"] = len(batch.payload.elements.new)
    await b.apply(batch)
    made = await b.observe()
    out["left_to_do"] = b.plan(spec, made).steps
    out["made"] = table(made)
    # the same spec over a table that is there: one transaction replaces it
    again = b.plan(spec, Observed(present=True))
    out["one_part"] = type(again.payload).__name__
    await b.apply(again)
    out["replaced"] = table(await b.observe())
    await b.close()
    print(json.dumps(out))

anyio.run(main)
"""


def test_a_new_table_in_two_parts_is_the_table_of_one_transaction() -> None:
    with open_sandbox() as box:
        result = box.run([sys.executable, "-c", SCRIPT])
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["absent"] and out["two_parts"]
    # the intervals and the peers' set by libnftables, every other element by nfnetlink
    assert out["head_elements"] == [
        "add element inet netagent dnat_tcp4r",
        "add element inet netagent vxlan_peers",
    ]
    assert out["by_nfnetlink"] == 1500 + 2 + 1 + 1
    assert out["left_to_do"] == []
    made = out["made"]
    assert len(made["elems"]) == 1500 + 1 + 2 + 1 + 1
    assert made["counts"] == len(made["elems"])  # each element with its counter
    assert made["sets"] == [["vxlan_peers", "198.51.100.2"], ["vxlan_peers", "198.51.100.3"]]
    assert out["one_part"] == "list"
    assert out["replaced"] == made
