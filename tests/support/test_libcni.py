"""The libcni driver's protocol, against a recording plugin (no root needed).

The reference plugins Debian ships speak CNI up to 1.0.0, so STATUS and GC at 1.1.0
(and what exactly reaches a plugin on each call) are pinned here with a small plugin
that writes down its environment and stdin and answers as the spec says.
"""

from __future__ import annotations

import base64
import json
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.support.libcni import CNIConfig, CNIError, NetworkConfigList, RuntimeConf

PLUGIN = r"""#!{python}
import json, os, sys, time
name = os.path.basename(sys.argv[0])
conf = json.load(sys.stdin)
cmd = os.environ["CNI_COMMAND"]
env = {{k: v for k, v in os.environ.items() if k.startswith("CNI_")}}
with open(os.environ["REC_LOG"], "a") as log:
    log.write(json.dumps({{"plugin": name, "env": env, "stdin": conf}}) + "\n")
if conf.get("sleep_on") == cmd:
    time.sleep(30)
if conf.get("crash_on") == cmd:
    sys.stderr.write("boom\n")
    sys.exit(2)
if conf.get("fail_on") == cmd or (cmd == "STATUS" and conf.get("status_fail")):
    code = 50 if cmd == "STATUS" else 7
    print(json.dumps({{"cniVersion": conf["cniVersion"], "code": code,
                      "msg": "Invalid Configuration", "details": name + " says no"}}))
    sys.exit(1)
if cmd == "VERSION":
    print(json.dumps({{"cniVersion": conf["cniVersion"],
                      "supportedVersions": ["0.3.1", "0.4.0", "1.0.0", "1.1.0"]}}))
elif cmd == "ADD":
    result = conf.get("prevResult") or {{"cniVersion": conf["cniVersion"], "interfaces": []}}
    result["interfaces"] = result["interfaces"] + [{{"name": name}}]
    if conf.get("omit_version"):
        result.pop("cniVersion", None)
    print(json.dumps(result))
"""

MAPPINGS = [{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}]


@pytest.fixture
def plugins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("rec-a", "rec-b"):
        path = bin_dir / name
        path.write_text(PLUGIN.format(python=sys.executable))
        path.chmod(0o755)
    monkeypatch.setenv("REC_LOG", str(tmp_path / "calls.jsonl"))
    return tmp_path


def calls(root: Path) -> list[dict[str, Any]]:
    path = root / "calls.jsonl"
    if not path.exists():
        return []
    out = [json.loads(line) for line in path.read_text().splitlines()]
    path.unlink()
    return out


def netlist(version: str = "1.1.0", **extra: Any) -> NetworkConfigList:
    a: dict[str, Any] = {
        "type": "rec-a",
        "capabilities": {"portMappings": True, "mac": False},
        "keyA": [1, 2],
    }
    b: dict[str, Any] = {"type": "rec-b"}
    for key, value in extra.pop("a", {}).items():
        a[key] = value
    for key, value in extra.pop("b", {}).items():
        b[key] = value
    return NetworkConfigList.from_dict(
        {"cniVersion": version, "name": "recnet", "plugins": [a, b], **extra}
    )


def config(root: Path, timeout: float = 10) -> CNIConfig:
    return CNIConfig([str(root / "nowhere"), str(root / "bin")], root / "cache", timeout=timeout)


def runtime(cid: str = "c1") -> RuntimeConf:
    return RuntimeConf(
        cid,
        f"/run/netns/{cid}",
        "eth0",
        [("IgnoreUnknown", "1"), ("K8S_POD_NAME", cid)],
        {"portMappings": MAPPINGS, "mac": "00:11:22:33:44:55", "ips": ["10.0.0.9/24"]},
    )


