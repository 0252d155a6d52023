"""The runtime harness proves itself with Debian's reference CNI plugins.

One test per runtime: a busybox container's page is fetched by the ``client`` namespace
(the outside world) through the host port the runtime published; one for the libcni
driver: ADD, CHECK (passing, then failing once the plugin's work is undone), DEL, GC,
VERSION and STATUS on a namespace made with ``ip netns add``, real traffic through the
port mapping. Everything inside a fresh sandbox per test.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from netagent.cli.sandbox import Sandbox
from tests.support.images import Images, remove_session_images, session_images
from tests.support.libcni import CNIConfig, CNIError, NetworkConfigList, RuntimeConf, SandboxExec
from tests.support.runtimes import (
    HTTPD,
    Containerd,
    Dockerd,
    Podman,
    http_get,
    outside_client,
    wait_http,
)
from tests.support.wait import wait_for

pytestmark = pytest.mark.e2e
REFERENCE = "/usr/lib/cni"
# what each test runs -> the Debian package that has it
PACKAGES = {
    "podman": "podman",
    "conmon": "conmon",
    "crun": "crun",
    "/usr/lib/podman/netavark": "netavark",
    "containerd": "containerd",
    "ctr": "containerd",
    "dockerd": "docker.io",
    "/usr/bin/docker": "docker.io",
    "/bin/busybox": "busybox-static",
    "/usr/lib/cni/bridge": "containernetworking-plugins",
    "iptables": "iptables",
}


def require(*tools: str) -> None:
    """Skip when a tool is missing, naming its package; fail instead under CI=true."""
    missing = sorted({PACKAGES[t] for t in tools if not (os.access(t, os.X_OK) or shutil.which(t))})
    if missing:
        why = "apt-get install --no-install-recommends " + " ".join(missing)
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true but runtime packages are missing: {why}")
        pytest.skip(f"missing runtime packages: {why}")


BASE = ("crun", "/bin/busybox", "/usr/lib/cni/bridge", "iptables")


@pytest.fixture(scope="session")
def images() -> Iterator[Images]:
    require("/bin/busybox")
    yield session_images()
    remove_session_images()


def reference_conflist(
    name: str, bridge: str, subnet: str, data_dir: str | None = None
) -> dict[str, Any]:
    """bridge + host-local + portmap, the reference plugins' usual chain."""
    prefix = subnet.rsplit(".", 1)[0]
    ipam: dict[str, Any] = {
        "type": "host-local",
        "ranges": [[{"subnet": subnet, "gateway": f"{prefix}.1"}]],
        "routes": [{"dst": "0.0.0.0/0"}],
    }
    if data_dir:
        ipam["dataDir"] = data_dir
    return {
        "cniVersion": "1.0.0",
        "name": name,
        "plugins": [
            {
                "type": "bridge",
                "bridge": bridge,
                "isGateway": True,
                "ipMasq": True,
                "hairpinMode": True,
                "ipam": ipam,
            },
            {"type": "portmap", "capabilities": {"portMappings": True}},
        ],
    }


