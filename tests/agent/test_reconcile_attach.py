"""The attach rules' one decision in the reconciler's pass, over the fakes: what a rule
takes and what it must leave alone, the kernel asked first, a link gone meanwhile, a
bridge that refuses a port (the rest of the reconciler: ``test_reconcile.py``)."""

from __future__ import annotations

import dataclasses
import errno
from pathlib import Path

import pytest
import structlog

from netagent.backends.netlink import Link

from ..support.wait import until
from .world import World, make_world


def foreign_veth(w: World, name: str, peer: str) -> tuple[Link, Link]:
    """A veth pair someone else made in the host (both ends there, no netagent mark)."""
    a = w.net.make_foreign_link(name)
    b = w.net.make_foreign_link(peer)
    a, b = dataclasses.replace(a, peer=b.index), dataclasses.replace(b, peer=a.index)
    for link in (a, b):
        w.net.host.links[link.index] = link
        w.links.update(link)
    return a, b


# ---- one request, one pass ----------------------------------------------------------
async def test_link_hints_attach_what_a_rule_takes_and_leave_alone_what_it_must_not(
    tmp_path: Path,
) -> None:
    w = make_world(tmp_path)
    async with w.running():
        await w.call("bridge.add", name="v-net-0", address=["192.168.15.5/24"])
        await w.call("attach.add", pattern="tap*", bridge="v-net-0")
        bridge = w.link("v-net-0").index

        tap0 = w.net.make_foreign_link("tap0")
        w.rec.mark_links([tap0.index])
        await until(lambda: w.published("attached"), "tap0 attached")
        assert ("enslave", "tap0", bridge) in w.net.calls
        assert w.link("tap0").master == bridge and w.link("tap0").up
        assert w.published("attached")[0]["rule"] == "rule/v-net-0/tap*"

        # on another bridge: reported, never taken
        other = w.net.make_foreign_link("other0", kind="bridge")
        tap1 = w.net.make_foreign_link("tap1")
        await w.net.set_link(None, tap1.index, master=other.index)
        w.rec.mark_links([tap1.index])
        await until(lambda: w.published("left-alone"), "tap1 left alone")
        [event] = w.published("left-alone")
        assert (event["ifname"], event["master"]) == ("tap1", "other0")
        assert w.link("tap1").master == other.index

        # the second end of a veth pair whose first end is on the bridge: a loop
        a, b = foreign_veth(w, "tapA", "tapB")
        w.rec.mark_links([a.index])
        await until(lambda: len(w.published("attached")) == 2, "tapA attached")
        w.rec.mark_links([b.index])
        await until(lambda: len(w.published("left-alone")) == 2, "tapB left alone")
        assert "its veth peer tapA is on v-net-0 already" in w.published("left-alone")[1]["message"]
        assert w.link("tapB").master is None

        # both ends announced at once: one is taken, the other is the loop
        c, d = foreign_veth(w, "tapC", "tapD")
        w.rec.mark_links([c.index, d.index])
        await until(lambda: len(w.published("left-alone")) == 3, "one of tapC/tapD left alone")
        masters = {w.link("tapC").master, w.link("tapD").master}
        assert masters == {bridge, None}
    taken = "tapC" if w.link("tapC").master == bridge else "tapD"
    assert [c[1] for c in w.net.calls if c[0] == "enslave"] == ["tap0", "tapA", taken]


async def test_every_attach_is_checked_with_the_kernel_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The link cache may be older than the kernel: each attach decides on what the
    kernel says right before it, so an interface given to another bridge meanwhile is
    never taken, and one really detached is attached again."""
    w = make_world(tmp_path)
    asked: list[list[int]] = []
    host_links = w.net.host_links

    async def counted(indexes: list[int]) -> list[Link | None]:
        asked.append(list(indexes))
        return await host_links(indexes)

    monkeypatch.setattr(w.net, "host_links", counted)
    async with w.running():
        await w.call("bridge.add", name="v-net-0", address=["192.168.15.5/24"])
        await w.call("bridge.add", name="theirs")
        await w.call("attach.add", pattern="tap*", bridge="v-net-0")
        bridge = w.link("v-net-0").index
        tap0 = w.net.make_foreign_link("tap0")
        asked.clear()
        w.rec.mark_links([tap0.index])
        await until(lambda: w.link("tap0").master == bridge, "tap0 attached")
        assert asked == [[tap0.index]]

        # someone gives it to another bridge; the cache still shows it free
        theirs = w.link("theirs").index
        await w.net.set_link(None, tap0.index, master=theirs)
        w.links.update(dataclasses.replace(w.link("tap0"), master=None, up=False))
        passes = w.rec.passes
        w.rec.mark_links([tap0.index])
        await until(lambda: w.rec.passes > passes, "a pass over the hint")
        assert w.link("tap0").master == theirs  # not taken
        assert w.links.get(tap0.index) == w.link("tap0")  # the cache holds the fresh view

        # someone really detached it: the kernel says so, and it is attached again
        await w.net.set_link(None, tap0.index, master=0)
        w.rec.mark_links([tap0.index])
        await until(lambda: w.link("tap0").master == bridge, "tap0 attached again")
        assert [c[1] for c in w.net.calls if c[0] == "enslave"] == ["tap0", "tap0"]


async def test_a_tap_gone_between_the_check_and_the_attach_is_no_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tap that lives for milliseconds: the kernel still had it when asked, and it was
    gone by the attach (ENODEV). Nothing failed: no attach-failed event, nothing logged
    above debug, and the next tap is attached as usual."""
    w = make_world(tmp_path)
    enslave = w.net.enslave

    async def vanishing(pairs: list[tuple[int, int]]) -> list[OSError | None]:
        for index, _ in pairs:
            if w.net.host.links[index].name == "tap-brief":
                await w.net.del_link(None, index)
        return await enslave(pairs)

    monkeypatch.setattr(w.net, "enslave", vanishing)
    async with w.running():
        await w.call("bridge.add", name="v-net-0", address=["192.168.15.5/24"])
        await w.call("attach.add", pattern="tap*", bridge="v-net-0")
        brief = w.net.make_foreign_link("tap-brief")
        with structlog.testing.capture_logs() as logs:
            passes = w.rec.passes
            w.rec.mark_links([brief.index])
            await until(lambda: w.rec.passes > passes, "a pass over the hint")
        assert ("enslave", "tap-brief", w.link("v-net-0").index) not in w.net.calls
        assert w.published("attach-failed") == []
        loud = [e for e in logs if e["log_level"] not in ("debug",)]
        assert not [e for e in loud if "tap-brief" in str(e)], loud
        assert w.links.get(brief.index) is None
        tap1 = w.net.make_foreign_link("tap1")
        w.rec.mark_links([tap1.index])
        await until(lambda: w.link("tap1").master == w.link("v-net-0").index, "tap1 attached")


async def test_a_bridge_that_refuses_a_port_is_reported(tmp_path: Path) -> None:
    w = make_world(tmp_path)
    async with w.running():
        await w.call("bridge.add", name="v-net-0", address=["192.168.15.5/24"])
        await w.call("attach.add", pattern="tap*", bridge="v-net-0")
        w.net.fail("enslave", OSError(errno.ENOSPC, "No space left on device"))
        tap0 = w.net.make_foreign_link("tap0")
        w.rec.mark_links([tap0.index])
        await until(lambda: w.published("attach-failed"), "the failure reported")
    assert "No space left on device" in w.published("attach-failed")[0]["message"]
    assert w.link("tap0").master is None
