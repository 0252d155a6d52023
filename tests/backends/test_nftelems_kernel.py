"""Map elements written over raw nfnetlink, against the real kernel (in a sandbox).

The writer must leave exactly what ``nft add element`` / ``delete element`` would: the
same keys and values (read back by nft itself), each new element with its counter, one
transaction per batch (a refused part changes nothing), and nft's errors for a value
that conflicts or an element that is not there.
"""

from __future__ import annotations

import json
import sys

import pytest

from tests.support.sandbox import open_sandbox

pytestmark = pytest.mark.privileged

SCRIPT = r"""
import json, subprocess
from netagent.backends.nftelems import Writer
from netagent.backends.nftcount import Reader

MAPS = {
    "p4": "inet_service : ipv4_addr . inet_service",
    "p6": "inet_service : ipv6_addr . inet_service",
    "h4": "ipv4_addr . inet_service : ipv4_addr . inet_service",
    "h6": "ipv6_addr . inet_service : ipv6_addr . inet_service",
}
subprocess.run(["nft", "add table inet t"], check=True)
for name, typ in MAPS.items():
    subprocess.run(["nft", f"add map inet t {name} {{ type {typ} ; counter ; }}"], check=True)

def listed(name):
    doc = json.loads(subprocess.run(["nft", "-j", "list", "map", "inet", "t", name],
                                    capture_output=True, text=True, check=True).stdout)
    m = [x["map"] for x in doc["nftables"] if "map" in x][0]
    return sorted(json.dumps(e, sort_keys=True) for e in m.get("elem", []))

w = Writer()
out = {}
new = [("p4", "8000", "10.0.0.2 . 80"), ("p6", "8000", "fd00::2 . 80"),
       ("h4", "192.0.2.1 . 8000", "10.0.0.2 . 80"), ("h6", "2001:db8::1 . 8000", "fd00::2 . 443")]
w.write("inet", "t", [], new)
raw = {name: listed(name) for name in MAPS}
# the same elements by nft, in a copy of the table, read back the same way
FLUSH = "; ".join(f"flush map inet t {name}" for name in MAPS)
subprocess.run(["nft", FLUSH], check=True)
subprocess.run(["nft", "add element inet t p4 { 8000 : 10.0.0.2 . 80 }; "
                "add element inet t p6 { 8000 : fd00::2 . 80 }; "
                "add element inet t h4 { 192.0.2.1 . 8000 : 10.0.0.2 . 80 }; "
                "add element inet t h6 { 2001:db8::1 . 8000 : fd00::2 . 443 }"], check=True)
out["same_as_nft"] = {name: raw[name] == listed(name) for name in MAPS}
out["listed_p4"] = raw["p4"]
subprocess.run(["nft", FLUSH], check=True)
w.write("inet", "t", [], new)
out["counters"] = Reader().element_counters("inet", "t", new)
w.write("inet", "t", [], new[:1])  # there with the same value: nothing changes
out["again_same"] = listed("p4") == raw["p4"]
def refused(gone, added):
    try:
        w.write("inet", "t", gone, added)
        return "no error"
    except OSError as exc:
        return exc.errno
out["conflict"] = refused([], [("p4", "9000", "10.0.0.3 . 90"), ("p4", "8000", "10.0.0.9 . 1")])
out["missing"] = refused([("p4", "7", "")], [("p4", "9001", "10.0.0.3 . 91")])
out["after_refusals"] = listed("p4") == raw["p4"]  # 9000 and 9001 went with them
out["closed_after_error"] = w._sock is None
many = [("p4", str(10000 + i), f"10.0.{i // 250}.{i % 250 + 1} . {1 + i}") for i in range(2500)]
w.write("inet", "t", [("p4", "8000", "")], many)
out["many"] = len(listed("p4"))
w.write("inet", "t", many[:2000], [])
out["after_delete"] = len(listed("p4"))
w.close()
print(json.dumps(out))
"""


def test_elements_by_nfnetlink_are_what_nft_makes() -> None:
    with open_sandbox() as box:
        result = box.run([sys.executable, "-c", SCRIPT])
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["same_as_nft"] == {"p4": True, "p6": True, "h4": True, "h6": True}
    assert len(out["listed_p4"]) == 1 and '"counter"' in out["listed_p4"][0]
    assert out["counters"] == [[0, 0]] * 4  # each new element has its counter
    assert out["again_same"] is True
    assert out["conflict"] == 17  # EEXIST: another value for a key that is there
    assert out["missing"] == 2  # ENOENT: deleting what is not there
    assert out["after_refusals"] is True  # all or nothing
    assert out["closed_after_error"] is True
    assert out["many"] == 2500  # three messages of at most 1,000 in one batch
    assert out["after_delete"] == 500


FILTER_SCRIPT = r"""
import json, select, socket, struct, subprocess, time
from netagent.backends import netfilter, nftmonitor
from netagent.backends.nftelems import Writer

subprocess.run(["nft", "add table inet t"], check=True)
subprocess.run(["nft", "add map inet t p4 { type inet_service : ipv4_addr . inet_service ; }"],
               check=True)
mon = nftmonitor.open_socket()
follow = lambda ids: nftmonitor.ignore_portids(mon, ids)
netfilter.OPEN.follow(follow)
w = Writer()
w.write("inet", "t", [], [("p4", "8000", "10.0.0.2 . 80")])  # ours: never queued on mon
own = w._sock.getsockname()[0]
raw = netfilter.open_socket(2.0)  # this process's too, but not a kept socket: kept
w._write(raw, "inet", "t", [], [("p4", "8001", "10.0.0.2 . 81")])
subprocess.run(["nft", "add element inet t p4 { 8002 : 10.0.0.2 . 82 }"], check=True)
w.close()  # its port id goes from the filter first
w.write("inet", "t", [], [("p4", "8003", "10.0.0.2 . 83")])  # a new socket of ours
subprocess.run(["nft", "add element inet t p4 { 8004 : 10.0.0.2 . 84 }"], check=True)
lines, portids, gens = [], [], 0
deadline = time.monotonic() + 5
while gens < 3 and time.monotonic() < deadline:
    if not select.select([mon], [], [], 0.5)[0]:
        continue
    data = mon.recv(1 << 16)
    off = 0
    while off + 20 <= len(data):
        length, kind, _f, _s, pid = struct.unpack_from("=IHHII", data, off)
        portids.append(pid)
        off += (length + 3) & ~3
    for line in nftmonitor.parse(data):
        lines.append(line)
        gens += line.startswith("# new generation")
netfilter.OPEN.unfollow(follow)
print(json.dumps({"lines": lines, "portids": portids, "own": [own, w._sock.getsockname()[0]],
                  "raw": raw.getsockname()[0]}))
"""


def test_the_watcher_s_filter_drops_the_notifications_of_our_kept_sockets() -> None:
    """nf_tables names the socket of each transaction in its notifications: with the
    filter, those of the kept sockets (both writers' in turn) never reach the watcher,
    and everyone else's do, in order (another socket of the same process, nft)."""
    with open_sandbox() as box:
        result = box.run([sys.executable, "-c", FILTER_SCRIPT])
    out = json.loads(result.stdout.strip().splitlines()[-1])
    elements = [line for line in out["lines"] if line.startswith("add element")]
    gens = [line for line in out["lines"] if line.startswith("# new generation")]
    assert elements == ["add element inet t"] * 3, out["lines"]
    assert len(gens) == 3 and "(nft)" in gens[1] and "(nft)" in gens[2], gens
    assert not set(out["own"]) & set(out["portids"])
    assert out["raw"] in out["portids"]
