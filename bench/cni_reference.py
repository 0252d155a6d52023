"""netagent's CNI plugin beside what a container's network costs today.

Per container, sequentially, each in a fresh sandbox, one port mapping each:

- netagent's plugin binary (as ``netagent cni install`` writes it, started with
  ``python -I -S``) through libcni, with a daemon of its own in its sandbox: ADD, then
  later DEL, the plugin process included;

- Debian's reference plugins (``bridge`` + ``host-local`` + ``portmap``, 1.1.1) driven
  exactly as a runtime drives them through libcni (``tests/support/libcni.py``): ADD,
  then later DEL, every plugin process (and bridge's ``host-local`` delegate) included;
- netavark 1.4 (Podman's backend) as Podman calls it: ``netavark --config DIR setup
  NETNS`` / ``teardown`` with the network definition and port mapping on stdin, process
  start included. Podman allocates addresses itself before calling netavark, so the
  addresses are given (``static_ips``): netavark's figures have no IPAM in them.

The namespaces are made beforehand (``ip netns add``, not timed). ``cni_reference()``
prints lines in the style of ``bench/run.py`` and returns the p50/p99 figures;
``cni_scale()`` measures netagent's ADD with 10 and with 1,000 containers attached. Run
both alone with ``python bench/cni_reference.py [N]`` (``make bench SECTIONS=cni``).
Each kind's timing runs inside its sandbox (no ``nsenter`` is timed), in a worker asked
for one operation at a time.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from run import fmt, pct  # noqa: E402

from netagent.cli.client import Client  # noqa: E402
from netagent.cli.sandbox import Sandbox, daemon_argv, wait_ready  # noqa: E402
from netagent.cni.install import install as cni_install  # noqa: E402
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


def _netns(n: int, prefix: str = "b") -> list[str]:
    names = [f"{prefix}{i}" for i in range(n)]
    for name in names:
        subprocess.run(["ip", "netns", "add", name], check=True, timeout=10)
    return names


class Reference:
    """bridge + host-local + portmap through libcni, plugins run directly (we are inside)."""

    def __init__(self, n: int, work: Path) -> None:
        self.net = NetworkConfigList.from_dict(
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
        self.cni = CNIConfig([REFERENCE], work / "cache", local_exec, timeout=30)
        self.runtimes = [
            RuntimeConf(
                f"bench{i}",
                f"/run/netns/{ns}",
                "eth0",
                [("IgnoreUnknown", "1")],
                {
                    "portMappings": [
                        {"hostPort": BASE_PORT + i, "containerPort": 80, "protocol": "tcp"}
                    ]
                },
            )
            for i, ns in enumerate(_netns(n))
        ]

    def add(self, i: int) -> float:
        t0 = time.perf_counter()
        self.cni.add_network_list(self.net, self.runtimes[i])
        return _ms(t0)

    def delete(self, i: int) -> float:
        t0 = time.perf_counter()
        self.cni.del_network_list(self.net, self.runtimes[i])
        return _ms(t0)

    def exec(self) -> float:
        t0 = time.perf_counter()
        self.cni.get_version_info("portmap")
        return _ms(t0)


class Netavark:
    """netavark 1.4 as Podman runs it: network options on stdin, one process per call."""

    def __init__(self, n: int, work: Path) -> None:
        self.config = work / "netavark"
        self.config.mkdir()
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
        self.jobs = []
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
            self.jobs.append((f"/run/netns/{ns}", json.dumps(opts).encode()))

    def _netavark(self, *args: str, stdin: bytes = b"") -> float:
        t0 = time.perf_counter()
        subprocess.run(
            [NETAVARK, "--config", str(self.config), *args],
            input=stdin,
            check=True,
            capture_output=True,
            timeout=30,
        )
        return _ms(t0)

    def add(self, i: int) -> float:
        netns, stdin = self.jobs[i]
        return self._netavark("setup", netns, stdin=stdin)

    def delete(self, i: int) -> float:
        netns, stdin = self.jobs[i]
        return self._netavark("teardown", netns, stdin=stdin)

    def exec(self) -> float:
        return self._netavark("--version")


class Netagent:
    """netagent's plugin binary (as ``netagent cni install`` writes it) through libcni, a
    daemon of its own in this sandbox; the same one port mapping per container."""

    SUBNET = "10.92.0.0/16"

    def __init__(self, n: int, work: Path, prefix: str = "b") -> None:
        self.work = work
        self.socket = str(work / "netagent.sock")
        self.log = open(work / "daemon.log", "a")  # noqa: SIM115
        extra: list[str] = []
        if os.environ.get("BENCH_RESYNC"):  # to tell the periodic pass's share apart
            (work / "netagent.toml").write_text(f"resync_interval = {os.environ['BENCH_RESYNC']}\n")
            extra = ["--config", str(work / "netagent.toml")]
        self.proc = subprocess.Popen(
            daemon_argv(self.socket, str(work / "state"), *extra),
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        wait_ready(self.socket, self.proc)
        bin_dir = work / "bin"
        cni_install(str(bin_dir), str(work / "net.d"), ["unused"])
        plugin: dict[str, Any] = {
            "type": "netagent",
            "bridge": "cni-bench1",
            "subnet": self.SUBNET,
            "ipMasq": True,
            "socket": self.socket,
            "queueDir": str(work / "state" / "cni-queue"),
            "capabilities": {"portMappings": True},
        }
        self.plugin = plugin
        self.net = NetworkConfigList.from_dict(
            {"cniVersion": "1.0.0", "name": "bench", "plugins": [plugin]}
        )
        self.cni = CNIConfig([str(bin_dir)], work / "cache", local_exec, timeout=30)
        self.runtimes = [
            RuntimeConf(
                f"bench{i}",
                f"/run/netns/{ns}",
                "eth0",
                [("IgnoreUnknown", "1")],
                {
                    "portMappings": [
                        {"hostPort": BASE_PORT + i, "containerPort": 80, "protocol": "tcp"}
                    ]
                },
            )
            for i, ns in enumerate(_netns(n, prefix))
        ]
        self.filled = 0

    def add(self, i: int) -> float:
        t0 = time.perf_counter()
        self.cni.add_network_list(self.net, self.runtimes[i])
        return _ms(t0)

    def delete(self, i: int) -> float:
        t0 = time.perf_counter()
        self.cni.del_network_list(self.net, self.runtimes[i])
        return _ms(t0)

    def exec(self) -> float:
        t0 = time.perf_counter()
        self.cni.get_version_info("netagent")
        return _ms(t0)

    def fill(self, total: int) -> float:
        """Containers attached (straight over the socket, untimed) until ``total`` are,
        each with a port mapping of its own."""
        names = [f"f{j}" for j in range(self.filled, total)]
        if names:
            batch = "".join(f"netns add {name}\n" for name in names)
            subprocess.run(["ip", "-batch", "-"], input=batch.encode(), check=True, timeout=300)
        with Client(self.socket, timeout=60) as c:
            for j, name in zip(range(self.filled, total), names, strict=True):
                c.call(
                    "cni",
                    {
                        "command": "ADD",
                        "container_id": f"fill{j}",
                        "netns": f"/run/netns/{name}",
                        "ifname": "eth0",
                        "config": {
                            **self.plugin,
                            "name": "bench",
                            "cniVersion": "1.0.0",
                            "runtimeConfig": {
                                "portMappings": [
                                    {"hostPort": 40000 + j, "containerPort": 80, "protocol": "tcp"}
                                ]
                            },
                        },
                    },
                )
        self.filled = max(self.filled, total)
        return float(self.filled)

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


KINDS: dict[str, type[Reference] | type[Netavark] | type[Netagent]] = {
    "netagent": Netagent,
    "reference": Reference,
    "netavark": Netavark,
}


def _worker(kind: str, n: int) -> None:
    """Inside a sandbox: set up, say ready, then time one operation per line asked."""
    with tempfile.TemporaryDirectory(prefix="netagent-cniref-") as d:
        w = KINDS[kind](n, Path(d))
        try:
            print("ready", flush=True)
            for line in sys.stdin:
                op, *args = line.split()
                if op == "add":
                    ms = w.add(int(args[0]))
                elif op == "del":
                    ms = w.delete(int(args[0]))
                elif op == "exec":
                    ms = w.exec()
                elif op == "fill" and isinstance(w, Netagent):
                    ms = w.fill(int(args[0]))
                else:
                    break
                print(ms, flush=True)
        finally:
            if isinstance(w, Netagent):
                w.close()


def _answer(proc: subprocess.Popen[str], timeout: float = 60) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    line = proc.stdout.readline() if ready else ""
    if not line:
        raise RuntimeError(f"the benchmark worker gave no answer (exit {proc.poll()})")
    return line.strip()


def cni_reference(n: int = 50) -> dict[str, float]:
    """Each kind in its own fresh sandbox, asked in turn, one operation at a time (the
    order reversed every round), so the machine's noise falls on all alike; prints the
    figures and returns p50/p99 in ms."""
    print(
        f"\n== CNI reference: per container, sequentially, n={n}, one port mapping each "
        "(plugin processes included; the three asked in turn)"
    )
    boxes: dict[str, Sandbox] = {}
    procs: dict[str, subprocess.Popen[str]] = {}
    out: dict[str, list[float]] = {f"{k}_{op}": [] for k in KINDS for op in ("add", "del", "exec")}
    try:
        for kind in KINDS:
            boxes[kind] = Sandbox()
            procs[kind] = boxes[kind].popen(
                [sys.executable, __file__, "--worker", kind, str(n)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            if _answer(procs[kind]) != "ready":
                raise RuntimeError(f"the {kind} worker did not start")
        for op, arg in (
            [("add", i) for i in range(n)]
            + [("del", i) for i in range(n)]
            + [("exec", i) for i in range(n)]
        ):
            order = list(KINDS) if arg % 2 == 0 else list(reversed(KINDS))
            for kind in order:
                proc = procs[kind]
                assert proc.stdin is not None
                proc.stdin.write(f"{op} {arg}\n" if op != "exec" else "exec\n")
                proc.stdin.flush()
                out[f"{kind}_{op}"].append(float(_answer(proc)))
    finally:
        for kind, proc in procs.items():
            if proc.stdin is not None:
                proc.stdin.close()  # the worker ends its loop and removes its directory
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(30)
            boxes[kind].stop(proc)
        for box in boxes.values():
            box.close()
    print(f"netagent plugin ADD                      {fmt(out['netagent_add'])}")
    print(f"reference bridge+host-local+portmap ADD  {fmt(out['reference_add'])}")
    print(f"netavark 1.4 setup (static IP)           {fmt(out['netavark_add'])}")
    print(f"netagent plugin DEL                      {fmt(out['netagent_del'])}")
    print(f"reference bridge+host-local+portmap DEL  {fmt(out['reference_del'])}")
    print(f"netavark 1.4 teardown                    {fmt(out['netavark_del'])}")
    print(f"one netagent plugin process (VERSION)    {fmt(out['netagent_exec'])}")
    print(f"one plugin process (portmap VERSION)     {fmt(out['reference_exec'])}")
    print(f"one netavark process (--version)         {fmt(out['netavark_exec'])}")
    for op, label in (("add", "ADD"), ("del", "DEL")):
        ours = pct(out[f"netagent_{op}"], 0.5)
        print(
            f"netagent / reference, p50 {label}: {ours / pct(out[f'reference_{op}'], 0.5):.2f}x"
            f"   (netagent / netavark {ours / pct(out[f'netavark_{op}'], 0.5):.2f}x)"
            "   target <= 0.5x"
        )
    for op, label in (("add", "ADD / setup"), ("del", "DEL / teardown")):
        ratio = pct(out[f"reference_{op}"], 0.5) / pct(out[f"netavark_{op}"], 0.5)
        print(f"reference / netavark, p50 {label}: {ratio:.2f}x")
    results: dict[str, float] = {}
    for key, values in out.items():
        results[f"{key}_p50_ms"] = pct(values, 0.5)
        results[f"{key}_p99_ms"] = pct(values, 0.99)
    return results


def _ask(proc: subprocess.Popen[str], line: str, timeout: float = 60) -> float:
    assert proc.stdin is not None
    proc.stdin.write(line + "\n")
    proc.stdin.flush()
    return float(_answer(proc, timeout))


def cni_scale(rounds: int = 60, few: int = 10, many: int = 1000) -> dict[str, float]:
    """netagent's ADD (the plugin binary, a port mapping) with ``few`` containers
    attached and with ``many``, side by side: a daemon of each in a sandbox of its own,
    asked in turn (the order reversed every round). Each measured ADD is undone
    (untimed) before the next, so the counts stay; the others are attached straight
    over the socket beforehand."""
    print(
        f"\n== CNI at scale: netagent plugin ADD with {few} and with {many:,} containers "
        "attached (two daemons, asked in turn)"
    )
    boxes: dict[int, Sandbox] = {}
    procs: dict[int, subprocess.Popen[str]] = {}
    out: dict[int, list[float]] = {few: [], many: []}
    try:
        for count in (few, many):
            boxes[count] = Sandbox()
            procs[count] = boxes[count].popen(
                [sys.executable, __file__, "--worker", "netagent", str(rounds)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            if _answer(procs[count]) != "ready":
                raise RuntimeError("the netagent worker did not start")
            t0 = time.perf_counter()
            _ask(procs[count], f"fill {count}", timeout=900)
            print(f"{count:,} containers attached ({time.perf_counter() - t0:.1f} s, untimed)")
        for i in range(rounds):
            for count in (few, many) if i % 2 == 0 else (many, few):
                out[count].append(_ask(procs[count], f"add {i}"))
                _ask(procs[count], f"del {i}")
    finally:
        for count, proc in procs.items():
            if proc.stdin is not None:
                proc.stdin.close()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(60)
            boxes[count].stop(proc)
        for box in boxes.values():
            box.close()
    print(f"netagent plugin ADD, {few:>5,} attached  {fmt(out[few])}")
    print(f"netagent plugin ADD, {many:>5,} attached  {fmt(out[many])}")
    ratio = pct(out[many], 0.5) / pct(out[few], 0.5)
    print(f"ADD with {many:,} attached / with {few}, p50: {ratio:.2f}x   target <= 1.2x")
    return {
        "add_few_p50_ms": pct(out[few], 0.5),
        "add_many_p50_ms": pct(out[many], 0.5),
        "ratio": ratio,
    }


def main(argv: list[str]) -> None:
    if argv[:1] == ["--worker"]:
        _worker(argv[1], int(argv[2]))
        return
    cni_reference(int(argv[0]) if argv else 50)
    cni_scale()


if __name__ == "__main__":
    main(sys.argv[1:])