def write_conflist(directory: Path, doc: dict[str, Any], filename: str | None = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / (filename or f"10-{doc['name']}.conflist")
    path.write_text(json.dumps(doc, indent=1))
    return path


def nat_rules(box: Sandbox) -> str:
    return box.run(["iptables", "-t", "nat", "-S"], timeout=10).stdout


def timed(label: str, t0: float) -> float:
    took = time.monotonic() - t0
    print(f"{label}: {took:.2f} s")
    return took


def test_podman_cni_backend_publishes_a_port(
    sandbox: Sandbox, workdir: Path, images: Images
) -> None:
    require(*BASE, "podman", "conmon")
    conf_dir = workdir / "net.d"
    write_conflist(conf_dir, reference_conflist("bbnet", "cni-bb0", "10.77.0.0/24"))
    host = outside_client(sandbox)
    t0 = time.monotonic()
    with Podman(sandbox, workdir / "podman", [REFERENCE], conf_dir) as podman:
        print(f"podman ready in {podman.started_in:.2f} s")
        podman.import_image(images.rootfs_tar, images.ref)
        t1 = time.monotonic()
        cid = podman.run("web", images.ref, HTTPD, publish=["8080:80"], network="bbnet")
        body = wait_http(sandbox, f"http://{host}:8080/", ns="client", expect=images.page)
        timed("podman run until the page came through port 8080", t1)
        assert body == images.page
        ip = podman.ip(cid, "bbnet")
        assert ip.startswith("10.77.0."), ip
        assert f"--to-destination {ip}:80" in nat_rules(sandbox)  # portmap's DNAT
        podman.rm(cid)
        assert f"--to-destination {ip}:80" not in nat_rules(sandbox)  # DEL ran
        with pytest.raises(Exception, match="wget"):
            http_get(sandbox, f"http://{host}:8080/", ns="client", timeout=1)
    timed("podman test", t0)
    assert not podman.stop_errors


def test_podman_netavark_backend_publishes_a_port(
    sandbox: Sandbox, workdir: Path, images: Images
) -> None:
    require(*BASE, "podman", "conmon", "/usr/lib/podman/netavark")
    host = outside_client(sandbox)
    with Podman(sandbox, workdir / "podman", backend="netavark") as podman:
        print(f"podman (netavark) ready in {podman.started_in:.2f} s")
        podman.import_image(images.rootfs_tar, images.ref)
        podman.network_create("navnet", "10.78.0.0/24")
        t1 = time.monotonic()
        cid = podman.run("web", images.ref, HTTPD, publish=["8081:80"], network="navnet")
        wait_http(sandbox, f"http://{host}:8081/", ns="client", expect=images.page)
        timed("podman (netavark) run until the page came through port 8081", t1)
        assert podman.ip(cid, "navnet").startswith("10.78.0.")
        assert "NETAVARK" in nat_rules(sandbox)
    assert not podman.stop_errors


def test_containerd_serves_through_a_port_and_ctr_cni(
    sandbox: Sandbox, workdir: Path, images: Images
) -> None:
    require(*BASE, "containerd", "ctr")
    conf_dir = workdir / "net.d"
    conflist = write_conflist(conf_dir, reference_conflist("ctdnet", "cni-ctd0", "10.79.0.0/24"))
    host = outside_client(sandbox)
    t0 = time.monotonic()
    with Containerd(sandbox, workdir / "containerd", REFERENCE, conf_dir) as ctd:
        print(f"containerd ready in {ctd.started_in:.2f} s")
        ctd.import_image(images.oci_tar)
        t1 = time.monotonic()
        ctd.run("web", images.ref, HTTPD, publish=["8082:80"], network=conflist)
        wait_http(sandbox, f"http://{host}:8082/", ns="client", expect=images.page)
        timed("containerd run (libcni ADD + ctr run) until the page came through 8082", t1)

        # ctr's own --cni: go-cni's ADD, no ports; reach it by its address
        ctd.run("plain", images.ref, HTTPD, cni=True)
        result = ctd.result("plain")
        assert result is not None, "go-cni left no cached result"
        ip = result["ips"][0]["address"].split("/")[0]
        wait_http(sandbox, f"http://{ip}/", ns="client", expect=images.page)
        lease = f"/var/lib/cni/networks/ctdnet/{ip}"
        assert sandbox.run(["test", "-e", lease], check=False).returncode == 0
        ctd.rm("plain")  # ctr never calls DEL; the harness did
        assert sandbox.run(["test", "-e", lease], check=False).returncode != 0
        ctd.rm("web")
        assert ":8082" not in nat_rules(sandbox) and "dport 8082" not in nat_rules(sandbox)
    timed("containerd test", t0)
    assert not ctd.stop_errors


def test_dockerd_publishes_a_port_with_its_own_chains(
    sandbox: Sandbox, workdir: Path, images: Images
) -> None:
    require(*BASE, "dockerd", "/usr/bin/docker")
    host = outside_client(sandbox)
    forwarding = sandbox.run(["sysctl", "-n", "net.ipv4.ip_forward"]).stdout.strip()
    t0 = time.monotonic()
    with Dockerd(sandbox, workdir / "docker", bridge_cidr="10.80.0.1/24") as docker:
        print(f"dockerd ready in {docker.started_in:.2f} s")
        docker.import_image(images.rootfs_tar, images.ref)
        t1 = time.monotonic()
        cid = docker.run("web", images.ref, HTTPD, publish=["8083:80"])
        wait_http(sandbox, f"http://{host}:8083/", ns="client", expect=images.page)
        timed("docker run until the page came through port 8083", t1)
        assert docker.ip(cid).startswith("10.80.0.")
        assert {"DOCKER", "DOCKER-USER", "DOCKER-ISOLATION-STAGE-1"} <= set(
            docker.iptables_chains()
        )
        assert "DOCKER" in docker.iptables_chains("nat")
        # dockerd turned forwarding on itself, so it set the FORWARD policy to DROP
        assert forwarding == "0"
        assert docker.forward_policy() == "DROP"
    timed("docker test", t0)
    assert not docker.stop_errors


def test_libcni_driver_with_reference_plugins(sandbox: Sandbox, workdir: Path) -> None:
    require(*BASE)
    t0 = time.monotonic()
    host = outside_client(sandbox)
    data = workdir / "ipam"
    net = NetworkConfigList.from_dict(
        reference_conflist("refnet", "cni-ref0", "10.81.0.0/24", str(data))
    )
    cni = CNIConfig([REFERENCE], workdir / "cache", SandboxExec(sandbox), timeout=10)
    assert "1.0.0" in cni.get_version_info("bridge")["supportedVersions"]
    assert cni.validate_network_list(net) == ["portMappings"]
    cni.get_status_network_list(net)  # 1.0.0: libcni sends no STATUS
    assert not any(e["command"] == "STATUS" for e in cni.log)

    # a plugin's error object comes back whole: the reference plugins refuse CNI_ARGS
    # they do not know unless IgnoreUnknown=1 is among them
    sandbox.run(["ip", "netns", "add", "c0"])
    with pytest.raises(CNIError) as refused:
        cni.add_network_list(net, RuntimeConf("c0", "/run/netns/c0", args=[("FOO", "1")]))
    assert (refused.value.plugin, refused.value.command) == ("bridge", "ADD")
    assert refused.value.code == 999 and "unknown args" in refused.value.msg
    assert "eth0" not in sandbox.run(["ip", "-n", "c0", "-br", "link"]).stdout

    sandbox.run(["ip", "netns", "add", "c1"])
    rt = RuntimeConf(
        "c1",
        "/run/netns/c1",
        "eth0",
        [("IgnoreUnknown", "1"), ("K8S_POD_NAME", "c1")],
        {
            "portMappings": [{"hostPort": 8090, "containerPort": 80, "protocol": "tcp"}],
            "bandwidth": {"x": 1},
        },
    )
    cni.log.clear()
    result = cni.add_network_list(net, rt)
    ip = result["ips"][0]["address"].split("/")[0]
    assert ip.startswith("10.81.0.")
    sent = [e["stdin"] for e in cni.log if e["command"] == "ADD"]
    assert "prevResult" not in sent[0] and "runtimeConfig" not in sent[0]
    assert sent[1]["prevResult"]["ips"] == result["ips"]
    assert sent[1]["runtimeConfig"] == {"portMappings": rt.capability_args["portMappings"]}
    assert cni.cached_result(net, rt) == result

    www = workdir / "www"
    www.mkdir()
    (www / "index.html").write_text("from c1\n")
    sandbox.popen(
        ["ip", "netns", "exec", "c1", "busybox", "httpd", "-f", "-p", "80", "-h", str(www)]
    )
    wait_http(sandbox, f"http://{host}:8090/", ns="client", expect="from c1")

    # CHECK: bridge (and host-local through it) pass; Debian's portmap 1.1.1 fails on an
    # IPv4-only attachment because it also looks for IPv6 rules (plugins issue #819)
    with pytest.raises(CNIError) as portmap_bug:
        cni.check_network_list(net, rt)
    assert portmap_bug.value.plugin == "portmap", portmap_bug.value
    assert "ipv6" in portmap_bug.value.msg, portmap_bug.value
    checks = [e for e in cni.log if e["command"] == "CHECK"]
    assert [e["plugin"] for e in checks] == ["bridge", "portmap"]
    assert all(e["stdin"]["prevResult"] == result for e in checks)
    bridge_only = NetworkConfigList(net.name, net.cni_version, net.plugins[:1], raw=net.raw)
    cni.check_network_list(bridge_only, rt)
    sandbox.run(["ip", "-n", "c1", "addr", "flush", "dev", "eth0"])
    with pytest.raises(CNIError) as failed:
        cni.check_network_list(bridge_only, rt)
    assert (failed.value.plugin, failed.value.command) == ("bridge", "CHECK"), failed.value

    cni.del_network_list(net, rt)
    dels = [e for e in cni.log if e["command"] == "DEL"]
    assert [e["plugin"] for e in dels] == ["portmap", "bridge"]
    assert all(e["stdin"]["prevResult"] == result for e in dels)
    assert cni.cached_result(net, rt) is None
    assert not (data / "refnet" / ip).exists()
    assert "dport 8090" not in nat_rules(sandbox)
    assert "eth0" not in sandbox.run(["ip", "-n", "c1", "-br", "link"]).stdout
    cni.del_network_list(net, rt)  # a second DEL succeeds

    # GC (1.0.0: only the stale cached attachments are DELeted)
    for name in ("g1", "g2"):
        sandbox.run(["ip", "netns", "add", name])
        cni.add_network_list(net, RuntimeConf(name, f"/run/netns/{name}"))
    leases = {p.name for p in (data / "refnet").iterdir() if p.name.startswith("10.")}
    assert len(leases) == 2
    cni.gc_network_list(net, [("g1", "eth0")])
    wait_for(
        "the stale lease to go",
        lambda: len([p for p in (data / "refnet").iterdir() if p.name.startswith("10.")]) == 1,
        timeout=5,
    )
    assert [a["containerId"] for a in cni.cached_attachments()] == ["g1"]
    cni.del_network_list(net, RuntimeConf("g1", "/run/netns/g1"))
    timed("libcni driver test", t0)
