"""The kernel's events: ``rtnl.parse`` on netlink bytes, and what ``EventSource._handle``
marks for the reconciler (drift of an owned key, link hints for attach rules, nothing).

The bytes are built with ``struct`` in the kernel's layout (``linux/netlink.h``,
``linux/rtnetlink.h``, ``linux/if_link.h``): a 16-byte ``nlmsghdr``, a 16-byte
``ifinfomsg`` or 8-byte ``ifaddrmsg``, then attributes padded to 4 bytes.
"""

from __future__ import annotations

import dataclasses
import errno
import socket
import struct
import threading
from pathlib import Path
from typing import Any, cast

import anyio
import pytest

from netagent.agent.keystatus import DRIFTED, IN_PLACE
from netagent.backends import rtnl
from netagent.backends.netlink import NETAGENT_GROUP, Link

from ..support.wait import LIMIT, until
from .world import World, make_world

AF_BRIDGE = 7
NLMSG_DONE = 3


# ---- netlink bytes ------------------------------------------------------------------
def rta(atype: int, payload: bytes) -> bytes:
    raw = struct.pack("HH", 4 + len(payload), atype) + payload
    return raw + b"\0" * (-len(raw) % 4)


def cstr(text: str) -> bytes:
    return text.encode() + b"\0"


def u32(value: int) -> bytes:
    return struct.pack("I", value)


def nlmsg(mtype: int, body: bytes, seq: int = 0) -> bytes:
    raw = struct.pack("IHHII", 16 + len(body), mtype, 0, seq, 0) + body
    return raw + b"\0" * (-len(raw) % 4)


def link_msg(
    index: int,
    name: str | None,
    *,
    deleted: bool = False,
    family: int = socket.AF_UNSPEC,
    up: bool = False,
    kind: str | None = None,
    attrs: bytes = b"",
) -> bytes:
    body = struct.pack("BxHiII", family, 1, index, 0x1 if up else 0, 0xFFFFFFFF)
    if name is not None:
        body += rta(rtnl.IFLA_IFNAME, cstr(name))
    if kind is not None:
        body += rta(rtnl.IFLA_LINKINFO, rta(rtnl.IFLA_INFO_KIND, cstr(kind)))
    return nlmsg(rtnl.RTM_DELLINK if deleted else rtnl.RTM_NEWLINK, body + attrs)


def addr_msg(index: int, deleted: bool = False) -> bytes:
    body = struct.pack("BBBBI", socket.AF_INET, 24, 0, 0, index)
    body += rta(1, socket.inet_aton("192.168.15.5"))  # IFA_ADDRESS
    return nlmsg(rtnl.RTM_DELADDR if deleted else rtnl.RTM_NEWADDR, body)


def test_parse_a_veth_with_every_field_netagent_reads() -> None:
    attrs = (
        rta(rtnl.IFLA_MASTER, u32(7))
        + rta(rtnl.IFLA_IFALIAS, cstr("netagent:plug/red/v-net-0"))
        + rta(rtnl.IFLA_GROUP, u32(NETAGENT_GROUP))
        + rta(rtnl.IFLA_LINK, u32(42))
        + rta(rtnl.IFLA_ADDRESS, bytes.fromhex("02aabbccddee"))
        + rta(13, u32(1500))  # IFLA_MTU: not read, skipped
    )
    [event] = rtnl.parse(link_msg(41, "veth-red-br", up=True, kind="veth", attrs=attrs))
    assert event == rtnl.LinkEvent(
        False,
        Link(
            index=41,
            name="veth-red-br",
            kind="veth",
            up=True,
            master=7,
            alias="netagent:plug/red/v-net-0",
            group=NETAGENT_GROUP,
            peer=42,
            link_netnsid=None,
            mac="02:aa:bb:cc:dd:ee",
        ),
    )
    assert event.link.owner_key == "plug/red/v-net-0"


