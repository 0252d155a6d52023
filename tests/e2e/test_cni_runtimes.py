"""Container runtimes that others wrote drive netagent through its CNI plugin, in a
sandbox: Podman 4.3 with its CNI backend and containerd 1.6 (``ctr run --cni``, and the
CRI-like path for published ports), each with a conflist naming netagent. The page a
busybox container serves is fetched by the ``client`` namespace (the outside world)
through the host's published port; removing the container frees its lease and its
forward; a restarted daemon keeps running containers reachable."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from netagent.cni.install import install as cni_install
from tests.support import cniplugin as P
from tests.support.daemon import Daemon
from tests.support.images import Images, remove_session_images, session_images
from tests.support.runtimes import HTTPD, Containerd, Podman, http_get, outside_client, wait_http
from tests.support.wait import wait_for

pytestmark = pytest.mark.e2e
TOOLS = {
    "podman": "podman",
    "conmon": "conmon",
    "crun": "crun",
    "containerd": "containerd",
    "ctr": "containerd",
    "/bin/busybox": "busybox-static",
}


def require(*tools: str) -> None:
    missing = sorted({TOOLS[t] for t in tools if not (os.access(t, os.X_OK) or shutil.which(t))})
    if missing:
        why = "apt-get install --no-install-recommends " + " ".join(missing)
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true but runtime packages are missing: {why}")
        pytest.skip(why)


@pytest.fixture(scope="module")
def images() -> Iterator[Images]:
    require("/bin/busybox")
    yield session_images()
    remove_session_images()


def conflist(d: Daemon, conf_dir: Path, name: str, subnet: str) -> Path:
    """The network as ``netagent cni install`` writes it (cniVersion 1.0.0, the highest
    libcni 1.1 in Podman 4.3 and containerd 1.6 reads results of; ``cniVersions`` up to
    1.1.0), naming the test daemon's socket and queue."""
    cni_install(
        str(d.dir / "cni-bin"), str(conf_dir), [f"{name}={subnet}"], d.socket, str(P.queue_dir(d))
    )
    path = conf_dir / f"10-{name}.conflist"
    assert json.loads(path.read_text())["cniVersions"] == ["0.4.0", "1.0.0", "1.1.0"]
    return path


def attachments(d: Daemon) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = d.ctl_json("attachments")
    return rows


def forwards(d: Daemon) -> dict[str, str | None]:
    return {r["key"]: r.get("owner") for r in d.ctl_json("forwards")}


def test_podman_with_its_cni_backend(daemon: Daemon, workdir: Path, images: Images) -> None:
    require("podman", "conmon", "crun")
    box = daemon.box
    bin_dir = P.install(daemon)
    conf_dir = workdir / "podman-net.d"
    conflist(daemon, conf_dir, "nanet", "10.88.0.0/16")
    host = outside_client(box)
    with Podman(box, workdir / "podman", [str(bin_dir)], conf_dir) as podman:
        podman.import_image(images.rootfs_tar, images.ref)
        t0 = time.monotonic()
        cid = podman.run("web", images.ref, HTTPD, publish=["8080:80"], network="nanet")
        wait_http(box, f"http://{host}:8080/", ns="client", expect=images.page)
        print(f"podman run until the page came through 8080: {time.monotonic() - t0:.2f} s")
        assert podman.ip(cid, "nanet") == "10.88.0.2"
        [att] = attachments(daemon)
        assert (att["container_id"], att["ifname"], att["network"]) == (cid, "eth0", "nanet")
        assert att["netns"].startswith("/run/netns/")
        assert forwards(daemon) == {"fwd/tcp/8080": f"att/{cid}/eth0"}
        show = daemon.ok("show")
        assert f"container {cid} in {att['netns']} (network nanet)" in show

        # a second container, and a restarted daemon: both stay reachable
        other = podman.run("web2", images.ref, HTTPD, publish=["8081:80"], network="nanet")
        assert podman.ip(other, "nanet") == "10.88.0.3"
        daemon.restart()
        for port in (8080, 8081):
            assert http_get(box, f"http://{host}:{port}/", ns="client") == images.page
        assert all(i["in_place"] for i in daemon.ctl_json("show")["intents"])

        podman.rm(cid)  # teardown: CNI DEL
        assert [a["container_id"] for a in attachments(daemon)] == [other]
        assert "fwd/tcp/8080" not in forwards(daemon)
        with pytest.raises(Exception, match="wget"):
            http_get(box, f"http://{host}:8080/", ns="client", timeout=1)
        third = podman.run("web3", images.ref, HTTPD, network="nanet")
        assert podman.ip(third, "nanet") == "10.88.0.2"  # the freed lease
        podman.rm(third)
        # podman run --ip/--mac-address: Podman 4.3 passes them in CNI_ARGS (IP=, MAC=)
        static = podman.run(
            "static",
            images.ref,
            HTTPD,
            network="nanet",
            extra=["--ip", "10.88.0.50", "--mac-address", "02:aa:bb:cc:dd:ee"],
        )
        assert podman.ip(static, "nanet") == "10.88.0.50"
        row = next(a for a in attachments(daemon) if a["container_id"] == static)
        assert row["mac"] == "02:aa:bb:cc:dd:ee"
        podman.rm(static)
        podman.rm(other)
        assert attachments(daemon) == [] and forwards(daemon) == {}
    assert not podman.stop_errors


def test_containerd_ctr_cni_and_published_ports(
    daemon: Daemon, workdir: Path, images: Images
) -> None:
    require("containerd", "ctr", "crun")
    box = daemon.box
    bin_dir = P.install(daemon)
    conf_dir = workdir / "ctd-net.d"
    path = conflist(daemon, conf_dir, "ctdnet", "10.79.0.0/24")
    host = outside_client(box)
    with Containerd(box, workdir / "containerd", str(bin_dir), conf_dir) as ctd:
        ctd.import_image(images.oci_tar)
        # ctr's own --cni (go-cni, no ports): reached by its address
        ctd.run("plain", images.ref, HTTPD, cni=True)
        result = ctd.result("plain")
        assert result is not None
        ip = result["ips"][0]["address"].split("/")[0]
        assert ip == "10.79.0.2"
        wait_http(box, f"http://{ip}/", ns="client", expect=images.page)
        [att] = attachments(daemon)
        assert att["container_id"] == "default-plain"
        # the CRI-like path: a netns of its own, ADD with portMappings, ctr run --with-ns
        t0 = time.monotonic()
        ctd.run("web", images.ref, HTTPD, publish=["8082:80"], network=path)
        wait_http(box, f"http://{host}:8082/", ns="client", expect=images.page)
        print(
            f"libcni ADD + ctr run until the page came through 8082: {time.monotonic() - t0:.2f} s"
        )
        assert forwards(daemon) == {"fwd/tcp/8082": "att/web/eth0"}
        daemon.restart()
        assert http_get(box, f"http://{host}:8082/", ns="client") == images.page
        ctd.rm("plain")  # the harness's DEL (ctr never calls it)
        ctd.rm("web")
        wait_for("the attachments to go", lambda: attachments(daemon) == [])
        assert forwards(daemon) == {}
    assert not ctd.stop_errors
    assert json.loads(path.read_text())["plugins"][0]["type"] == "netagent"
