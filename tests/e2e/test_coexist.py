"""netagent beside other tools that filter and NAT, with the real tools in a sandbox.

Docker 20.10 (Debian's docker.io) started with forwarding off turns it on and sets the
iptables FORWARD policy to DROP; with br_netfilter (built in here) that drop hits even
frames between two ports of one bridge. netagent adds its accepts in chains it owns
(``NETAGENT-FORWARD``, jumped to first from FORWARD), so both Docker's published port
and netagent's forwards and bridges work; netagent's purge leaves Docker's rules as they
were. The same beside Podman's own netavark network.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from netagent.cli.sandbox import Sandbox
from tests.support.daemon import Daemon
from tests.support.images import Images, remove_session_images, session_images
from tests.support.net import http_get, ping, serve_http
from tests.support.runtimes import HTTPD, Dockerd, Podman, wait_http
from tests.support.topology import BACKENDS, CLIENT_HOST, add_client, build_seed
from tests.support.wait import wait_for

pytestmark = pytest.mark.e2e


def require(*tools: str) -> None:
    missing = [t for t in tools if not (os.access(t, os.X_OK) or shutil.which(t))]
    if missing:
        why = f"missing {', '.join(missing)} (scripts/setup.sh --test installs them)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true but {why}")
        pytest.skip(why)


@pytest.fixture(scope="module")
def images() -> Iterator[Images]:
    require("/bin/busybox")
    yield session_images()
    remove_session_images()


def foreign_rules(box: Sandbox) -> list[str]:
    """Every iptables rule and policy that is not netagent's, filter and nat."""
    out = []
    for table in ("filter", "nat"):
        text = box.run(["iptables-save", "-t", table], timeout=10).stdout
        out += [
            f"{table}: {line.split(' [')[0]}"
            for line in text.splitlines()
            if line.startswith(("-A", ":")) and "NETAGENT" not in line and "netagent" not in line
        ]
    return out


def netagents_filter(box: Sandbox) -> list[str]:
    text = box.run(["iptables-save", "-t", "filter"], timeout=10).stdout
    return [line for line in text.splitlines() if "NETAGENT" in line]


def netagent_traffic_works(d: Daemon) -> bool:
    return (
        http_get(d, "client", f"http://{CLIENT_HOST}:80/") == "netagent's"
        and ping(d, "red", "192.168.15.2")  # two ports of one bridge
    )


@pytest.mark.parametrize("firewall", BACKENDS)
def test_docker_and_netagent_both_work_and_purge_leaves_dockers_rules(
    sandbox: Sandbox, workdir: Path, images: Images, firewall: str
) -> None:
    require("dockerd", "/usr/bin/docker", "crun")
    with Dockerd(sandbox, workdir / "docker", bridge_cidr="10.80.0.1/24") as docker:
        assert docker.forward_policy() == "DROP"
        docker.import_image(images.rootfs_tar, images.ref)
        docker.run("web", images.ref, HTTPD, publish=["8083:80"])
        d = Daemon(sandbox, workdir, firewall=firewall)
        d.start()
        try:
            add_client(d)
            wait_http(sandbox, f"http://{CLIENT_HOST}:8083/", ns="client", expect=images.page)
            dockers = foreign_rules(sandbox)
            build_seed(d)
            serve_http(d, "blue", "192.168.15.2", 80, "netagent's")
            assert netagent_traffic_works(d)
            assert '-A FORWARD -m comment --comment "netagent:jump" -j NETAGENT-FORWARD' in (
                netagents_filter(sandbox)
            )
            wait_http(sandbox, f"http://{CLIENT_HOST}:8083/", ns="client", expect=images.page)
            assert docker.forward_policy() == "DROP"  # left as Docker set it
            assert foreign_rules(sandbox) == dockers
            # someone (a Docker restart, say) deletes our jump: put back on the event
            sandbox.run(["iptables", "-D", "FORWARD", "-m", "comment", "--comment",
                         "netagent:jump", "-j", "NETAGENT-FORWARD"])  # fmt: skip
            wait_for("netagent's traffic through Docker's DROP again",
                     lambda: netagent_traffic_works(d), timeout=10)  # fmt: skip
            d.ctl("purge", "--yes", check=True)
            assert netagents_filter(sandbox) == []
            assert foreign_rules(sandbox) == dockers
            wait_http(sandbox, f"http://{CLIENT_HOST}:8083/", ns="client", expect=images.page)
        finally:
            d.stop()
    assert not docker.stop_errors


