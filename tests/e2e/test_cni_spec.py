"""netagent's CNI plugin driven the way libcni drives it, against the real daemon in a
sandbox: every op at cniVersion 0.4.0, 1.0.0 and 1.1.0, the error paths, chained after
Debian's reference ``bridge`` plugin, the daemon down and back, a daemon restarted under
running containers, and ``ctl plug --netns|--pid`` for people. Real packets throughout;
every plugin run has a time limit under 10 s."""

from __future__ import annotations

import json
import os
import signal
from typing import Any

import pytest

from tests.support import cniplugin as P
from tests.support.daemon import Daemon
from tests.support.libcni import CNIError, RuntimeConf
from tests.support.net import http_get, ping, serve_http
from tests.support.topology import CLIENT_HOST, add_client
from tests.support.wait import wait_for

pytestmark = pytest.mark.e2e
PORT = {"portMappings": [{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}]}


@pytest.fixture(autouse=True)
def _reference_plugins() -> None:
    if not os.access(f"{P.REFERENCE}/bridge", os.X_OK):
        why = "apt-get install --no-install-recommends containernetworking-plugins"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true but the reference CNI plugins are missing: {why}")
        pytest.skip(why)


def netns(d: Daemon, *names: str) -> None:
    for name in names:
        d.sh("ip", "netns", "add", name)


def rt(name: str, caps: dict[str, Any] | None = None, ifname: str = "eth0") -> RuntimeConf:
    return RuntimeConf(
        name,
        f"/run/netns/{name}",
        ifname,
        [("IgnoreUnknown", "1"), ("K8S_POD_NAME", name)],
        caps or {},
    )


def address(result: dict[str, Any]) -> str:
    return str(result["ips"][0]["address"]).split("/")[0]


def table(d: Daemon) -> str:
    return d.sh("nft", "list", "table", "inet", "netagent", check=False).stdout


def attachments(d: Daemon) -> list[str]:
    return [r["key"] for r in d.ctl_json("attachments")]