def test_add_runs_in_order_chaining_prev_result_and_filtered_runtime_config(
    plugins: Path,
) -> None:
    cni, net, rt = config(plugins), netlist(), runtime()
    result = cni.add_network_list(net, rt)
    a, b = calls(plugins)
    assert (a["plugin"], b["plugin"]) == ("rec-a", "rec-b")
    assert a["env"] == {
        "CNI_COMMAND": "ADD",
        "CNI_CONTAINERID": "c1",
        "CNI_NETNS": "/run/netns/c1",
        "CNI_IFNAME": "eth0",
        "CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAME=c1",
        "CNI_PATH": f"{plugins / 'nowhere'}:{plugins / 'bin'}",
    }
    assert a["stdin"]["name"] == "recnet" and a["stdin"]["cniVersion"] == "1.1.0"
    assert "prevResult" not in a["stdin"]
    assert a["stdin"]["runtimeConfig"] == {"portMappings": MAPPINGS}  # mac is off, ips absent
    assert a["stdin"]["keyA"] == [1, 2] and "capabilities" in a["stdin"]  # as libcni
    assert b["stdin"]["prevResult"] == {"cniVersion": "1.1.0", "interfaces": [{"name": "rec-a"}]}
    assert "runtimeConfig" not in b["stdin"]
    assert result["interfaces"] == [{"name": "rec-a"}, {"name": "rec-b"}]
    cached = json.loads((plugins / "cache" / "results" / "recnet-c1-eth0").read_text())
    assert cached["kind"] == "cniCacheV1" and cached["result"] == result
    assert base64.b64decode(cached["config"]) == net.raw
    assert cached["cniArgs"] == [["IgnoreUnknown", "1"], ["K8S_POD_NAME", "c1"]]


def test_del_runs_in_reverse_with_the_cached_result_and_may_repeat(plugins: Path) -> None:
    cni, net, rt = config(plugins), netlist(), runtime()
    result = cni.add_network_list(net, rt)
    calls(plugins)
    cni.del_network_list(net, rt)
    first, second = calls(plugins)
    assert [first["plugin"], second["plugin"]] == ["rec-b", "rec-a"]
    assert first["env"]["CNI_COMMAND"] == "DEL"
    assert first["stdin"]["prevResult"] == result == second["stdin"]["prevResult"]
    assert second["stdin"]["runtimeConfig"] == {"portMappings": MAPPINGS}
    assert cni.cached_result(net, rt) is None
    cni.del_network_list(net, rt)  # again: no cache, so no prevResult
    assert all("prevResult" not in c["stdin"] for c in calls(plugins))


def test_check_passes_the_cached_result_unless_disabled(plugins: Path) -> None:
    cni, rt = config(plugins), runtime()
    result = cni.add_network_list(netlist(), rt)
    calls(plugins)
    cni.check_network_list(netlist(), rt)
    checks = calls(plugins)
    assert [c["plugin"] for c in checks] == ["rec-a", "rec-b"]
    assert all(c["stdin"]["prevResult"] == result for c in checks)
    assert all(c["env"]["CNI_COMMAND"] == "CHECK" for c in checks)
    cni.check_network_list(netlist(disableCheck=True), rt)
    assert calls(plugins) == []
    with pytest.raises(CNIError, match="does not support the CHECK command"):
        cni.check_network_list(netlist("0.3.1"), rt)


def test_version_selection_and_old_versions(plugins: Path) -> None:
    assert netlist("0.4.0", cniVersions=["0.3.1", "1.0.0", "1.1.0", "2.0.0"]).cni_version == (
        "1.1.0"
    )
    assert NetworkConfigList.from_dict({"name": "n", "type": "rec-a"}).plugins[0]["type"] == "rec-a"
    cni, rt = config(plugins), runtime()
    old = netlist("0.3.1")
    cni.add_network_list(old, rt)
    calls(plugins)
    cni.del_network_list(old, rt)  # before 0.4.0: DEL gets no prevResult
    assert all("prevResult" not in c["stdin"] for c in calls(plugins))
    result = cni.add_network_list(netlist(a={"omit_version": True}), rt)
    assert result["cniVersion"] == "1.1.0"  # libcni's fixupResultVersion