def test_netagent_started_first_follows_docker_when_it_starts(
    sandbox: Sandbox, workdir: Path, images: Images
) -> None:
    """Docker's filter table appears after netagent's bridges: the watcher sees it and
    netagent's accepts follow, without a periodic pass (an hour away here)."""
    require("dockerd", "/usr/bin/docker", "crun")
    (workdir / "netagent.toml").write_text("resync_interval = 3600\n")
    d = Daemon(sandbox, workdir, extra=["--config", str(workdir / "netagent.toml")])
    d.start()
    try:
        build_seed(d)
        add_client(d)
        serve_http(d, "blue", "192.168.15.2", 80, "netagent's")
        assert netagent_traffic_works(d)
        assert netagents_filter(sandbox) == []  # nobody filters: no chains made
        sandbox.run(["sysctl", "-qw", "net.ipv4.ip_forward=0"])  # so that Docker drops
        with Dockerd(sandbox, workdir / "docker", bridge_cidr="10.80.0.1/24") as docker:
            wait_for("Docker's FORWARD policy DROP", lambda: docker.forward_policy() == "DROP")
            sandbox.run(["sysctl", "-qw", "net.ipv4.ip_forward=1"])
            wait_for("netagent's traffic through Docker's DROP",
                     lambda: netagent_traffic_works(d), timeout=10)  # fmt: skip
            assert netagents_filter(sandbox)
    finally:
        d.stop()


def test_podman_netavark_network_and_netagent_both_work(
    sandbox: Sandbox, workdir: Path, images: Images
) -> None:
    require("podman", "conmon", "crun", "/usr/lib/podman/netavark")
    add_host = CLIENT_HOST
    with Podman(sandbox, workdir / "podman", backend="netavark") as podman:
        podman.import_image(images.rootfs_tar, images.ref)
        podman.network_create("navnet", "10.78.0.0/24")
        podman.run("web", images.ref, HTTPD, publish=["8081:80"], network="navnet")
        d = Daemon(sandbox, workdir)
        d.start()
        try:
            add_client(d)
            wait_http(sandbox, f"http://{add_host}:8081/", ns="client", expect=images.page)
            theirs = foreign_rules(sandbox)
            build_seed(d)
            serve_http(d, "blue", "192.168.15.2", 80, "netagent's")
            assert netagent_traffic_works(d)
            wait_http(sandbox, f"http://{add_host}:8081/", ns="client", expect=images.page)
            d.ctl("purge", "--yes", check=True)
            assert foreign_rules(sandbox) == theirs
            wait_http(sandbox, f"http://{add_host}:8081/", ns="client", expect=images.page)
        finally:
            d.stop()
    assert not podman.stop_errors


@pytest.mark.parametrize("daemon", BACKENDS, indirect=True)
def test_drops_in_iptables_nft_and_legacy_at_once_are_worked_around(daemon: Daemon) -> None:
    """FORWARD policies of DROP in both iptables frameworks (legacy rules beside nft
    ones): netagent's accepts are in each, and a purge takes them out of each, leaving
    the policies and the user's own legacy rule."""
    daemon.sh("iptables-legacy", "-P", "FORWARD", "DROP")  # makes the legacy filter table
    daemon.sh("iptables-legacy", "-A", "FORWARD", "-s", "10.9.9.0/24", "-j", "ACCEPT")
    daemon.sh("iptables", "-P", "FORWARD", "DROP")
    legacy_before = daemon.sh("iptables-legacy-save", "-t", "filter").stdout.splitlines()
    build_seed(daemon)
    add_client(daemon)
    serve_http(daemon, "blue", "192.168.15.2", 80, "netagent's")
    wait_for("traffic through both DROPs", lambda: netagent_traffic_works(daemon), timeout=10)
    legacy = daemon.sh("iptables-legacy-save", "-t", "filter").stdout
    assert '-A FORWARD -m comment --comment "netagent:jump" -j NETAGENT-FORWARD' in legacy
    daemon.ctl("purge", "--yes", check=True)
    after = daemon.sh("iptables-legacy-save", "-t", "filter").stdout.splitlines()

    def rules(lines: list[str]) -> list[str]:  # without the comments and counters
        return [x.split(" [")[0] for x in lines if not x.startswith("#")]

    assert rules(after) == rules(legacy_before)
    assert "NETAGENT" not in daemon.sh("iptables-save", "-t", "filter").stdout


def test_a_users_netagent_named_chains_survive_start_and_purge(
    sandbox: Sandbox, workdir: Path
) -> None:
    """Issue 9, item 5, through the daemon: starting with --firewall iptables keeps a
    user's NETAGENT-MINE and its rule, and a NETAGENT-FOO their own rule jumps to; the
    forwards install; the purge succeeds and leaves both."""

    def nat(*args: str) -> None:
        sandbox.run(["iptables", "-t", "nat", *args])

    nat("-N", "NETAGENT-MINE")
    nat("-A", "NETAGENT-MINE", "-p", "tcp", "--dport", "22", "-j", "RETURN")
    nat("-N", "NETAGENT-FOO")
    nat("-A", "PREROUTING", "-p", "udp", "-j", "NETAGENT-FOO")

    def theirs() -> list[str]:
        text = sandbox.run(["iptables-save", "-t", "nat"]).stdout
        return [x for x in text.splitlines() if "MINE" in x or "FOO" in x]

    before = theirs()
    d = Daemon(sandbox, workdir, firewall="iptables")
    d.start()
    try:
        build_seed(d)
        add_client(d)
        serve_http(d, "blue", "192.168.15.2", 80, "up")
        assert http_get(d, "client", f"http://{CLIENT_HOST}:80/") == "up"
        assert theirs() == before
        d.ctl("purge", "--yes", check=True)
        assert theirs() == before
    finally:
        d.stop()