@pytest.mark.parametrize("version", ["0.4.0", "1.0.0", "1.1.0"])
def test_the_whole_lifecycle(daemon: Daemon, version: str) -> None:
    cni = P.driver(daemon, P.install(daemon))
    net = P.netagent_conf(daemon, version=version)
    info = cni.get_version_info("netagent")
    assert info["supportedVersions"] == ["0.4.0", "1.0.0", "1.1.0"]
    assert cni.validate_network_list(net) == ["ips", "mac", "portMappings"]
    add_client(daemon)
    netns(daemon, "c1", "c2", "c3")

    result, took = P.timed(lambda: cni.add_network_list(net, rt("c1", PORT)))
    print(f"ADD at {version}: {took * 1000:.0f} ms")
    assert result["cniVersion"] == version
    bridge, host, inner = result["interfaces"]
    assert (bridge["name"], inner["name"], inner["sandbox"]) == ("cni-na0", "eth0", "/run/netns/c1")
    assert all(i.get("mac") for i in result["interfaces"])
    [ip] = result["ips"]
    assert (ip["address"], ip["gateway"], ip["interface"]) == ("10.88.0.2/16", "10.88.0.1", 2)
    assert ("version" in ip) == (version == "0.4.0")
    assert result["routes"] == [{"dst": "0.0.0.0/0", "gw": "10.88.0.1"}]
    links = daemon.sh("ip", "-n", "c1", "-j", "addr", "show", "eth0").stdout
    [eth0] = json.loads(links)
    assert eth0["address"] == inner["mac"]
    assert any(a["local"] == "10.88.0.2" for a in eth0["addr_info"])
    assert "default via 10.88.0.1" in daemon.sh("ip", "-n", "c1", "route").stdout

    serve_http(daemon, "c1", "10.88.0.2", 80, "from c1")
    assert http_get(daemon, "client", f"http://{CLIENT_HOST}:8080/") == "from c1"
    other = cni.add_network_list(net, rt("c2"))
    assert address(other) == "10.88.0.3"
    # hairpin: a container reaching its neighbour's mapping through the host's address
    assert http_get(daemon, "c2", f"http://{CLIENT_HOST}:8080/") == "from c1"
    assert http_get(daemon, None, "http://127.0.0.1:8080/") == "from c1"
    P.timed(lambda: cni.check_network_list(net, rt("c1", PORT)))

    # the host end deleted: repaired, with the container's MAC, and CHECK passes again
    daemon.sh("ip", "link", "del", host["name"])
    wait_for(
        "the page through 8080 again",
        lambda: http_get(daemon, "client", f"http://{CLIENT_HOST}:8080/") == "from c1",
    )
    again = json.loads(daemon.sh("ip", "-n", "c1", "-j", "link", "show", "eth0").stdout)
    assert again[0]["address"] == inner["mac"]

    def checked() -> bool:
        cni.check_network_list(net, rt("c1", PORT))
        return True

    wait_for("CHECK to pass", checked, ignore=(CNIError,))

    if version == "1.1.0":
        cni.get_status_network_list(net)
        assert [e["command"] for e in cni.log if e["command"] == "STATUS"] == ["STATUS"]

    _, took = P.timed(lambda: cni.del_network_list(net, rt("c1", PORT)))
    print(f"DEL at {version}: {took * 1000:.0f} ms")
    assert "eth0" not in daemon.sh("ip", "-n", "c1", "link").stdout
    assert host["name"] not in daemon.sh("ip", "link").stdout
    assert "8080" not in table(daemon)
    assert http_get(daemon, "client", f"http://{CLIENT_HOST}:8080/").startswith("ERROR")
    cni.del_network_list(net, rt("c1", PORT))  # a second DEL succeeds
    # the lease came back
    assert address(cni.add_network_list(net, rt("c3"))) == "10.88.0.2"

    # GC: the stale attachment c2 (not in the runtime's cache, so only GC can tell)
    (daemon.dir / "cni-cache" / "results" / "nanet-c2-eth0").unlink()
    cni.gc_network_list(net, [("c3", "eth0")])
    if version == "1.1.0":
        assert attachments(daemon) == ["att/c3/eth0"]
        assert "10.88.0.3" not in daemon.sh("ip", "-n", "c2", "addr").stdout
    else:  # libcni sends GC to plugins from 1.1.0 on
        assert attachments(daemon) == ["att/c2/eth0", "att/c3/eth0"]
    cni.del_network_list(net, rt("c3"))
    cni.del_network_list(net, rt("c2"))
    assert attachments(daemon) == []


def test_error_paths(daemon: Daemon) -> None:
    cni = P.driver(daemon, P.install(daemon))
    net = P.netagent_conf(daemon)
    netns(daemon, "c1", "c2", "c3")

    def code(conf: Any, runtime: RuntimeConf) -> int | None:
        with pytest.raises(CNIError) as exc:
            P.timed(lambda: cni.add_network_list(conf, runtime))
        assert exc.value.plugin == "netagent", exc.value
        return exc.value.code

    assert code(P.netagent_conf(daemon, version="0.3.1"), rt("c1")) == 1
    assert code(P.netagent_conf(daemon, ipam={"type": "host-local"}), rt("c1")) == 2
    assert code(P.netagent_conf(daemon, subnet="10.88.0.1/16"), rt("c1")) == 7
    assert code(P.netagent_conf(daemon, mtu=10), rt("c1")) == 7
    sctp = {"portMappings": [{"hostPort": 99, "containerPort": 99, "protocol": "sctp"}]}
    assert code(net, rt("c1", sctp)) == 2
    assert code(net, RuntimeConf("c9", "/run/netns/nope", "eth0")) == 4
    daemon.sh("ip", "-n", "c1", "link", "add", "eth0", "type", "veth", "peer", "name", "x0")
    with pytest.raises(CNIError) as exists:
        cni.add_network_list(net, rt("c1"))
    assert exists.value.code == 100 and "eth0 exists" in exists.value.msg
    assert "name-taken" in exists.value.details
    cni.add_network_list(net, rt("c2", PORT))
    assert code(net, rt("c3", PORT)) == 100  # the host port is c2's
    assert attachments(daemon) == ["att/c2/eth0"]  # nothing left behind by the failures
    with pytest.raises(CNIError) as unknown:
        cni.check_network_list(net, rt("c3"))
    assert unknown.value.code == 3
    cni.del_network_list(net, RuntimeConf("c2", "", "eth0"))  # DEL without a namespace
    assert attachments(daemon) == [] and "8080" not in table(daemon)