def test_status_at_1_1_0_stops_at_the_first_error(plugins: Path) -> None:
    cni = config(plugins)
    cni.get_status_network_list(netlist())
    a, b = calls(plugins)
    assert b["plugin"] == "rec-b"
    assert a["env"]["CNI_COMMAND"] == "STATUS" and a["env"]["CNI_CONTAINERID"] == ""
    assert "runtimeConfig" not in a["stdin"] and "prevResult" not in a["stdin"]
    with pytest.raises(CNIError) as failed:
        cni.get_status_network_list(netlist(a={"status_fail": True}))
    assert failed.value.code == 50 and failed.value.plugin == "rec-a"
    assert [c["plugin"] for c in calls(plugins)] == ["rec-a"]
    cni.get_status_network_list(netlist("1.0.0"))  # STATUS came with 1.1.0
    assert calls(plugins) == []


def test_gc_deletes_stale_cached_attachments_then_sends_gc(plugins: Path) -> None:
    cni, net = config(plugins), netlist()
    for cid in ("c1", "c2"):
        cni.add_network_list(net, runtime(cid))
    calls(plugins)
    cni.gc_network_list(net, [("c1", "eth0")])
    got = calls(plugins)
    assert [(c["plugin"], c["env"]["CNI_COMMAND"]) for c in got] == [
        ("rec-b", "DEL"),
        ("rec-a", "DEL"),
        ("rec-a", "GC"),
        ("rec-b", "GC"),
    ]
    assert got[0]["env"]["CNI_CONTAINERID"] == "c2"
    assert got[1]["stdin"]["runtimeConfig"] == {"portMappings": MAPPINGS}  # from the cache
    valid = [{"containerID": "c1", "ifname": "eth0"}]
    assert got[2]["stdin"]["cni.dev/valid-attachments"] == valid
    assert got[2]["stdin"]["cni.dev/attachments"] == valid
    assert [a["containerId"] for a in cni.cached_attachments()] == ["c1"]
    cni.gc_network_list(netlist("1.0.0"), [])  # 1.0.0: the stale DEL only, no GC
    assert [c["env"]["CNI_COMMAND"] for c in calls(plugins)] == ["DEL", "DEL"]
    cni.gc_network_list(netlist(disableGC=True), [])
    assert calls(plugins) == []


def test_gc_collects_every_error(plugins: Path) -> None:
    cni = config(plugins)
    with pytest.raises(CNIError) as failed:
        cni.gc_network_list(netlist(a={"fail_on": "GC"}, b={"fail_on": "GC"}), [])
    assert [e.plugin for e in failed.value.errors] == ["rec-a", "rec-b"]


def test_plugin_errors_come_back_whole(plugins: Path) -> None:
    cni, rt = config(plugins), runtime()
    with pytest.raises(CNIError) as failed:
        cni.add_network_list(netlist(b={"fail_on": "ADD"}), rt)
    e = failed.value
    assert (e.code, e.msg, e.details, e.plugin, e.command) == (
        7,
        "Invalid Configuration",
        "rec-b says no",
        "rec-b",
        "ADD",
    )
    with pytest.raises(CNIError) as crashed:
        cni.add_network_list(netlist(a={"crash_on": "ADD"}), rt)
    assert crashed.value.code is None and "boom" in crashed.value.msg
    with pytest.raises(CNIError, match=r"timed out after 0\.5 s"):
        config(plugins, timeout=0.5).add_network_list(netlist(a={"sleep_on": "ADD"}), rt)
    with pytest.raises(CNIError, match='failed to find plugin "nope"'):
        cni.add_network_list(NetworkConfigList.from_dict({"name": "n", "type": "nope"}), rt)
    with pytest.raises(CNIError, match="invalid characters"):
        cni.add_network_list(netlist(), runtime("-bad"))


def test_version_info_and_validation(plugins: Path) -> None:
    cni = config(plugins)
    assert "1.1.0" in cni.get_version_info("rec-a")["supportedVersions"]
    (call,) = calls(plugins)
    assert call["stdin"] == {"cniVersion": "1.1.0"}
    assert (call["env"]["CNI_NETNS"], call["env"]["CNI_PATH"]) == ("dummy", "dummy")
    assert cni.validate_network_list(netlist()) == ["portMappings"]
    with pytest.raises(CNIError, match="does not support config version"):
        cni.validate_network_list(netlist("0.2.0"))