def test_attrs_keeps_only_the_types_asked_for_and_reads_past_the_rest() -> None:
    blob = (
        rta(rtnl.IFLA_IFNAME, cstr("eth0"))
        + rta(23, bytes(200))  # IFLA_STATS64-sized: walked over, not kept
        + rta(rtnl.IFLA_MASTER | 0x8000, u32(9))  # the nested flag is not part of the type
        + rta(13, u32(1500))
    )
    every = rtnl._attrs(blob, 0, len(blob))
    assert sorted(every) == [rtnl.IFLA_IFNAME, rtnl.IFLA_MASTER, 13, 23]
    some = rtnl._attrs(blob, 0, len(blob), frozenset((rtnl.IFLA_MASTER, rtnl.IFLA_IFNAME)))
    assert some == {rtnl.IFLA_IFNAME: cstr("eth0"), rtnl.IFLA_MASTER: u32(9)}


def test_parse_a_veth_whose_peer_is_in_another_namespace() -> None:
    attrs = rta(rtnl.IFLA_LINK, u32(2)) + rta(rtnl.IFLA_LINK_NETNSID, struct.pack("i", 0))
    [event] = rtnl.parse(link_msg(41, "veth-red-br", kind="veth", attrs=attrs))
    assert isinstance(event, rtnl.LinkEvent)
    # the index names an interface of the other namespace: not a peer here
    assert (event.link.peer, event.link.link_netnsid, event.link.up) == (None, 0, False)


def test_parse_a_bridge_a_deletion_and_a_master_of_zero() -> None:
    data = link_msg(7, "v-net-0", up=True, kind="bridge", attrs=rta(rtnl.IFLA_LINK, u32(7)))
    data += link_msg(9, "tap0", deleted=True, attrs=rta(rtnl.IFLA_MASTER, u32(0)))
    bridge, tap = rtnl.parse(data)
    assert bridge == rtnl.LinkEvent(False, Link(7, "v-net-0", "bridge", up=True))
    assert tap == rtnl.LinkEvent(True, Link(9, "tap0"))


def test_parse_skips_bridge_port_copies_and_other_messages() -> None:
    """A port leaving a bridge is announced as RTM_DELLINK of family AF_BRIDGE too: that
    is not the interface going away."""
    data = (
        link_msg(9, "tap0", deleted=True, family=AF_BRIDGE)
        + nlmsg(NLMSG_DONE, u32(0))
        + link_msg(10, None)  # no name: skipped
        + addr_msg(7, deleted=True)
        + addr_msg(8)
        + nlmsg(rtnl.RTM_NEWROUTE, b"\0" * 12)
        + nlmsg(rtnl.RTM_DELROUTE, b"\0" * 12)
    )
    assert rtnl.parse(data) == [
        rtnl.AddrEvent(deleted=True, index=7, address=bytes([192, 168, 15, 5])),
        rtnl.AddrEvent(deleted=False, index=8, address=bytes([192, 168, 15, 5])),
        rtnl.RouteEvent(deleted=False),
        rtnl.RouteEvent(deleted=True),
    ]


def test_parse_stops_at_a_truncated_message() -> None:
    whole = link_msg(11, "tap1")
    data = link_msg(12, "tap2") + whole[: len(whole) - 8]
    assert [e.link.name for e in rtnl.parse(data) if isinstance(e, rtnl.LinkEvent)] == ["tap2"]
    assert rtnl.parse(b"\x10\x00") == []


def test_parse_keeps_a_kind_only_for_a_veth_peer() -> None:
    """IFLA_LINK of another kind (a VLAN's lower device) is no veth peer."""
    [event] = rtnl.parse(link_msg(20, "vlan5", kind="vlan", attrs=rta(rtnl.IFLA_LINK, u32(3))))
    assert isinstance(event, rtnl.LinkEvent) and event.link.peer is None


# ---- what the event source marks ----------------------------------------------------
PLUG = "plug/red/v-net-0"
BRIDGE = "br/v-net-0"


async def world(tmp_path: Path) -> World:
    """ns red plugged into v-net-0, an attach rule ``tap*``, all in place; the fake
    announces nothing by itself (each test feeds ``_handle``)."""
    w = make_world(tmp_path, feed="none")
    async with w.running():
        await w.call("ns.add", name="red")
        await w.call("bridge.add", name="v-net-0", address=["192.168.15.5/24"])
        await w.call("plug.add", ns="red", bridge="v-net-0", address=["192.168.15.1/24"])
        await w.call("attach.add", pattern="tap*", bridge="v-net-0")
        await until(lambda: not w.rec.busy(), "idle")
    w.links.reset(list(w.net.host.links.values()))  # as the event source's dump does
    assert all(w.rec.status[k].state == IN_PLACE for k in w.state.intents)
    return w


