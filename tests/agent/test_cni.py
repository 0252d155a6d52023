"""The ``cni`` op and ``plug --netns|--pid`` over the fakes: attachments, their leases and
port mappings, identity, GC, CHECK, STATUS, chained mode, the queue of DELs, and how an
attachment shows, is repaired, pruned and purged."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from netagent.agent import cni as agent_cni
from netagent.agent import foreign
from netagent.agent.cniconf import derived_mac
from netagent.agent.errors import NetagentError
from netagent.agent.keystatus import FAILING, IN_PLACE
from netagent.agent.kinds import attachment as att_mod
from netagent.agent.values import short_hash
from netagent.cni import queue

from ..support.wait import until
from .world import World, lines, make_world

NETNS = "/var/run/netns/cni-1"
CONF: dict[str, Any] = {
    "cniVersion": "1.0.0",
    "name": "podnet",
    "type": "netagent",
    "bridge": "cni0",
    "subnet": "10.88.0.0/16",
    "gateway": "10.88.0.1",
    "ipMasq": True,
    "mtu": 1400,
}
PORTS = [{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}]


def conf(**extra: Any) -> dict[str, Any]:
    return {**CONF, **extra}


async def cni(
    w: World,
    command: str,
    config: dict[str, Any] | None = None,
    cid: str = "c1",
    ifname: str = "eth0",
    netns: str | None = NETNS,
    **args: Any,
) -> Any:
    call: dict[str, Any] = {"command": command, "config": config if config is not None else CONF}
    if command != "GC":
        call.update(container_id=cid, ifname=ifname)
        if netns:
            call["netns"] = netns
    call.update(args)
    return (await w.call("cni", **call))["result"]


async def cni_code(w: World, command: str, config: dict[str, Any] | None = None, **kw: Any) -> int:
    with pytest.raises(NetagentError) as exc:
        await cni(w, command, config, **kw)
    code: int = exc.value.details.get("cni_code", -exc.value.code)
    return code


@pytest.fixture
def w(tmp_path: Path) -> World:
    world = make_world(tmp_path, feed="events")
    world.net.make_foreign_ns(NETNS)
    return world


async def test_add_makes_the_bridge_leases_plugs_and_forwards(w: World) -> None:
    async with w.running():
        result = await cni(w, "ADD", conf(runtimeConfig={"portMappings": PORTS}))
    assert result["cniVersion"] == "1.0.0"
    names = [i["name"] for i in result["interfaces"]]
    assert names[0] == "cni0" and names[2] == "eth0"
    assert result["interfaces"][2]["sandbox"] == NETNS
    assert result["interfaces"][2]["mac"] == derived_mac("att/c1/eth0")
    assert "mtu" not in result["interfaces"][2]  # an interface's mtu is 1.1.0's
    assert result["ips"] == [{"address": "10.88.0.2/16", "gateway": "10.88.0.1", "interface": 2}]
    assert result["routes"] == [{"dst": "0.0.0.0/0", "gw": "10.88.0.1"}]
    assert result["dns"] == {}
    host = names[1]
    assert lines(w.net.dump()) == [
        "cni0 bridge UP - netagent:br/cni0 10.88.0.1/16",
        "lo - DOWN - - -",
        f"{host} veth UP master=cni0 netagent:att/c1/eth0 -",
    ]
    assert lines(w.net.dump(NETNS)) == [
        "eth0 veth UP - netagent:att/c1/eth0 10.88.0.2/16",
        "lo - DOWN - - -",  # the runtime's, not netagent's
        "default via 10.88.0.1 dev eth0 proto 201",
    ]
    assert w.net.mtus == {host: 1400, "eth0": 1400}
    assert lines(w.fw.dump()) == [
        "forward fwd/tcp/8080: 8080/tcp -> 10.88.0.2:80 (for att/c1/eth0)",
        "rule hairpin br/cni0 10.88.0.0/16",
        "rule masquerade br/cni0 10.88.0.0/16 oifname != cni0",
    ]
    att = w.state.get("att/c1/eth0")
    assert isinstance(att, att_mod.Attachment)
    assert att.netns_id == w.net.ns_identity(NETNS) and att.network == "podnet"


async def test_results_in_each_version(w: World) -> None:
    w.net.make_foreign_ns("/run/netns/c2")
    w.net.make_foreign_ns("/run/netns/c3")
    async with w.running():
        old = await cni(w, "ADD", conf(cniVersion="0.4.0"))
        new = await cni(w, "ADD", conf(cniVersion="1.1.0"), cid="c2", netns="/run/netns/c2")
        v6 = conf(subnets=[{"subnet": "fd88::/64"}], cniVersion="1.1.0")
        with pytest.raises(NetagentError, match="make the configuration match the bridge"):
            await cni(w, "ADD", v6, cid="c3", netns="/run/netns/c3")
    assert old["cniVersion"] == "0.4.0" and old["ips"][0]["version"] == "4"
    assert new["cniVersion"] == "1.1.0" and "version" not in new["ips"][0]
    assert [i.get("mtu") for i in new["interfaces"]] == [None, 1400, 1400]


async def test_dual_stack_and_requested_addresses(tmp_path: Path) -> None:
    w = make_world(tmp_path)
    for n in range(4):
        w.net.make_foreign_ns(f"/run/netns/d{n}")
    dual = conf(
        subnet=None, gateway=None, subnets=[{"subnet": "10.9.0.0/24"}, {"subnet": "fd09::/64"}]
    )
    del dual["subnet"], dual["gateway"]
    async with w.running():
        a = await cni(w, "ADD", dual, cid="d0", netns="/run/netns/d0")
        assert [i["address"] for i in a["ips"]] == ["10.9.0.2/24", "fd09::2/64"]
        assert [r["dst"] for r in a["routes"]] == ["0.0.0.0/0", "::/0"]
        b = await cni(
            w,
            "ADD",
            dict(dual, runtimeConfig={"ips": ["10.9.0.77"]}),
            cid="d1",
            netns="/run/netns/d1",
        )
        assert [i["address"] for i in b["ips"]] == ["10.9.0.77/24", "fd09::3/64"]
        c = await cni(
            w, "ADD", dual, cid="d2", netns="/run/netns/d2", args="IgnoreUnknown=1;IP=10.9.0.99"
        )
        assert c["ips"][0]["address"] == "10.9.0.99/24"
        # args.cni.ips wins over CNI_ARGS IP= (the conventions say so)
        d = await cni(
            w,
            "ADD",
            {**dual, "args": {"cni": {"ips": ["10.9.0.50/24"]}}},
            cid="d3",
            netns="/run/netns/d3",
            args="IP=10.9.0.51",
        )
        assert d["ips"][0]["address"] == "10.9.0.50/24"
        w.net.make_foreign_ns("/run/netns/d4")
        taken = dict(dual, runtimeConfig={"ips": ["10.9.0.77"]})
        with pytest.raises(NetagentError, match="already used on cni0 by att/d1/eth0"):
            await cni(w, "ADD", taken, cid="d4", netns="/run/netns/d4")
        assert (
            await cni_code(
                w,
                "ADD",
                dict(dual, runtimeConfig={"ips": ["10.10.0.1"]}),
                cid="d4",
                netns="/run/netns/d4",
            )
            == 7
        )
        assert "att/d4/eth0" not in w.state


async def test_a_repeated_add_is_answered_the_same_and_a_second_one_is_refused(w: World) -> None:
    w.net.make_foreign_ns("/run/netns/other")
    async with w.running():
        first = await cni(w, "ADD", conf(runtimeConfig={"portMappings": PORTS}))
        calls = len(w.net.calls)
        again = await cni(w, "ADD", conf(runtimeConfig={"portMappings": PORTS}))
        assert again == first and len(w.net.calls) == calls
        with pytest.raises(NetagentError, match="the runtime must DEL it first"):
            await cni(w, "ADD", conf(), netns="/run/netns/other")
        # another container may not take the host port
        with pytest.raises(NetagentError, match="8080/tcp is already forwarded") as exc:
            await cni(
                w,
                "ADD",
                conf(runtimeConfig={"portMappings": PORTS}),
                cid="c2",
                netns="/run/netns/other",
            )
        assert exc.value.code == 3004
        assert "att/c2/eth0" not in w.state


async def test_an_interface_the_container_has_already_is_refused(w: World) -> None:
    w.net.make_foreign_link("eth0", ns=NETNS)
    async with w.running():
        with pytest.raises(NetagentError, match="eth0 exists") as exc:
            await cni(w, "ADD")
    assert exc.value.code == 3006
    assert "att/c1/eth0" not in w.state


async def test_del_removes_exactly_what_add_made_and_always_succeeds(w: World) -> None:
    async with w.running():
        await w.call("forward.add", host_ports="9090", destination="10.88.0.200:80")
        await cni(w, "ADD", conf(runtimeConfig={"portMappings": PORTS}))
        assert await cni(w, "DEL") is None
        assert lines(w.net.dump(NETNS)) == ["lo - DOWN - - -"]
        assert [k for k in w.state.intents] == ["fwd/tcp/9090", "br/cni0"] or set(
            w.state.intents
        ) == {
            "fwd/tcp/9090",
            "br/cni0",
        }
        assert lines(w.fw.dump())[0] == "forward fwd/tcp/9090: 9090/tcp -> 10.88.0.200:80"
        await cni(w, "DEL")  # again
        await cni(w, "DEL", netns=None)  # without a namespace
        await cni(w, "DEL", cid="never-added")
        # the lease came back: the next container gets .2 again
        w.net.make_foreign_ns("/run/netns/n2")
        again = await cni(w, "ADD", cid="c9", netns="/run/netns/n2")
        assert again["ips"][0]["address"] == "10.88.0.2/16"


async def test_an_attachment_whose_namespace_went_is_reported_and_del_still_works(w: World) -> None:
    async with w.running():
        await cni(w, "ADD")
        w.net.drop_ns(NETNS)  # the container exited; its veth went with it
        await until(
            lambda: (st := w.rec.status.get("att/c1/eth0")) is not None and st.state == FAILING,
            "the attachment to fail",
        )
        st = w.rec.status["att/c1/eth0"]
        assert st.error is not None and "is gone" in st.error
        host = [n for n in w.net.dump().split() if n.startswith("veth")]
        assert host == []  # never made again
        assert await cni_code(w, "CHECK") == 110
        await cni(w, "DEL")
        assert "att/c1/eth0" not in w.state and "att/c1/eth0" not in w.rec.status


async def test_a_namespace_replaced_under_the_same_path_is_never_plugged(w: World) -> None:
    async with w.running():
        await cni(w, "ADD")
        w.net.drop_ns(NETNS)
        w.net.make_foreign_ns(NETNS)  # another namespace at the same path
        await until(lambda: w.rec.status["att/c1/eth0"].state == FAILING, "the attachment to fail")
        assert "names another namespace now" in (w.rec.status["att/c1/eth0"].error or "")
        assert lines(w.net.dump(NETNS)) == ["lo - DOWN - - -"]
        # the runtime's next ADD for that key (its DEL was lost) replaces it
        result = await cni(w, "ADD")
        assert result["ips"][0]["address"] == "10.88.0.2/16"
        assert w.rec.status["att/c1/eth0"].state == IN_PLACE


async def test_the_host_side_is_repaired_while_the_namespace_is_the_same(w: World) -> None:
    async with w.running():
        result = await cni(w, "ADD")
        host = result["interfaces"][1]["name"]
        index = w.net.host_index(host)
        assert index is not None
        await w.net.del_link(None, index)  # someone deletes it (the inner end goes too)
        await until(lambda: w.net.host_index(host) is not None, "the host end to come back")
        await until(
            lambda: "10.88.0.2/16" in w.net.dump(NETNS), "the inner end to be addressed again"
        )
        inner = [lk for lk in (await w.net.links(NETNS)) if lk.name == "eth0"]
        assert inner and inner[0].mac == result["interfaces"][2]["mac"]  # the same MAC
        await cni(w, "CHECK", conf(prevResult=result))


async def test_check_compares_the_kernel_with_the_intent(w: World) -> None:
    async with w.running():
        result = await cni(w, "ADD", conf(runtimeConfig={"portMappings": PORTS}))
        await cni(w, "CHECK", conf(prevResult=result, runtimeConfig={"portMappings": PORTS}))
        assert await cni_code(w, "CHECK", cid="unknown") == 3
        other = json.loads(json.dumps(result))
        other["ips"][0]["address"] = "10.88.0.9/16"
        assert await cni_code(w, "CHECK", conf(prevResult=other)) == 110
        inner = await w.net.link(NETNS, "eth0")
        assert inner is not None
        w.net.on_link = None  # nothing tells the daemon: CHECK must look itself
        await w.net.del_address(NETNS, inner.index, inner_addr(result))
        with pytest.raises(NetagentError, match=r"add 10\.88\.0\.2/16 to"):
            await cni(w, "CHECK", conf(prevResult=result))


def inner_addr(result: dict[str, Any]) -> Any:
    import ipaddress

    return ipaddress.ip_interface(result["ips"][0]["address"])


async def test_gc_removes_what_valid_attachments_does_not_list_and_nothing_else(w: World) -> None:
    for n in range(3):
        w.net.make_foreign_ns(f"/run/netns/g{n}")
    w.net.make_foreign_ns("/run/netns/mine")
    other = conf(name="othernet", bridge="cni1", subnet="10.89.0.0/16", gateway="10.89.0.1")
    async with w.running():
        await w.call("bridge.add", name="people", addresses=["10.50.0.1/24"])
        await w.call("plug.add", bridge="people", netns="/run/netns/mine")
        for n in range(3):
            ports = [{"hostPort": 7000 + n, "containerPort": 80}]
            await cni(
                w,
                "ADD",
                conf(runtimeConfig={"portMappings": ports}),
                cid=f"g{n}",
                netns=f"/run/netns/g{n}",
            )
        await cni(w, "ADD", other, cid="o1", netns="/run/netns/g0", ifname="eth1")
        keep = [{"containerID": "g1", "ifname": "eth0"}]
        assert await cni(w, "GC", conf(**{"cni.dev/valid-attachments": keep})) == {"removed": 2}
        atts = sorted(k for k in w.state.intents if k.startswith("att/"))
        assert atts == [
            "att/g1/eth0",
            "att/netns-" + short_hash("/run/netns/mine", 12) + "/eth0",
            "att/o1/eth1",
        ]
        assert [f.split(":")[0] for f in lines(w.fw.dump()) if f.startswith("forward")] == [
            "forward fwd/tcp/7001"
        ]
        # libcni's older name of the list; no list at all removes nothing
        assert await cni(w, "GC", conf(**{"cni.dev/attachments": keep})) == {"removed": 0}
        assert await cni(w, "GC", other) == {"removed": 0}
        assert await cni(w, "GC", conf(**{"cni.dev/valid-attachments": []})) == {"removed": 1}


async def test_status_says_whether_add_can_be_served(w: World) -> None:
    async with w.running():
        assert await cni(w, "STATUS", netns=None) is None
        await cni(w, "ADD")
        w.fw.fail("observe", OSError("nft is gone"))
        w.fw.fail("observe", OSError("nft is gone"))
        w.rec.mark_all("resync")
        await until(
            lambda: (st := w.rec.status.get("firewall")) is not None and st.state == FAILING,
            "the firewall to fail",
        )
        assert await cni_code(w, "STATUS", netns=None) == 50


async def test_config_and_environment_errors_have_the_spec_codes(w: World) -> None:
    async with w.running():
        assert await cni_code(w, "ADD", conf(cniVersion="0.3.1")) == 1
        assert await cni_code(w, "ADD", conf(ipam={"type": "host-local"})) == 2
        assert (
            await cni_code(
                w,
                "ADD",
                conf(
                    runtimeConfig={
                        "portMappings": [{"hostPort": 1, "containerPort": 2, "protocol": "sctp"}]
                    }
                ),
            )
            == 2
        )
        assert await cni_code(w, "ADD", conf(subnet="10.88.0.1/16")) == 7
        assert await cni_code(w, "ADD", conf(gateway="10.99.0.1")) == 7
        assert await cni_code(w, "ADD", conf(mtu=20)) == 7
        assert await cni_code(w, "ADD", conf(bridge=None)) == 7  # a subnet without a bridge
        assert await cni_code(w, "ADD", {**CONF, "name": "bad name"}) == 7
        ports = [{"hostPort": 0, "containerPort": 80}]
        assert await cni_code(w, "ADD", conf(runtimeConfig={"portMappings": ports})) == 7
        assert await cni_code(w, "ADD", cid="-bad") == 4
        assert await cni_code(w, "ADD", ifname="a/b") == 4
        assert await cni_code(w, "ADD", netns="/nonexistent/ns") == 4
        assert await cni_code(w, "ADD", netns=None) == 4
        assert await cni_code(w, "ADD", args="novalue") == 4
        assert await cni_code(w, "FROB") == 4
        assert await cni_code(w, "DEL", ifname="") == 4
    assert not [k for k in w.state.intents if not k.startswith("br/")]


async def test_chained_after_another_plugin(w: World) -> None:
    """The reference bridge plugin made eth0 at 10.22.0.5 on its bridge cni-ref: netagent
    only maps the ports, and passes the result on unchanged."""
    prev = {
        "cniVersion": "1.0.0",
        "interfaces": [
            {"name": "cni-ref", "mac": "aa:bb:cc:00:00:01"},
            {"name": "veth1234", "mac": "aa:bb:cc:00:00:02"},
            {"name": "eth0", "mac": "aa:bb:cc:00:00:03", "sandbox": NETNS},
        ],
        "ips": [{"address": "10.22.0.5/24", "gateway": "10.22.0.1", "interface": 2}],
        "routes": [{"dst": "0.0.0.0/0"}],
        "dns": {},
    }
    chained = {
        "cniVersion": "1.0.0",
        "name": "refnet",
        "type": "netagent",
        "capabilities": {"portMappings": True},
        "runtimeConfig": {"portMappings": PORTS},
        "prevResult": prev,
    }
    w.net.make_foreign_link("cni-ref", kind="bridge")
    async with w.running():
        assert await cni(w, "ADD", chained) == prev
        assert lines(w.fw.dump()) == [
            "forward fwd/tcp/8080: 8080/tcp -> 10.22.0.5:80 (for att/c1/eth0)",
            "rule hairpin br/cni-ref 10.22.0.0/24",
        ]
        assert w.net.sysctls["net/ipv4/conf/cni-ref/route_localnet"] == "1"
        assert lines(w.net.dump(NETNS)) == ["lo - DOWN - - -"]  # nothing of netagent's inside
        await cni(w, "CHECK", chained)
        assert await cni_code(w, "ADD", {**chained, "prevResult": None}) == 7
        await cni(w, "DEL", chained)
        assert w.fw.dump() == "" and not w.state.intents
        # chained without port mappings passes the result on too
        assert await cni(w, "ADD", {**chained, "runtimeConfig": {}}) == prev


async def test_queued_dels_are_carried_out_unless_the_attachment_is_newer(
    w: World, tmp_path: Path
) -> None:
    directory = tmp_path / "cni-queue"
    w.net.make_foreign_ns("/run/netns/q2")
    async with w.running():
        await cni(w, "ADD")
        old = queue.enqueue(
            str(directory),
            {"command": "DEL", "containerID": "c2", "ifname": "eth0", "config": CONF},
        )
        await cni(w, "ADD", cid="c2", netns="/run/netns/q2")  # made after that DEL was queued
        queue.enqueue(
            str(directory),
            {"command": "DEL", "containerID": "c1", "ifname": "eth0", "config": CONF},
        )
        bad = queue.enqueue(
            str(directory),
            {
                "command": "DEL",
                "containerID": "c3",
                "ifname": "eth0",
                "config": {"cniVersion": "9"},
            },
        )
        for path in queue.pending(str(directory)):
            await agent_cni._replay_one(w.api, queue, path)
        assert queue.pending(str(directory)) == []
        assert "att/c1/eth0" not in w.state and "att/c2/eth0" in w.state
        assert Path(bad + queue.REJECTED).exists() and not Path(old).exists()


async def test_people_plug_another_tools_namespace_by_path_or_pid(
    w: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    w.net.make_foreign_ns("/proc/4242/ns/net")
    w.net.make_foreign_link("eth0", ns="/proc/4242/ns/net")  # it has an eth0 of its own
    started = {4242: 777}
    monkeypatch.setattr(foreign, "process_start", lambda pid: started.get(pid))
    monkeypatch.setattr(att_mod, "process_start", lambda pid: started.get(pid))
    async with w.running():
        await w.call("bridge.add", name="br0", addresses=["10.7.0.1/24"])
        reply = await w.call("plug.add", bridge="br0", pid="4242")
        assert reply["changes"][0]["what"].startswith(
            "process 4242's namespace /proc/4242/ns/net: eth1 at 10.7.0.2/24 on br0"
        )
        await w.call("plug.add", bridge="br0", netns=NETNS, addresses=["10.7.0.9/24"])
        assert "eth0 veth UP - netagent:att/netns-" in w.net.dump(NETNS)
        assert (await w.call("plug.add", bridge="br0", netns=NETNS))["changed"] is False
        rows = await w.call("attachment.list")
        assert [(r["netns"], r["ifname"], r["addresses"]) for r in rows] == [
            ("/proc/4242/ns/net", "eth1", ["10.7.0.2/24"]),
            (NETNS, "eth0", ["10.7.0.9/24"]),
        ] or sorted((r["netns"], r["ifname"], r["addresses"]) for r in rows) == sorted(
            [
                ("/proc/4242/ns/net", "eth1", ["10.7.0.2/24"]),
                (NETNS, "eth0", ["10.7.0.9/24"]),
            ]
        )
        # the process exits (its namespace lives on, held by another): noticed, not touched
        del started[4242]
        w.rec.mark_all("resync")
        key = "att/pid-4242/eth1"
        await until(lambda: w.rec.status[key].state == FAILING, "the pid plug to fail")
        assert "process 4242 is gone" in (w.rec.status[key].error or "")
        await w.call("plug.del", bridge="br0", pid="4242")
        await w.call("plug.del", bridge="br0", netns=NETNS)
        assert lines(w.net.dump(NETNS)) == ["lo - DOWN - - -"]  # the namespace stays
        assert w.net.ns_exists(NETNS)
        with pytest.raises(NetagentError, match="is not plugged into br0"):
            await w.call("plug.del", bridge="br0", netns=NETNS)
        with pytest.raises(NetagentError, match="give one of NS, --netns PATH or --pid PID"):
            await w.call("plug.add", bridge="br0", ns="red", netns=NETNS)
        with pytest.raises(NetagentError, match="there is no process 999"):
            await w.call("plug.add", bridge="br0", pid="999")
        with pytest.raises(NetagentError, match="not in a document"):
            await w.call("apply", intents=[{"kind": "plug", "bridge": "br0", "netns": NETNS}])


async def test_attachments_show_are_not_pruned_and_are_purged(w: World) -> None:
    async with w.running():
        await cni(w, "ADD", conf(runtimeConfig={"portMappings": PORTS}))
        show = await w.call("show")
        described = {i["key"]: i["describe"] for i in show["intents"]}
        assert described["att/c1/eth0"].startswith(
            f"container c1 in {NETNS} (network podnet): eth0 at 10.88.0.2/16 on cni0 via veth"
        )
        assert described["fwd/tcp/8080"] == "8080/tcp -> 10.88.0.2:80 (for att/c1/eth0)"
        assert all(i["in_place"] for i in show["intents"])
        [row] = await w.call("forward.list")
        assert row["owner"] == "att/c1/eth0"
        with pytest.raises(NetagentError, match="belongs to att/c1/eth0 and goes with it"):
            await w.call("forward.del", host_ports="8080")
        with pytest.raises(NetagentError, match="still used by container c1"):
            await w.call("bridge.del", name="cni0")
        # a document of people's intents prunes neither the attachment nor its forward; the
        # bridge they need must stay too
        doc = [{"kind": "ns", "name": "red"}]
        with pytest.raises(NetagentError, match="needs bridge cni0"):
            await w.call("apply", intents=doc, prune=True)
        await w.call(
            "apply",
            intents=[
                *doc,
                {
                    "kind": "bridge",
                    "name": "cni0",
                    "addresses": ["10.88.0.1/16"],
                    "masquerade": True,
                },
            ],
            prune=True,
        )
        assert {"att/c1/eth0", "fwd/tcp/8080"} <= set(w.state.intents)
        status = await w.call("status")
        assert "1 attachments" in status["summary"]
        await w.call("purge")
    assert not w.state.intents and w.fw.dump() == ""
    assert lines(w.net.dump(NETNS)) == ["lo - DOWN - - -"] and w.net.ns_exists(NETNS)