@pytest.mark.parametrize("version", ["0.4.0", "1.0.0"])
def test_chained_after_the_reference_bridge_plugin(daemon: Daemon, version: str) -> None:
    cni = P.driver(daemon, P.install(daemon))
    net = P.chained_conf(daemon)
    net.cni_version = version
    add_client(daemon)
    netns(daemon, "c1", "c2")
    result, _ = P.timed(lambda: cni.add_network_list(net, rt("c1", PORT)))
    adds = [e for e in cni.log if e["command"] == "ADD"]
    assert result == adds[1]["stdin"]["prevResult"] | {"cniVersion": version}  # passed on
    ip = address(result)
    assert ip.startswith("10.22.0.")
    serve_http(daemon, "c1", ip, 80, "behind the reference bridge")
    assert (
        http_get(daemon, "client", f"http://{CLIENT_HOST}:8080/") == "behind the reference bridge"
    )
    cni.add_network_list(net, rt("c2"))
    assert http_get(daemon, "c2", f"http://{CLIENT_HOST}:8080/") == "behind the reference bridge"
    assert http_get(daemon, None, "http://127.0.0.1:8080/") == "behind the reference bridge"
    assert "hairpin br/cni-ref0 10.22.0.0/24" in table(daemon)
    rows = {r["key"]: r for r in daemon.ctl_json("forwards")}
    assert rows["fwd/tcp/8080"]["owner"] == "att/c1/eth0"
    cni.check_network_list(net, rt("c1", PORT))  # bridge's CHECK and netagent's
    cni.del_network_list(net, rt("c1", PORT))
    assert "8080" not in table(daemon)
    assert http_get(daemon, "client", f"http://{CLIENT_HOST}:8080/").startswith("ERROR")
    cni.del_network_list(net, rt("c2"))
    assert "hairpin" not in table(daemon) and attachments(daemon) == []


def test_the_daemon_down_and_back(daemon: Daemon) -> None:
    cni = P.driver(daemon, P.install(daemon))
    net = P.netagent_conf(daemon)
    new = P.netagent_conf(daemon, version="1.1.0")
    add_client(daemon)
    netns(daemon, "c1", "c2")
    cni.add_network_list(net, rt("c1", PORT))
    serve_http(daemon, "c1", "10.88.0.2", 80, "c1")
    daemon.stop()
    # the data plane stays
    assert http_get(daemon, "client", f"http://{CLIENT_HOST}:8080/") == "c1"
    for what, call, want in (
        ("ADD", lambda: cni.add_network_list(net, rt("c2")), 11),
        ("CHECK", lambda: cni.check_network_list(net, rt("c1", PORT)), 11),
        ("STATUS", lambda: cni.get_status_network_list(new), 50),
    ):
        with pytest.raises(CNIError) as exc:
            P.timed(call, limit=3.0)
        assert exc.value.code == want, (what, exc.value)
        assert "netagent is unreachable" in exc.value.msg
    assert "att/c2" not in daemon.log()
    P.timed(lambda: cni.del_network_list(net, rt("c1", PORT)), limit=3.0)
    queued = sorted((P.queue_dir(daemon)).glob("*.json"))
    assert len(queued) == 1, queued
    daemon.start()
    wait_for(
        "the queued DEL to be carried out", lambda: not list(P.queue_dir(daemon).glob("*.json"))
    )
    wait_for("c1's attachment to go", lambda: attachments(daemon) == [])
    assert "8080" not in table(daemon) and "eth0" not in daemon.sh("ip", "-n", "c1", "link").stdout
    assert address(cni.add_network_list(net, rt("c2"))) == "10.88.0.2"  # the lease is free
    cni.get_status_network_list(new)