async def test_an_owned_link_deleted_drifts_its_key_and_the_pass_repairs_it(
    tmp_path: Path,
) -> None:
    w = await world(tmp_path)
    gone = w.link("veth-red-br")
    await w.net.del_link(None, gone.index)
    w.events._handle(rtnl.LinkEvent(True, gone))
    assert w.rec.status[PLUG].state == DRIFTED
    assert w.rec.status[PLUG].reason == "veth-red-br was deleted"
    assert w.links.get(gone.index) is None
    [event] = w.published("link-removed")
    assert (event["key"], event["ifname"]) == (PLUG, "veth-red-br")
    with anyio.fail_after(LIMIT):
        result = await w.rec.run_until_idle("event")
    assert result.actions[PLUG][0] == "create veth veth-red-br <-> red:veth-red"
    assert w.rec.status[PLUG].state == IN_PLACE


async def test_an_address_removed_from_an_owned_link_drifts_its_key(tmp_path: Path) -> None:
    w = await world(tmp_path)
    bridge = w.link("v-net-0")
    w.events._handle(rtnl.AddrEvent(deleted=False, index=bridge.index))
    assert not w.rec.busy()
    w.events._handle(rtnl.AddrEvent(deleted=True, index=bridge.index))
    assert w.rec.status[BRIDGE].state == DRIFTED
    assert w.rec.status[BRIDGE].reason == "an address of v-net-0 was removed"
    w.events._handle(rtnl.AddrEvent(deleted=True, index=9999))  # unknown interface
    assert [e["key"] for e in w.published("addr-removed")] == [BRIDGE]


async def test_an_unowned_interface_a_rule_takes_is_handed_to_the_attach_rules(
    tmp_path: Path,
) -> None:
    w = await world(tmp_path)
    tap = w.net.make_foreign_link("tap0")
    w.events._handle(rtnl.LinkEvent(False, tap))
    assert w.rec.busy()  # a link hint, no key
    assert w.published("link-appeared")[-1]["ifname"] == "tap0"
    with anyio.fail_after(LIMIT):
        result = await w.rec.run_until_idle("event")
    assert result.actions == {"attach": ["attached tap0 to v-net-0"]}
    assert w.link("tap0").master == w.link("v-net-0").index


async def test_interfaces_no_rule_takes_and_bridges_are_not_handed_on(tmp_path: Path) -> None:
    w = await world(tmp_path)
    for link in (
        w.net.make_foreign_link("eth1"),  # no rule matches
        w.net.make_foreign_link("tapbr", kind="bridge"),  # matches, but is a bridge
    ):
        w.events._handle(rtnl.LinkEvent(False, link))
        assert not w.rec.busy(), link.name
    assert [e["ifname"] for e in w.published("link-appeared")] == ["eth1", "tapbr"]
    w.events._handle(rtnl.RouteEvent(deleted=True))
    assert not w.rec.busy()


@pytest.mark.parametrize(
    ("name", "change", "drifts"),
    [
        ("veth-red-br", {"mac": "02:00:00:00:00:09"}, False),
        ("v-net-0", {"mac": "02:00:00:00:00:0a"}, False),
        ("veth-red-br", {"up": False}, True),
        ("veth-red-br", {"master": None}, True),
        ("v-net-0", {"up": False}, True),
    ],
    ids=["plug-new-mac", "bridge-new-mac", "plug-down", "plug-detached", "bridge-down"],
)
async def test_an_owned_link_changed_drifts_only_when_its_kind_says_so(
    tmp_path: Path, name: str, change: dict[str, Any], drifts: bool
) -> None:
    w = await world(tmp_path)
    link = dataclasses.replace(w.link(name), **change)
    key = link.owner_key
    assert key is not None
    w.events._handle(rtnl.LinkEvent(False, link))
    assert w.links.get(link.index) == link
    assert w.rec.busy() is drifts
    assert w.rec.status[key].state == (DRIFTED if drifts else IN_PLACE)


