"""The daemon's netlink sockets against the sandbox's kernel.

* ``backends/pyroute.py``: dumps asked for at once on one socket take turns. The kernel
  runs one dump per netlink socket and refuses a second started meanwhile with EBUSY; the
  daemon's event source dumped the host's addresses while a request's pass dumped a
  bridge's, and ``bridge add`` failed.
* ``backends/rtnl.py``'s ``Requests``: which requests go out on the event loop and which
  from the sender thread, and in what order."""

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


_FEW_INLINE = """
import asyncio, json, socket, threading
from netagent.backends import rtnl

class Sock:
    '''The raw socket, its second send refused as a full buffer would.'''
    def __init__(self, real):
        self.real, self.sends, self.threads = real, 0, []
    def send(self, msg):
        self.sends += 1
        self.threads.append(threading.current_thread().name)
        if self.sends == 2:
            raise BlockingIOError
        return self.real.send(msg)
    def __getattr__(self, name):
        return getattr(self.real, name)

async def main():
    req = rtnl.Requests()
    try:
        lo = socket.if_nametoindex("lo")
        sock = Sock(req.sock)
        req.sock = sock
        few = await req.get_links([lo, lo, lo])  # the 2nd refused: it and the 3rd by thread
        inline_then_thread = list(sock.threads)
        sock.sends = 99
        many = await req.get_links([lo] * 10)
        print(json.dumps({
            "few": [l.name if l else None for l in few],
            "threads": inline_then_thread,
            "many": [l.name if l else None for l in many],
            "many_inline": sock.sends - 99,
        }))
    finally:
        req.close()

asyncio.run(main())
"""


def test_a_few_requests_go_out_on_the_loop_in_order_and_many_from_the_thread(
    sandbox: Sandbox,
) -> None:
    """A peer's three point requests are sent on the event loop (no hop to the sender
    thread, which waits up to the switch interval when the loop is busy); a send the
    socket refuses sends it and the rest from the thread, in order; a batch of more
    goes to the thread."""
    out = sandbox.run([sys.executable, "-c", _FEW_INLINE], timeout=60).stdout
    got = json.loads(out.strip().splitlines()[-1])
    assert got["few"] == ["lo", "lo", "lo"]
    # the 1st sent, the 2nd refused, the 3rd not tried on the loop (it would overtake)
    assert got["threads"] == ["MainThread", "MainThread"]
    assert got["many"] == ["lo"] * 10
    assert got["many_inline"] == 0  # (the thread sends through the real socket)


_LINK_SENDS = """
import asyncio, errno, json, threading, time
from pyroute2.netlink.exceptions import NetlinkError
from netagent.backends import nlsend
from netagent.backends.pyroute import PyrouteNetlink

sent = []  # (message type, the thread that sent it)
real_send = nlsend.SendThread._send
refuse = []

class Refusing:
    def __init__(self, code):
        self.code = code
    def send(self, data):
        raise OSError(self.code, "refused")

def recording(self, sock, raw, data):
    sent.append((int.from_bytes(data[4:6], "little"), threading.current_thread().name))
    return real_send(self, sock, Refusing(refuse.pop()) if refuse else raw, data)

nlsend.SendThread._send = recording

async def main():
    net = PyrouteNetlink()
    await net.start()
    try:
        await net.add_bridge("sends0")
        index = net.host_index("sends0")
        await net.set_link(None, index, up=False)
        try:
            await net.add_bridge("sends0")
            twice = None
        except NetlinkError as exc:
            twice = exc.code
        refused = []
        t0 = time.monotonic()
        for code in (errno.ENOBUFS, errno.EMSGSIZE):
            refuse.append(code)
            try:
                await net.add_bridge("sends1")
                refused.append(None)
            except NetlinkError as exc:  # what pyroute2 raises for the kernel's errors
                refused.append(["NetlinkError", exc.code])
            except OSError as exc:  # and for ENOBUFS
                refused.append(["OSError", exc.errno])
        refused_s = time.monotonic() - t0
        link = await net.link(None, "sends0")
        await net.del_link(None, index)
        gone = await net.link(None, "sends0")
        print(json.dumps({
            "sent": sent, "twice": twice, "refused": refused, "refused_s": refused_s,
            "up": link is not None and link.up, "gone": gone is None,
            "sends1": net.host_index("sends1"),
        }))
    finally:
        await net.close()

asyncio.run(main())
"""


