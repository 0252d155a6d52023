"""``Service.handle`` over the fakes: every op, old op names, one error code per mistake,
read-only peers, a journal that refuses, names that are someone else's, and what
``show`` says while things drift or the firewall fails."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from netagent.agent import errors as E
from netagent.agent import keystatus, ops
from netagent.agent.errors import BackendFailed, NetagentError, NotFound
from netagent.agent.reconcile import FIREWALL

from ..support.wait import until
from .world import RO, RW, World, lines, make_world

BR: dict[str, Any] = {"name": "v-net-0", "addresses": ["192.168.15.5/24"]}
PLUG: dict[str, Any] = {"ns": "red", "bridge": "v-net-0", "addresses": ["192.168.15.1/24"]}


async def code_of(w: World, op: str, peer: Any = RW, **args: Any) -> int:
    with pytest.raises(NetagentError) as exc:
        await w.call(op, peer, **args)
    return exc.value.code


def snapshot(w: World) -> tuple[Any, ...]:
    """Everything a refused request must leave as it was."""
    journal = w.store.journal.read_bytes() if w.store.journal.exists() else b""
    kernel = tuple(w.net.dump(ns) for ns in [None, *w.net.ns_names()])
    return (
        w.state.to_wire(),
        journal,
        kernel,
        w.fw.dump(),
        len(w.net.calls),
        {k: (s.state, s.error) for k, s in w.rec.status.items()},
        w.rec.busy(),
    )


async def seed(w: World) -> None:
    await w.call("ns.add", name="red")
    await w.call("bridge.add", **BR)
    await w.call("plug.add", **PLUG)
    await w.call("forward.add", host_ports="80", destination="192.168.15.1:80")


# ---- every op -----------------------------------------------------------------------
async def test_every_op_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    w = make_world(tmp_path)
    seen: list[str] = []
    handle = w.api.handle

    async def recorded(op: str, args: Any, peer: Any) -> Any:
        seen.append(op)
        return await handle(op, args, peer)

    monkeypatch.setattr(w.api, "handle", recorded)
    w.net.make_foreign_ns("podman1")
    async with w.running():
        st = await w.call("status")
        assert (st["firewall"], st["intents"], st["summary"]) == (
            "fake",
            0,
            "0 namespaces, 0 bridges, 0 plugs, 0 forwards",
        )
        assert (await w.call("ns.add", name="red"))["changes"][0]["key"] == "ns/red"
        await w.call("ns.add", name="blue")
        assert await w.call("ns.list") == [
            {"name": "blue", "managed": True, "present": True},
            {"name": "podman1", "managed": False, "present": True},
            {"name": "red", "managed": True, "present": True},
        ]
        await w.call("bridge.add", masquerade=True, **BR)
        await w.call("plug.add", **PLUG)
        assert await w.call("bridge.list") == [
            {
                "kind": "bridge",
                "name": "v-net-0",
                "addresses": ["192.168.15.5/24"],
                "masquerade": True,
                "plugs": ["red"],
            }
        ]
        reply = await w.call(
            "wire.add",
            ns_a="red",
            addresses_a="10.0.0.1/24",
            ns_b="blue",
            addresses_b="10.0.0.2/24",
        )
        assert reply["changes"][0]["key"] == "wire/blue/red"
        await w.call("forward.add", host_ports="80", destination="192.168.15.1:80")
        await w.call("fwd.add", host_ports="8000-8001", destination="192.168.15.1:9000-9001")
        listed = await w.call("forward.list")
        assert [f["key"] for f in listed] == ["fwd/tcp/80", "fwd/tcp/8000-8001"]
        assert await w.call("fwd.list") == listed
        await w.call("attach.add", pattern="tap*", bridge="v-net-0")
        await w.call("rule.add", pattern="eth9", bridge="v-net-0")
        rules = [{"kind": "attach", "pattern": p, "bridge": "v-net-0"} for p in ("tap*", "eth9")]
        assert await w.call("attach.list") == rules
        assert await w.call("rule.list") == rules
        assert lines(w.fw.dump()) == [
            "forward fwd/tcp/8000-8001: 8000-8001/tcp -> 192.168.15.1:9000-9001",
            "forward fwd/tcp/80: 80/tcp -> 192.168.15.1:80",
            "rule hairpin br/v-net-0 192.168.15.0/24",
            "rule masquerade br/v-net-0 192.168.15.0/24 oifname != v-net-0",
        ]

        host = await w.call("links")
        assert {lk["name"]: lk["owner"] for lk in host} == {
            "lo": None,
            "v-net-0": "br/v-net-0",
            "veth-red-br": "plug/red/v-net-0",
        }
        inside = await w.call("links", ns="red")
        assert sorted(lk["name"] for lk in inside) == sorted(["lo", "veth-red", wire_end(w)])
        assert await w.call("neigh", ns="red") == []
        [route] = await w.call("routes", ns="red")
        assert (route["destination"], route["gateway"]) == ("default", "192.168.15.5")

        show = await w.call("show")
        assert all(item["in_place"] for item in show["intents"])
        # not in a cluster: peers says so (tests/agent/test_cluster.py: in one)
        with pytest.raises(NotFound, match="not in a cluster"):
            await w.call("peers")
        assert (await w.call("status"))["cluster"] is None
        doctor = await w.call("doctor")
        assert doctor["problems"] == 0 and "drops" in doctor["checked"]
        explained = await w.call("explain", port="80")
        assert explained["forward"] == "fwd/tcp/80" and explained["verdict"] == "delivered"
        assert show["firewall"]["in_place"] is True and show["firewall"]["backend"] == "fake"

        await w.call("forward.del", host_ports="80")
        await w.call("fwd.del", host_ports="8000-8001")
        await w.call("attach.del", pattern="tap*", bridge="v-net-0")
        await w.call("rule.del", pattern="eth9", bridge="v-net-0")
        await w.call("wire.del", ns_a="blue", ns_b="red")
        await w.call("plug.del", ns="red", bridge="v-net-0")
        await w.call("bridge.del", name="v-net-0")
        await w.call("ns.del", name="blue")
        assert w.state.to_wire() == [{"kind": "ns", "name": "red"}]
        assert lines(w.net.dump()) == ["lo - DOWN - - -"]
        assert w.net.ns_names() == ["podman1", "red"]
        assert w.fw.dump() == "" and not w.fw.table

        doc = [
            {"kind": "ns", "name": "red"},
            {"kind": "br", **BR},
            {"kind": "plug", **PLUG},
            {"kind": "fwd", "host_ports": "80", "destination": "192.168.15.1:80"},
        ]
        reply = await w.call("apply", intents=doc)
        assert [c["key"] for c in reply["changes"]] == [
            "br/v-net-0",
            "plug/red/v-net-0",
            "fwd/tcp/80",
        ]
        assert (await w.call("apply", intents=doc))["changed"] is False
        reply = await w.call("apply", intents=doc[:2], prune=True)
        assert [c["action"] for c in reply["changes"]] == ["removed", "removed"]

        with pytest.raises(E.NotFound, match="not quarantined: it is desired and valid"):
            await w.call("forget", key="br/v-net-0")  # tests/agent/test_quarantine.py
        assert await w.call("attachment.list") == []  # tests/agent/test_cni.py has more
        version = await w.call("cni", command="VERSION", config={})
        assert version["result"]["supportedVersions"] == ["0.4.0", "1.0.0", "1.1.0"]

        reply = await w.call("purge")
        assert reply["changed"] is True and reply["errors"] == {}
    assert set(seen) == {o for r in ops.REQUESTS for o in (r.op, *r.aliases)} - {"events"}
    assert w.state.to_wire() == [] and w.net.ns_names() == ["podman1"]
    assert lines(w.net.dump()) == ["lo - DOWN - - -"]


def wire_end(w: World) -> str:
    wire = w.state.get("wire/blue/red")
    assert wire is not None
    name: str = wire.to_dict()["ifname_a"]
    return name


async def test_events_is_not_an_op_of_the_api(tmp_path: Path) -> None:
    """``events`` streams on the connection (``agent/transport.py``), never here."""
    w = make_world(tmp_path)
    assert await code_of(w, "events") == 1003


# ---- one code per mistake -----------------------------------------------------------
MISTAKES: list[tuple[str, str, dict[str, Any], int]] = [
    ("unknown op", "bridge.create", {"name": "br0"}, 1003),
    ("unknown argument", "ns.add", {"name": "red", "colour": "red"}, 1001),
    ("missing argument", "ns.add", {}, 1001),
    ("missing positional", "plug.add", {"ns": "red", "addresses": ["192.168.15.9/24"]}, 1001),
    ("name not a string", "ns.add", {"name": 5}, 2002),
    ("name too long", "ns.add", {"name": "n" * 16}, 2002),
    ("name with a slash", "bridge.add", {"name": "a/b"}, 2002),
    ("address without prefix", "bridge.add", {"name": "br0", "addresses": ["10.0.0.1"]}, 2003),
    ("address not a string", "bridge.add", {"name": "br0", "addresses": [7]}, 2003),
    ("flag not a bool", "bridge.add", {"name": "br0", "masquerade": "yes"}, 2001),
    (
        "port out of range",
        "forward.add",
        {"host_ports": "99999", "destination": "10.0.0.2:80"},
        2004,
    ),
    ("port a bool", "forward.add", {"host_ports": True, "destination": "10.0.0.2:80"}, 2004),
    (
        "destination without port",
        "forward.add",
        {"host_ports": "80", "destination": "10.0.0.2"},
        2001,
    ),
    (
        "destination not an address",
        "forward.add",
        {"host_ports": "80", "destination": "x:80"},
        2003,
    ),
    (
        "unknown protocol",
        "forward.add",
        {"host_ports": "80", "destination": "10.0.0.2:80", "proto": "sctp"},
        2001,
    ),
    (
        "ranges of other lengths",
        "forward.add",
        {"host_ports": "80-81", "destination": "10.0.0.2:80-82"},
        2004,
    ),
    ("bad pattern", "attach.add", {"pattern": "tap$", "bridge": "v-net-0"}, 2005),
    ("intents not a list", "apply", {"intents": "x"}, 2001),
    ("unknown kind in apply", "apply", {"intents": [{"kind": "vlan"}]}, 2001),
    ("bad entry in apply", "apply", {"intents": [{"kind": "ns", "name": "-x"}]}, 2002),
    (
        "no such namespace",
        "plug.add",
        {"ns": "green", "bridge": "v-net-0", "addresses": ["192.168.15.7/24"]},
        3001,
    ),
    ("no such namespace to look in", "links", {"ns": "green"}, 3001),
    ("nothing to remove", "forward.del", {"host_ports": "81"}, 3001),
    (
        "port forwarded elsewhere",
        "forward.add",
        {"host_ports": "80", "destination": "192.168.15.9:80"},
        3004,
    ),
    (
        "address used on the segment",
        "plug.add",
        {"ns": "blue", "bridge": "v-net-0", "addresses": ["192.168.15.1/24"]},
        3003,
    ),
    (
        "plugged already, otherwise",
        "plug.add",
        {"ns": "red", "bridge": "v-net-0", "addresses": ["192.168.15.2/24"]},
        3002,
    ),
    ("still in use", "bridge.del", {"name": "v-net-0"}, 3005),
    (
        "lo as the interface",
        "plug.add",
        {"ns": "blue", "bridge": "v-net-0", "addresses": ["192.168.15.2/24"], "ifname": "lo"},
        3006,
    ),
]


@pytest.mark.parametrize(
    ("op", "args", "code"), [m[1:] for m in MISTAKES], ids=[m[0] for m in MISTAKES]
)
async def test_each_mistake_gets_its_one_code_and_changes_nothing(
    tmp_path: Path, op: str, args: dict[str, Any], code: int
) -> None:
    w = make_world(tmp_path)
    async with w.running():
        await seed(w)
        await w.call("ns.add", name="blue")
        before = snapshot(w)
        assert await code_of(w, op, **args) == code
        assert snapshot(w) == before


async def test_a_read_only_peer_may_look_but_not_change(tmp_path: Path) -> None:
    w = make_world(tmp_path)
    async with w.running():
        await seed(w)
        before = snapshot(w)
        for req in ops.REQUESTS:
            if req is ops.Events:
                continue
            if req.mutating:
                # refused before the arguments are even read
                assert await code_of(w, req.op, RO, junk=1) == 4002, req.op
            elif req is ops.Peers:  # may look, but there is no cluster here
                assert await code_of(w, req.op, RO) == NotFound.code
            elif not any(f.required for f in req.fields):
                await w.call(req.op, RO)
        assert await code_of(w, "fwd.add", RO, host_ports="81", destination="1.2.3.4:81") == 4002
        assert snapshot(w) == before


# ---- names that are someone else's --------------------------------------------------
async def test_a_name_that_exists_and_is_someone_elses_is_refused(tmp_path: Path) -> None:
    w = make_world(tmp_path)
    async with w.running():
        await seed(w)
        await w.call("ns.add", name="blue")
        w.net.make_foreign_link("v-net-1", kind="bridge")
        w.net.make_foreign_ns("green")
        before = snapshot(w)
        cases: list[tuple[str, dict[str, Any], str]] = [
            ("bridge.add", {"name": "v-net-1"}, "v-net-1 exists and was not made by netagent"),
            ("ns.add", {"name": "green"}, "namespace green exists and was not made by netagent"),
        ]
        for op, args, what in cases:
            with pytest.raises(NetagentError) as exc:
                await w.call(op, **args)
            assert exc.value.code == 3006 and what in exc.value.message, op
            assert snapshot(w) == before, op


async def test_a_host_name_someone_else_has_is_gone_round(tmp_path: Path) -> None:
    """The seed's name for the host end (veth-blue-br) is taken by someone else's
    interface: the plug gets the stable hashed name instead, and theirs is untouched."""
    w = make_world(tmp_path)
    async with w.running():
        await seed(w)
        await w.call("ns.add", name="blue")
        w.net.make_foreign_link("veth-blue-br")
        await w.call(
            "plug.add", ns="blue", bridge="v-net-0", addresses=["192.168.15.2/24"], ifname="eth0"
        )
    plug = w.state.get("plug/blue/v-net-0")
    assert plug is not None and plug.to_dict()["ifname"] == "eth0"
    assert plug.to_dict()["host_ifname"].startswith("na")
    assert "veth-blue-br veth UP - - -" in lines(w.net.dump())


# ---- show ---------------------------------------------------------------------------
def shown(show: dict[str, Any]) -> dict[str, tuple[str, tuple[str, ...]]]:
    return {i["key"]: (i["state"], tuple(i["missing"])) for i in show["intents"]}


async def test_show_marks_a_drifted_key_until_the_pass_puts_it_back(tmp_path: Path) -> None:
    w = make_world(tmp_path)
    async with w.running():
        await seed(w)
        assert set(shown(await w.call("show")).values()) == {("in place", ())}
    # someone deletes the bridge; the event source would say so
    await w.net.del_link(None, w.link("v-net-0").index)
    w.rec.drift("br/v-net-0", "v-net-0 was deleted")
    show = shown(await w.api.handle("show", {}, RW))
    assert show["br/v-net-0"] == ("drifted", ("v-net-0 was deleted",))
    assert show["ns/red"] == ("in place", ())
    async with w.running():
        await until(
            lambda: not w.rec.busy() and w.rec.status["br/v-net-0"].state == "in place", "repair"
        )
        show = shown(await w.call("show"))
    assert set(show.values()) == {("in place", ())}
    assert "v-net-0 bridge UP - netagent:br/v-net-0 192.168.15.5/24" in lines(w.net.dump())


async def test_a_forward_is_not_in_place_while_the_firewall_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(keystatus, "BACKOFF_MIN", 0.05)
    w = make_world(tmp_path)
    async with w.running():
        await seed(w)
        # the update fails, and so does the full sync it falls back to, and the bridges'
        # own rules that isolating a refused forward starts with
        for _ in range(3):
            w.fw.fail("apply", BackendFailed("nft: Error: Could not process rule"))
        with pytest.raises(BackendFailed) as exc:
            await w.call("forward.add", host_ports="81", destination="192.168.15.1:81")
        assert exc.value.details["errors"] == {FIREWALL: "nft: Error: Could not process rule"}
        show = await w.call("show")
        items = shown(show)
        for key in ("fwd/tcp/80", "fwd/tcp/81", "br/v-net-0"):
            assert items[key] == ("failing", ("the firewall is not in place",)), key
        assert items["ns/red"] == ("in place", ())
        assert items["plug/red/v-net-0"] == ("in place", ())
        fw = show["firewall"]
        assert (fw["in_place"], fw["state"], fw["error"]) == (
            False,
            "failing",
            "nft: Error: Could not process rule",
        )
        assert fw["pending"] == ["add forward fwd/tcp/81: 81/tcp -> 192.168.15.1:81"]
        assert (await w.call("status"))["summary"].endswith(", 1 failing")

        await until(lambda: w.rec.status[FIREWALL].state == "in place", "the retry")
        show = await w.call("show")
    assert set(shown(show).values()) == {("in place", ())}
    assert show["firewall"]["pending"] == []
    assert "forward fwd/tcp/81: 81/tcp -> 192.168.15.1:81" in lines(w.fw.dump())


@pytest.mark.parametrize("thread_from", [500, 0], ids=["checks-on-the-loop", "checks-in-a-thread"])
async def test_another_tools_dnat_is_warned_of_and_shown_as_not_in_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, thread_from: int
) -> None:
    """Issue 11, the truth in show: a port Docker also DNATs is warned of when the
    forward is added, marked not in place in show (with the doctor's line), and
    counted in status; doctor exits with problems. The same when the checks run in a
    worker thread (as they do from ``hostcheck.THREAD_FROM`` forwards on)."""
    from netagent.agent import hostcheck
    from netagent.backends import hostfw

    monkeypatch.setattr(hostcheck, "THREAD_FROM", thread_from)

    docker = (Path(__file__).parent / "samples" / "docker.iptables-save").read_text()
    docker = docker[docker.index("*nat") :]  # its DNAT (its FORWARD DROP: test_doctor.py)
    w = make_world(tmp_path)
    w.host.firewall.chains = hostfw.parse_xt_save(docker, "iptables-nft", 4)
    async with w.running():
        await w.call("ns.add", name="red")
        await w.call("bridge.add", **BR)
        await w.call("plug.add", **PLUG)
        assert (await w.call("doctor"))["problems"] == 0
        reply = await w.call("forward.add", host_ports="8083", destination="192.168.15.1:80")
        [warning] = reply["warnings"]
        assert "8083/tcp of fwd/tcp/8083 is also DNATed by chain DOCKER" in warning
        assert "(by Docker)" in warning
        await until(
            lambda: w.api.checker is not None and w.api.checker.of("fwd/tcp/8083"),
            "the findings recomputed after the request",
        )
        show = await w.call("show")
        item = next(i for i in show["intents"] if i["key"] == "fwd/tcp/8083")
        assert (item["in_place"], item["state"]) == (False, "blocked")
        assert item["doctor"][0].startswith("problem: host port 8083/tcp")
        assert show["findings"]["problems"] == 1
        assert (await w.call("status"))["findings"]["problems"] == 1
        others = [i for i in show["intents"] if i["key"] != "fwd/tcp/8083"]
        assert all(i["in_place"] for i in others)
        # gone once Docker's rule is
        w.host.firewall.chains = []
        assert (await w.call("doctor"))["problems"] == 0
        item = next(i for i in (await w.call("show"))["intents"] if i["key"] == "fwd/tcp/8083")
        assert item["in_place"]


async def test_a_burst_of_requests_gets_one_check_of_the_findings_at_its_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The findings follow the requests spaced by what checking them costs (10,000
    forwards: ~10 ms a check), so a burst is not slowed by one check per request; they
    do follow, once, after it."""
    w = make_world(tmp_path)
    async with w.running():
        checker = w.api.checker
        assert checker is not None
        await w.call("ns.add", name="red")
        await w.call("bridge.add", **BR)
        await w.call("plug.add", **PLUG)
        await until(
            lambda: checker.at is not None and w.rec._findings_at is None,
            "the first findings, and none scheduled",
        )
        refreshes: list[float] = []
        refresh = checker.refresh

        async def counted(read: bool) -> list[str]:
            refreshes.append(checker.cost)
            out = await refresh(read)
            checker.cost = 0.03  # as if checking took 30 ms: the next waits 0.3 s
            return out

        monkeypatch.setattr(checker, "refresh", counted)
        checker.cost = 0.03
        before = checker.at
        for port in range(8000, 8010):
            await w.call("forward.add", host_ports=str(port), destination="192.168.15.2:80")
        assert refreshes == []  # none yet: the burst took less than the spacing
        await until(lambda: len(refreshes) == 1, "one check after the burst")
        await until(lambda: checker.at != before, "the findings computed again")
        assert len(refreshes) == 1


async def test_a_plug_announces_itself_by_its_namespaces_defaults_or_its_own_sysctls(
    tmp_path: Path,
) -> None:
    """In a namespace netagent made, every interface announces its addresses by default
    (``netns.ANNOUNCE_DEFAULTS``): a plug sets no sysctl of its own there. In someone
    else's namespace it sets its interface's ``arp_notify`` and ``ndisc_notify``."""
    w = make_world(tmp_path)
    w.net.make_foreign_ns("green")
    async with w.running():
        await w.call("ns.add", name="red")
        await w.call("bridge.add", **BR)
        await w.call("plug.add", **PLUG)
        await w.call("plug.add", ns="green", bridge="v-net-0", addresses=["192.168.15.3/24"])
    assert w.net.announcing("red") and not w.net.announcing("green")
    assert not any(k.startswith("red:") for k in w.net.sysctls)
    green = {k: v for k, v in w.net.sysctls.items() if k.startswith("green:")}
    assert green == {
        "green:net/ipv4/conf/veth-green/arp_notify": "1",
        "green:net/ipv6/conf/veth-green/ndisc_notify": "1",
    }


async def test_a_bridge_port_has_ipv6_off_and_one_made_before_gets_it_off(tmp_path: Path) -> None:
    """A plug's host end is a bridge port: IPv6 goes off on it as it is made (each port
    with IPv6 grows the IPv6 FIB the kernel walks on every interface change), and a port
    found with IPv6 on (made by an older netagent) gets it off in the next pass. The
    namespace's end keeps IPv6."""
    w = make_world(tmp_path)
    async with w.running():
        await w.call("ns.add", name="red")
        await w.call("bridge.add", **BR)
        await w.call("plug.add", **PLUG)
        assert w.net.port_ipv6("veth-red-br") is False
        assert not any("red:" in k and "disable_ipv6" in k for k in w.net.sysctls)
        w.net.sysctls["net/ipv6/conf/veth-red-br/disable_ipv6"] = "0"  # as before
        w.rec.mark(["plug/red/v-net-0"], "periodic")
        await until(lambda: w.net.port_ipv6("veth-red-br") is False, "IPv6 off again")
        assert ("port_ipv6_off", "veth-red-br") in w.net.calls