async def test_a_netagent_link_of_a_key_no_longer_desired_is_not_repaired(
    tmp_path: Path,
) -> None:
    w = await world(tmp_path)
    stray = Link(500, "veth-old-br", "veth", alias="netagent:plug/old/v-net-0")
    w.events._handle(rtnl.LinkEvent(False, stray))
    w.events._handle(rtnl.LinkEvent(True, stray))
    assert not w.rec.busy()
    assert w.published("link-removed") == []


async def test_only_committed_state_is_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A change that waits for the kernel before it is recorded (a name of it exists:
    whose is it?) is not the state yet: the event source must not act on it (it might
    still be refused). Once its journal line is written it is the state, while the
    line's flush still runs: an interface that appears is attached by it."""
    w = await world(tmp_path)
    asked, answer = anyio.Event(), anyio.Event()
    host_index, link = w.net.host_index, w.net.link

    def seen(name: str) -> int | None:
        return 600 if name == "v-net-1" and not answer.is_set() else host_index(name)

    async def gated(ns: str | None, name: str) -> Link | None:
        if (ns, name) != (None, "v-net-1") or answer.is_set():
            return await link(ns, name)
        asked.set()
        await answer.wait()
        return None  # it went meanwhile: the name is free

    w.slow_disk()
    flushing, flush = threading.Event(), threading.Event()
    sync = w.store.sync

    def slow_sync() -> None:
        if "rule/v-net-1/eth*" in w.store.journal.read_text():
            flushing.set()
            assert flush.wait(LIMIT)
        sync()

    monkeypatch.setattr(w.net, "host_index", seen)
    monkeypatch.setattr(w.net, "link", gated)
    monkeypatch.setattr(w.store, "sync", slow_sync)
    replies: list[object] = []

    async def requests() -> None:
        replies.append(await w.call("bridge.add", name="v-net-1", address=["10.1.0.1/24"]))
        replies.append(await w.call("attach.add", pattern="eth*", bridge="v-net-1"))

    try:
        async with w.running(), anyio.create_task_group() as tg:
            tg.start_soon(requests)
            with anyio.fail_after(LIMIT):
                await asked.wait()
            assert "br/v-net-1" not in w.state
            stray = Link(600, "v-net-1", "bridge", alias="netagent:br/v-net-1")
            w.events._handle(rtnl.LinkEvent(True, stray))
            assert not w.rec.busy() and w.published("link-removed") == []
            answer.set()

            await until(flushing.is_set, "the rule's journal flush began")
            assert "rule/v-net-1/eth*" in w.state and len(replies) == 1
            bridge = w.link("v-net-1").index
            # the kernel announces the new bridge (committed, up: nothing to repair)
            w.events._handle(rtnl.LinkEvent(False, w.link("v-net-1")))
            assert w.rec.status["br/v-net-1"].state == IN_PLACE
            w.events._handle(rtnl.LinkEvent(False, w.net.make_foreign_link("eth0")))
            await until(lambda: w.link("eth0").master == bridge, "eth0 attached")
            assert len(replies) == 1, "answered before the rule's line was on disk"
            flush.set()
            await until(lambda: len(replies) == 2, "both requests answered")
    finally:
        answer.set()
        flush.set()


# ---- catching up before an attach ---------------------------------------------------
class QueuedSocket:
    """Stands in for the host's event socket: ``pending`` hands over what a test queued
    (and an error after it, as the kernel reports an overflow), ``fail`` is recorded."""

    def __init__(self) -> None:
        self.queued: list[bytes] = []
        self.error: OSError | None = None
        self.failed: list[OSError] = []

    def pending(self) -> tuple[list[bytes], OSError | None]:
        out, self.queued = self.queued, []
        return out, self.error

    def fail(self, exc: OSError) -> None:
        self.failed.append(exc)


def follow(w: World) -> QueuedSocket:
    """The event source as it is once subscribed and dumped."""
    sock = QueuedSocket()
    w.events._sock = cast(rtnl.EventSocket, sock)
    return sock


