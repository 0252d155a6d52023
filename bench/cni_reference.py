"""Reference figures for netagent's CNI plugin: what a container's network costs today.

Per container, sequentially, each in a fresh sandbox, one port mapping each:

- Debian's reference plugins (``bridge`` + ``host-local`` + ``portmap``, 1.1.1) driven
  exactly as a runtime drives them through libcni (``tests/support/libcni.py``): ADD,
  then later DEL, every plugin process (and bridge's ``host-local`` delegate) included;
- netavark 1.4 (Podman's backend) as Podman calls it: ``netavark --config DIR setup
  NETNS`` / ``teardown`` with the network definition and port mapping on stdin, process
  start included. Podman allocates addresses itself before calling netavark, so the
  addresses are given (``static_ips``): netavark's figures have no IPAM in them.

The namespaces are made beforehand (``ip netns add``, not timed). ``cni_reference()``
prints lines in the style of ``bench/run.py`` and returns the p50/p99 figures; run it
alone with ``python bench/cni_reference.py [N]``. The timing loop runs inside the
sandbox (so no ``nsenter`` is timed).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from run import fmt, pct  # noqa: E402

from netagent.cli.sandbox import Sandbox  # noqa: E402
from tests.support.libcni import (  # noqa: E402
    CNIConfig,
    NetworkConfigList,
    RuntimeConf,
    local_exec,
)

REFERENCE = "/usr/lib/cni"
NETAVARK = "/usr/lib/podman/netavark"
BASE_PORT = 20000


def _ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1000


def _netns(n: int) -> list[str]:
    names = [f"b{i}" for i in range(n)]
    for name in names:
        subprocess.run(["ip", "netns", "add", name], check=True, timeout=10)
    return names


def inside_reference(n: int, work: Path) -> dict[str, list[float]]:
    net = NetworkConfigList.from_dict(
        {
            "cniVersion": "1.0.0",
            "name": "bench",
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": "cni-bench0",
                    "isGateway": True,
                    "ipMasq": True,
                    "hairpinMode": True,
                    "ipam": {
                        "type": "host-local",
                        "dataDir": str(work / "ipam"),
                        "ranges": [[{"subnet": "10.90.0.0/16", "gateway": "10.90.0.1"}]],
                        "routes": [{"dst": "0.0.0.0/0"}],
                    },
                },
                {"type": "portmap", "capabilities": {"portMappings": True}},
            ],
        }
    )
    cni = CNIConfig([REFERENCE], work / "cache", local_exec, timeout=30)
    runtimes = [
        RuntimeConf(
            f"bench{i}",
            f"/run/netns/{ns}",
            "eth0",
            [("IgnoreUnknown", "1")],
            {"portMappings": [{"hostPort": BASE_PORT + i, "containerPort": 80, "protocol": "tcp"}]},
        )
        for i, ns in enumerate(_netns(n))
    ]
    adds, dels, version = [], [], []
    for rt in runtimes:
        t0 = time.perf_counter()
        cni.add_network_list(net, rt)
        adds.append(_ms(t0))
    for rt in runtimes:
        t0 = time.perf_counter()
        cni.del_network_list(net, rt)
        dels.append(_ms(t0))
    for _ in range(n):
        t0 = time.perf_counter()
        cni.get_version_info("portmap")
        version.append(_ms(t0))
    return {"add": adds, "del": dels, "exec": version}


def inside_netavark(n: int, work: Path) -> dict[str, list[float]]:
    config = work / "netavark"
    config.mkdir()
    info = {
        "bench": {
            "name": "bench",
            "id": "ab" * 32,
            "driver": "bridge",
            "network_interface": "nv-bench0",
            "subnets": [{"subnet": "10.91.0.0/16", "gateway": "10.91.0.1"}],
            "ipv6_enabled": False,
            "internal": False,
            "dns_enabled": False,
            "ipam_options": {"driver": "host-local"},
        }
    }
    jobs = []
    for i, ns in enumerate(_netns(n)):
        opts = {
            "container_id": f"{i:064x}",
            "container_name": f"bench{i}",
            "port_mappings": [
                {
                    "host_ip": "",
                    "container_port": 80,
                    "host_port": BASE_PORT + i,
                    "range": 1,
                    "protocol": "tcp",
                }
            ],
            "networks": {
                "bench": {
                    "static_ips": [f"10.91.{i // 250}.{i % 250 + 2}"],
                    "interface_name": "eth0",
                }
            },
            "network_info": info,
        }
        jobs.append((f"/run/netns/{ns}", json.dumps(opts).encode()))

    def netavark(command: str, netns: str, stdin: bytes) -> float:
        t0 = time.perf_counter()
        subprocess.run(
            [NETAVARK, "--config", str(config), command, netns],
            input=stdin,
            check=True,
            capture_output=True,
            timeout=30,
        )
        return _ms(t0)

    setups = [netavark("setup", netns, stdin) for netns, stdin in jobs]
    teardowns = [netavark("teardown", netns, stdin) for netns, stdin in jobs]
    return {"add": setups, "del": teardowns}


def _inside(kind: str, n: int) -> None:
    with tempfile.TemporaryDirectory(prefix="netagent-cniref-") as d:
        fn = inside_reference if kind == "reference" else inside_netavark
        print(json.dumps(fn(n, Path(d))))


def cni_reference(n: int = 50) -> dict[str, float]:
    """Measure both in fresh sandboxes, print the figures, return p50/p99 in ms."""
    print(
        f"\n== CNI reference: per container, sequentially, n={n}, one port mapping each "
        "(plugin processes included)"
    )
    out: dict[str, list[float]] = {}
    for kind in ("reference", "netavark"):
        with Sandbox() as box:
            r = box.run([sys.executable, __file__, "--inside", kind, str(n)], timeout=600)
        got = json.loads(r.stdout.strip().splitlines()[-1])
        for key, values in got.items():
            out[f"{kind}_{key}"] = values
    print(f"reference bridge+host-local+portmap ADD  {fmt(out['reference_add'])}")
    print(f"reference bridge+host-local+portmap DEL  {fmt(out['reference_del'])}")
    print(f"netavark 1.4 setup (static IP)           {fmt(out['netavark_add'])}")
    print(f"netavark 1.4 teardown                    {fmt(out['netavark_del'])}")
    print(f"one plugin process (portmap VERSION)     {fmt(out['reference_exec'])}")
    results: dict[str, float] = {}
    for key, values in out.items():
        results[f"{key}_p50_ms"] = pct(values, 0.5)
        results[f"{key}_p99_ms"] = pct(values, 0.99)
    return results


def main(argv: list[str]) -> None:
    if argv[:1] == ["--inside"]:
        _inside(argv[1], int(argv[2]))
        return
    cni_reference(int(argv[0]) if argv else 50)


if __name__ == "__main__":
    main(sys.argv[1:])