def test_link_requests_leave_from_the_sender_thread_and_answer_as_the_kernel_did(
    sandbox: Sandbox,
) -> None:
    """``backends/nlsend.py``: creating, changing and deleting links are sent from the
    sender thread (the kernel does that work inside ``send()``, under its rtnl lock);
    lookups are not; the kernel's refusal comes back as before, and a send that fails
    is answered at once with its errno, not left to its time limit."""
    out = sandbox.run([sys.executable, "-c", _LINK_SENDS], timeout=60).stdout
    got = json.loads(out.strip().splitlines()[-1])
    new, dellink = 16, 17
    assert got["sent"] == [
        [new, "netagent-nlsend"],  # the bridge
        [new, "netagent-nlsend"],  # set down
        [new, "netagent-nlsend"],  # the same bridge again
        [new, "netagent-nlsend"],  # refused by send()
        [new, "netagent-nlsend"],  # refused by send()
        [dellink, "netagent-nlsend"],
    ]
    assert got["twice"] == 17  # EEXIST, from the kernel
    # at once, as pyroute2 raises the kernel's own refusals
    assert got["refused"] == [["OSError", 105], ["NetlinkError", 90]]
    assert got["refused_s"] < 1.0
    assert got["sends1"] is None
    assert got["up"] is False and got["gone"] is True


_HOST_LOOKUP = """
import asyncio, json
from netagent.backends.pyroute import PyrouteNetlink
from netagent.backends.pyroute_msgs import drain, link_from_msg

async def main():
    net = PyrouteNetlink()
    await net.start()
    try:
        await net.add_bridge("look0")
        await net.ns_add("look")
        await net.add_veth("lookv", None, "lookp", "look", master=net.host_index("look0"), up=True)
        await net.set_link(None, net.host_index("lookv"), alias="netagent:plug/look/look0")
        out = {}
        for name in ("look0", "lookv", "lo"):
            raw = await net.link(None, name)  # the raw socket, by index
            msgs = await net.ipr.link("get", ifname=name)  # pyroute2, by name
            drain(net.ipr)
            out[name] = [repr(raw), repr(link_from_msg(msgs[0]))]
        out["gone"] = repr(await net.link(None, "nosuch0"))
        out["inner"] = (await net.link("look", "lookp")).index
        print(json.dumps(out))
    finally:
        await net.close()

asyncio.run(main())
"""


def test_a_host_link_looked_up_on_the_raw_socket_is_what_pyroute2_reads_by_name(
    sandbox: Sandbox,
) -> None:
    """``PyrouteNetlink.link(None, name)`` reads the link by index on the raw socket with
    netagent's own parser: every field as pyroute2 has it (a bridge, a veth whose peer is
    in a namespace, with a master and a mark; lo), and None for a name nobody has."""
    out = sandbox.run([sys.executable, "-c", _HOST_LOOKUP], timeout=60).stdout
    got = json.loads(out.strip().splitlines()[-1])
    assert got.pop("gone") == "None"
    inner = got.pop("inner")
    for name, (raw, by_name) in got.items():
        assert raw == by_name, name
    assert "master=None" not in got["lookv"][0] and "plug/look/look0" in got["lookv"][0]
    assert "link_netnsid=None" not in got["lookv"][0]  # its peer is in the namespace
    assert got["lookv"][0].endswith(f"far_peer={inner})")  # the last field
