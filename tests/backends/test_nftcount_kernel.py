"""Counter reads over the kept nfnetlink socket, against the real kernel (in a sandbox).

The reader keeps one socket for all its reads (a socket opened for a read after a
deletion waits for the kernel to let go of the deleted elements: ~15 ms a removal); the
test proves it reads the right counters around deletions, on the same socket, and opens
another after a failure.
"""

from __future__ import annotations

import json
import sys

import pytest

from tests.support.sandbox import open_sandbox

pytestmark = pytest.mark.privileged

SCRIPT = r"""
import json, subprocess, sys
from netagent.backends.nftcount import Reader
from netagent.backends.libnft import LibNftables

def nft(cmd):
    subprocess.run(["nft", cmd], check=True)

nft("add table inet t")
nft("add map inet t m { type inet_service : ipv4_addr . inet_service ; counter ; }")
nft("add element inet t m { 8000 : 10.0.0.2 . 80, 8001 : 10.0.0.2 . 81, 8002 : 10.0.0.2 . 82 }")
lib = LibNftables()
r = Reader()
out = {}
keys = [("m", "8000", ""), ("m", "8001", ""), ("m", "9", "")]
out["before"] = r.element_counters("inet", "t", keys)
fd = r._sock.fileno()
lib.run(b"delete element inet t m { 8000 }")
out["after_delete"] = r.element_counters("inet", "t", [("m", "8000", ""), ("m", "8002", "")])
out["same_socket"] = r._sock.fileno() == fd
out["dump"] = sorted(v for v in r.dump_counters("inet", "t", "m").values())
out["dump_keys"] = len(r.dump_counters("inet", "t", "m"))
try:
    r.dump_counters("inet", "t", "nosuchmap")
    out["missing"] = "no error"
except OSError as exc:
    out["missing"] = exc.errno
out["closed_after_error"] = r._sock is None
out["again"] = r.element_counters("inet", "t", [("m", "8001", "")])
r.close()
print(json.dumps(out))
"""


def test_counters_are_read_around_deletions_on_one_kept_socket() -> None:
    with open_sandbox() as box:
        result = box.run([sys.executable, "-c", SCRIPT])
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["before"] == [[0, 0], [0, 0], None]  # the third is not in the map
    assert out["after_delete"] == [None, [0, 0]]
    assert out["same_socket"] is True
    assert out["dump"] == [[0, 0], [0, 0]] and out["dump_keys"] == 2
    assert out["missing"] == 2  # ENOENT: a map that is not there is an error for a dump
    assert out["closed_after_error"] is True
    assert out["again"] == [[0, 0]]
