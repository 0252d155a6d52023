"""The real netlink backend (``backends/pyroute.py``) against the sandbox's kernel: dumps
asked for at once on one socket take turns. The kernel runs one dump per netlink socket
and refuses a second started meanwhile with EBUSY; the daemon's event source dumped the
host's addresses while a request's pass dumped a bridge's, and ``bridge add`` failed."""

from __future__ import annotations

import json
import sys

import pytest

from netagent.cli.sandbox import Sandbox

pytestmark = pytest.mark.privileged

_CONCURRENT_DUMPS = """
import asyncio, ipaddress, json, socket
from netagent.backends.pyroute import PyrouteNetlink

async def main():
    net = PyrouteNetlink()
    await net.start()
    try:
        await net.ipr.link("add", ifname="dumps0", kind="bridge", state="up")
        index = socket.if_nametoindex("dumps0")
        want = set()
        for n in range(1, 201):  # enough that a dump takes more than one datagram
            addr = ipaddress.ip_interface(f"10.77.0.{n}/16")
            await net.add_address(None, index, addr)
            want.add(addr)
        calls = []
        for _ in range(8):
            calls += [net.addresses(None, index), net.host_addressed(),
                      net.show_links(None), net.show_routes(None)]
        results = await asyncio.gather(*calls, return_exceptions=True)
        errors = [repr(r) for r in results if isinstance(r, BaseException)]
        # (the kernel gives the bridge an IPv6 link-local address of its own too)
        same = all({a for a in r if a.version == 4} == want for r in results[0::4])
        print(json.dumps({"errors": errors, "same": same, "n": len(results)}))
    finally:
        await net.close()

asyncio.run(main())
"""


def test_dumps_at_once_on_one_socket_take_turns(sandbox: Sandbox) -> None:
    out = sandbox.run([sys.executable, "-c", _CONCURRENT_DUMPS], timeout=60).stdout
    got = json.loads(out.strip().splitlines()[-1])
    assert got["errors"] == []
    assert got["n"] == 32
    assert got["same"], "every address dump saw the link's 200 addresses"
