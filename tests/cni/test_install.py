"""``netagent cni install`` (no root): the binary runs, the configurations are the ones
documented, a second install changes nothing, and another tool's file is left alone."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from netagent.cni.install import InstallError, install, parse_network
from tests.support.daemon import netagent_argv


def test_install_writes_a_binary_that_runs_and_a_conflist(tmp_path: Path) -> None:
    bins, confs = tmp_path / "bin", tmp_path / "net.d"
    r = subprocess.run(
        [
            *netagent_argv(),
            "cni",
            "install",
            "--bin-dir",
            str(bins),
            "--conf-dir",
            str(confs),
            "--network",
            "podnet=10.88.0.0/16",
            "--network",
            "second",
            "--socket",
            "/run/x/na.sock",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert f"{bins}/netagent: written" in r.stdout
    binary = bins / "netagent"
    assert binary.stat().st_mode & 0o777 == 0o755
    assert binary.read_text().splitlines()[0].endswith(" -IS")
    version = subprocess.run(
        [str(binary)],
        input=b'{"cniVersion": "1.0.0"}',
        env={"CNI_COMMAND": "VERSION"},
        capture_output=True,
        timeout=30,
    )
    assert json.loads(version.stdout)["supportedVersions"] == ["0.4.0", "1.0.0", "1.1.0"]
    doc = json.loads((confs / "10-podnet.conflist").read_text())
    assert doc == {
        "cniVersion": "1.0.0",
        "cniVersions": ["0.4.0", "1.0.0", "1.1.0"],
        "name": "podnet",
        "plugins": [
            {
                "type": "netagent",
                "bridge": "na-podnet",
                "subnet": "10.88.0.0/16",
                "gateway": "10.88.0.1",
                "ipMasq": True,
                "capabilities": {"portMappings": True, "ips": True, "mac": True},
                "socket": "/run/x/na.sock",
            }
        ],
    }
    second = json.loads((confs / "10-second.conflist").read_text())
    assert second["plugins"][0]["subnet"] == "10.85.1.0/24"
    # the same again changes nothing
    again = install(str(bins), str(confs), ["podnet=10.88.0.0/16", "second"], "/run/x/na.sock")
    assert all(line.endswith(": unchanged") for line in again), again


def test_another_tools_configuration_is_left_alone(tmp_path: Path) -> None:
    confs = tmp_path / "net.d"
    confs.mkdir()
    theirs = confs / "10-podnet.conflist"
    theirs.write_text('{"name": "podnet", "plugins": [{"type": "bridge"}]}')
    with pytest.raises(InstallError, match="is not netagent's"):
        install(str(tmp_path / "bin"), str(confs), ["podnet"])
    assert "bridge" in theirs.read_text()
    install(str(tmp_path / "bin"), str(confs), ["podnet"], force=True)
    assert '"netagent"' in theirs.read_text()


def test_network_names_and_subnets() -> None:
    assert parse_network("a-very-long-network-name", 0).bridge.startswith("na-")
    assert len(parse_network("a-very-long-network-name", 0).bridge) <= 15
    assert parse_network("v6=fd00:88::/64", 3).gateway == "fd00:88::1"
    for bad in ("bad name", "x=10.0.0.1/24", "x=10.0.0.0/31"):
        with pytest.raises(InstallError):
            parse_network(bad, 0)
