"""Named namespaces made and removed in-process (``backends/netns.py``), as ``ip netns``
makes them: visible to ``ip netns``, usable by ``ip netns exec``, one winner per name,
and no thread of the caller left inside. In a sandbox."""

from __future__ import annotations

import json
import sys

import pytest

from netagent.cli.sandbox import Sandbox

pytestmark = pytest.mark.privileged

SCRIPT = r"""
import json, os, socket, struct, sys
from netagent.backends import netns

out = {}
sock = netns.add("/run/netns/made")
# the socket lives in the new namespace: a dump there lists lo alone
sock.send(struct.pack("=IHHII", 32, 18, 0x301, 1, 0) + bytes(16))
names = []
done = False
while not done:
    data = sock.recv(65536)
    off = 0
    while off < len(data):
        length, kind = struct.unpack_from("=IH", data, off)
        if kind == 3:
            done = True
            break
        if kind == 16:
            a = off + 32
            while a < off + length:
                alen, atype = struct.unpack_from("=HH", data, a)
                if atype == 3:
                    names.append(data[a + 4 : a + alen].rstrip(b"\0").decode())
                a += (alen + 3) & ~3
        off += (length + 3) & ~3
out["links_inside"] = names
# the caller's own threads stayed in the host namespace
out["same_netns"] = os.readlink("/proc/self/ns/net") == os.readlink(
    f"/proc/self/task/{os.getpid()}/ns/net")
out["listed_after_add"] = sorted(os.listdir("/run/netns"))
try:
    netns.add("/run/netns/made")
    out["second_add"] = "made"
except FileExistsError:
    out["second_add"] = "exists"
sock.close()
netns.delete("/run/netns/made")
out["listed_after_del"] = sorted(os.listdir("/run/netns"))
try:
    netns.delete("/run/netns/made")
    out["second_del"] = "deleted"
except FileNotFoundError:
    out["second_del"] = "missing"
print(json.dumps(out))
"""


def test_add_and_delete_as_ip_netns_does(sandbox: Sandbox) -> None:
    done = sandbox.run([sys.executable, "-c", SCRIPT])
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out == {
        "links_inside": ["lo"],
        "same_netns": True,
        "listed_after_add": ["made"],
        "second_add": "exists",
        "listed_after_del": [],
        "second_del": "missing",
    }


def test_ip_netns_sees_and_enters_what_it_makes(sandbox: Sandbox) -> None:
    code = "from netagent.backends import netns; netns.add('/run/netns/seen').close()"
    sandbox.run([sys.executable, "-c", code])
    assert sandbox.run(["ip", "netns", "list"]).stdout.split()[0] == "seen"
    inside = sandbox.run(["ip", "netns", "exec", "seen", "ip", "-o", "link"]).stdout
    assert [line.split(":")[1].strip() for line in inside.splitlines()] == ["lo"]
    sandbox.run(["ip", "netns", "del", "seen"])  # and ip removes it as its own
    assert sandbox.run(["ip", "netns", "list"]).stdout.strip() == ""