def test_a_restarted_daemon_keeps_containers_reachable_and_leases(daemon: Daemon) -> None:
    cni = P.driver(daemon, P.install(daemon))
    net = P.netagent_conf(daemon)
    add_client(daemon)
    netns(daemon, "c1", "c2")
    cni.add_network_list(net, rt("c1", PORT))
    serve_http(daemon, "c1", "10.88.0.2", 80, "still here")
    daemon.kill9()  # a crash
    daemon.start()
    assert http_get(daemon, "client", f"http://{CLIENT_HOST}:8080/") == "still here"
    assert all(i["in_place"] for i in daemon.ctl_json("show")["intents"])
    assert address(cni.add_network_list(net, rt("c2"))) == "10.88.0.3"  # never .2 twice
    daemon.restart()
    cni.check_network_list(net, rt("c1", PORT))
    cni.del_network_list(net, rt("c1", PORT))
    cni.del_network_list(net, rt("c2"))
    assert attachments(daemon) == []


def test_people_plug_another_tools_namespaces(daemon: Daemon) -> None:
    daemon.ok("bridge", "add", "pbr", "--address", "10.70.0.1/24")
    proc = daemon.box.popen(["unshare", "--net", "sleep", "600"])
    pid = proc.pid
    wait_for(
        "the process to be in its own namespace",
        lambda: os.readlink(f"/proc/{pid}/ns/net") != os.readlink(f"/proc/{daemon.box.pid}/ns/net"),
        ignore=(OSError,),
    )
    out = daemon.ok("plug", "--pid", str(pid), "pbr")
    assert f"process {pid}'s namespace /proc/{pid}/ns/net: eth0 at 10.70.0.2/24 on pbr" in out
    ns = ["nsenter", f"--net=/proc/{pid}/ns/net"]
    assert daemon.sh(*ns, "ping", "-c", "1", "-W", "2", "10.70.0.1", check=False).returncode == 0
    # another tool's namespace by path: the namespace stays when it is unplugged
    daemon.sh("ip", "netns", "add", "theirs")
    daemon.ok("plug", "--netns", "/run/netns/theirs", "pbr", "--address", "10.70.0.9/24")
    assert ping(daemon, "theirs", "10.70.0.1")
    assert "ok " in daemon.ok("show")
    # the process exits: noticed, never plugged again
    os.kill(pid, signal.SIGTERM)
    proc.wait(10)
    key = f"att/pid-{pid}/eth0"

    def failing() -> Any:
        items = {i["key"]: i for i in daemon.ctl_json("show")["intents"]}
        item = items[key]
        return item if item["state"] == "failing" else None

    item = wait_for("the --pid plug to be reported gone", failing)
    assert f"process {pid} is gone" in item["error"]
    daemon.ok("unplug", "--pid", str(pid), "pbr")
    daemon.ok("unplug", "--netns", "/run/netns/theirs", "pbr")
    assert "theirs" in daemon.sh("ip", "netns", "list").stdout
    assert "eth0" not in daemon.sh("ip", "-n", "theirs", "link").stdout
    assert attachments(daemon) == []
    r = daemon.ctl("plug", "--netns", "/run/netns/nothing", "pbr")
    assert r.returncode == 3 and "there is no namespace at /run/netns/nothing" in r.stderr