def no_lookups(w: World, monkeypatch: pytest.MonkeyPatch) -> list[list[int]]:
    asked: list[list[int]] = []
    host_links = w.net.host_links

    async def counted(indexes: list[int]) -> list[Link | None]:
        asked.append(indexes)
        return await host_links(indexes)

    monkeypatch.setattr(w.net, "host_links", counted)
    return asked


async def test_an_attach_decides_on_the_events_queued_before_it_not_on_lookups(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """tap0 appears free, then (announced, still unread) someone gives it to another
    bridge: the attach handles the queued events first and leaves it alone, and asks
    the kernel about no link (those lookups wait for the kernel's lock)."""
    w = await world(tmp_path)
    sock = follow(w)
    asked = no_lookups(w, monkeypatch)
    other = w.net.make_foreign_link("br-other", kind="bridge")
    tap = w.net.make_foreign_link("tap0")
    w.events._handle(rtnl.LinkEvent(False, tap))
    await w.net.enslave([(tap.index, other.index)])
    sock.queued.append(link_msg(tap.index, "tap0", kind="veth", attrs=rta(10, u32(other.index))))
    tap1 = w.net.make_foreign_link("tap1")
    w.events._handle(rtnl.LinkEvent(False, tap1))
    with anyio.fail_after(LIMIT):
        result = await w.rec.run_until_idle("event")
    assert result.actions == {"attach": ["attached tap1 to v-net-0"]}
    cached = w.links.get(tap.index)
    assert cached is not None and cached.master == other.index
    assert w.link("tap0").master == other.index
    assert [e["ifname"] for e in w.published("left-alone")] == ["tap0"]
    assert asked == [] and sock.failed == [] and not w.events._backlog


async def test_events_lost_while_catching_up_fall_back_to_lookups_and_a_resync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An overflow read while catching up: the cache cannot be trusted, so the attach
    asks the kernel, and the error goes to the reader (which resubscribes and resyncs);
    what was read before it waits for the reader, in order."""
    w = await world(tmp_path)
    sock = follow(w)
    asked = no_lookups(w, monkeypatch)
    sock.queued.append(link_msg(9999, "eth9"))
    sock.error = OSError(errno.ENOBUFS, "No buffer space available")
    tap = w.net.make_foreign_link("tap0")
    w.events._handle(rtnl.LinkEvent(False, tap))
    with anyio.fail_after(LIMIT):
        result = await w.rec.run_until_idle("event")
    assert result.actions == {"attach": ["attached tap0 to v-net-0"]}
    assert asked == [[tap.index]]
    assert [e.errno for e in sock.failed] == [errno.ENOBUFS]
    assert len(w.events._backlog) == 1


async def test_a_cache_nothing_feeds_is_never_called_up_to_date(tmp_path: Path) -> None:
    w = await world(tmp_path)
    assert await w.events.catch_up() is False  # not subscribed
    w.links.feed = None
    assert await w.links.catch_up() is False


async def test_an_error_handed_to_the_event_socket_is_raised_by_its_reader() -> None:
    """The kernel reports an overflow once: whoever reads it hands it to the reader."""
    sock = rtnl.EventSocket(groups=0)  # subscribed to nothing: no event arrives
    try:
        assert sock.pending() == ([], None)
        sock.fail(OSError(errno.ENOBUFS, "No buffer space available"))
        with anyio.fail_after(LIMIT), pytest.raises(OSError, match="No buffer space") as raised:
            await sock.receive()
        assert raised.value.errno == errno.ENOBUFS
    finally:
        sock.close()


async def test_an_overflow_read_with_events_is_raised_by_the_next_receive(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The kernel reports ENOBUFS once, on the recv after the last datagram that fit:
    what arrived is handed over, and the next receive raises (it used to read on, and
    the lost events were never resynced)."""
    sock = rtnl.EventSocket(groups=0)
    try:
        reads = [([b"one", b"two"], OSError(errno.ENOBUFS, "No buffer space available"))]
        monkeypatch.setattr(sock, "pending", lambda: reads.pop(0) if reads else ([], None))
        with anyio.fail_after(LIMIT):
            assert await sock.receive() == [b"one", b"two"]
            with pytest.raises(OSError, match="No buffer space") as raised:
                await sock.receive()
        assert raised.value.errno == errno.ENOBUFS
    finally:
        sock.close()
