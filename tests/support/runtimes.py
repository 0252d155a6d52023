"""Real container runtimes inside a sandbox: Podman 4.3, containerd 1.6, Docker 20.10.

Each class starts its runtime inside a :class:`netagent.cli.sandbox.Sandbox` (every
command goes through ``box.run``/``box.popen``, which ``nsenter`` into it), with its state
in a tmpfs of its own (``/run/netagent-<kind>-<tag>``) inside the sandbox's private
``/run`` (see :mod:`tests.support.private`), and stops it by PID, helpers and container
processes included, also when starting failed half way. What each needs here, and why,
is in docs/runtimes.md.

Use as context managers::

    with Podman(box, workdir, ["/usr/lib/cni"], conf_dir) as podman:
        podman.import_image(images.rootfs_tar, images.ref)
        cid = podman.run("web", images.ref, HTTPD, publish=["8080:80"], network="bbnet")
        wait_http(box, "http://203.0.113.1:8080/", ns="client", expect=images.page)
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

from netagent.cli.sandbox import Sandbox, SandboxError

from . import private
from .libcni import CNIConfig, NetworkConfigList, RuntimeConf, SandboxExec, sandbox_cache_dir
from .traffic import http_get, outside_client, wait_http
from .wait import WaitTimeout, wait_for

__all__ = ["HTTPD", "Containerd", "Dockerd", "Podman", "http_get", "outside_client", "wait_http"]

HTTPD = ["httpd", "-f", "-p", "80", "-h", "/www"]
DOCKER = "/usr/bin/docker"  # Debian's client (an unrelated one may come first in PATH)
_tags = itertools.count()


class Runtime:
    """Shared start/stop: private file system, state tmpfs, daemon by PID, reaping."""

    kind = "runtime"

    def __init__(self, box: Sandbox, workdir: str | Path) -> None:
        self.box = box
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.tag = f"{os.getpid()}-{next(_tags)}"
        self.state = f"/run/netagent-{self.kind}-{self.tag}"
        self.log_path = self.dir / f"{self.kind}-{self.tag}.log"
        self.proc: subprocess.Popen[Any] | None = None
        self.started_in = 0.0  # seconds from start() to ready
        self.stop_errors: list[str] = []
        self._mounts: list[str] = []
        t0 = time.monotonic()
        try:
            private.private_tree(box)
            private.cgroup_view(box)
            private.mount_tmpfs(box, self.state, "0700")
            self._mounts.append(self.state)
            self._start()
        except BaseException:
            self.stop()
            raise
        self.started_in = time.monotonic() - t0

    def _start(self) -> None:
        raise NotImplementedError

    def _remove_all(self) -> None:
        """Remove every container (best effort: ``stop`` kills what remains)."""

    def sh(
        self, argv: Sequence[str], check: bool = True, timeout: float = 60, **kw: Any
    ) -> subprocess.CompletedProcess[str]:
        return self.box.run(list(argv), check=check, timeout=timeout, **kw)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def _bind(self, source: str, target: str) -> None:
        private.bind(self.box, source, target)
        self._mounts.append(target)

    def stop(self) -> None:
        """Remove the containers, stop the daemon by PID, kill every helper and container
        process of this instance by PID, unmount its state. Never raises: problems are in
        ``stop_errors``."""
        markers = [self.state]
        pids = [self.proc.pid] if self.proc is not None else []
        before = _identities(private.owned_processes(self.box, markers, pids))
        try:
            self._remove_all()
        except Exception as exc:  # keep going: the processes must go whatever happened
            self.stop_errors.append(f"removing containers: {exc}")
        if self.proc is not None:
            self.box.stop(self.proc, timeout=15)
        after = _identities(private.owned_processes(self.box, markers))
        left = [pid for pid, start in {**before, **after}.items() if _start_time(pid) == start]
        if left:
            alive = private.kill_processes(left)
            if alive:
                self.stop_errors.append(f"processes would not die: {alive}")
        for path in reversed(self._mounts):
            private.unmount(self.box, path)
        self._mounts.clear()

    def __enter__(self) -> Any:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def _start_time(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _identities(pids: list[int]) -> dict[int, str]:
    """PID -> start time, so a PID reused later is never killed by mistake."""
    out = {}
    for pid in pids:
        start = _start_time(pid)
        if start is not None:
            out[pid] = start
    return out


# ---- Podman ------------------------------------------------------------------------
class Podman(Runtime):
    """Podman 4.3 (no daemon) with the CNI network backend, or netavark.

    ``backend="cni"``: ``network_backend = "cni"``, plugins from ``cni_bin_dirs``, network
    configurations (``.conflist``, by ``name``) from ``cni_conf_dir``. ``backend=
    "netavark"``: Podman's default backend, networks in ``cni_conf_dir`` as netavark
    JSON (make them with :meth:`network_create`).
    """

    kind = "podman"

    def __init__(
        self,
        box: Sandbox,
        workdir: str | Path,
        cni_bin_dirs: Sequence[str] = ("/usr/lib/cni",),
        cni_conf_dir: str | Path | None = None,
        backend: Literal["cni", "netavark"] = "cni",
    ) -> None:
        self.backend = backend
        self.cni_bin_dirs = list(cni_bin_dirs)
        self.conf_dir = Path(cni_conf_dir) if cni_conf_dir else None
        super().__init__(box, workdir)

    def _start(self) -> None:
        if self.conf_dir is None:
            self.conf_dir = self.dir / f"podman-{self.tag}-networks"
        self.conf_dir.mkdir(parents=True, exist_ok=True)
        wrapper = private.crun_wrapper(self.dir, disable_cgroups=False)
        lines = [
            "[containers]",
            'cgroups = "disabled"',
            "[engine]",
            'cgroup_manager = "cgroupfs"',
            'events_logger = "file"',
            f'events_logfile_path = "{self.state}/events.log"',
            'runtime = "crun"',
            "[engine.runtimes]",
            f'crun = ["{wrapper}"]',
            "[network]",
            f'network_backend = "{self.backend}"',
            f'network_config_dir = "{self.conf_dir}"',
        ]
        if self.backend == "cni":
            dirs = ", ".join(f'"{d}"' for d in self.cni_bin_dirs)
            lines.append(f"cni_plugin_dirs = [{dirs}]")
        self.conf = self.dir / f"podman-{self.tag}.conf"
        self.conf.write_text("\n".join(lines) + "\n")
        info = json.loads(self.podman("info", "--format", "json").stdout)
        got = info["host"].get("networkBackend")
        if got != self.backend:
            raise SandboxError(f"podman uses network backend {got!r}, not {self.backend!r}")

    def podman(
        self, *args: str, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        argv = [
            "podman",
            "--root",
            f"{self.state}/root",
            "--runroot",
            f"{self.state}/runroot",
            "--tmpdir",
            f"{self.state}/tmp",
            "--storage-driver",
            "vfs",
            *args,
        ]
        env = dict(os.environ, CONTAINERS_CONF=str(self.conf))
        return self.sh(argv, check=check, timeout=timeout, env=env)

    def import_image(self, tarball: str | Path, ref: str) -> None:
        self.podman("import", str(tarball), ref)

    def network_create(self, name: str, subnet: str) -> None:
        """A bridge network (netavark backend; ``--disable-dns``: no aardvark-dns)."""
        self.podman("network", "create", "--subnet", subnet, "--disable-dns", name)

    def run(
        self,
        name: str,
        image: str,
        args: Sequence[str] = HTTPD,
        publish: Sequence[str] = (),
        network: str | None = None,
        extra: Sequence[str] = (),
    ) -> str:
        argv = ["run", "-d", "--name", name]
        if network:
            argv += ["--network", network]
        for p in publish:
            argv += ["-p", p]
        out = self.podman(*argv, *extra, image, *args).stdout
        return out.strip().splitlines()[-1]

    def inspect(self, cid: str) -> dict[str, Any]:
        doc: list[dict[str, Any]] = json.loads(self.podman("inspect", cid).stdout)
        return doc[0]

    def ip(self, cid: str, network: str) -> str:
        ip: str = self.inspect(cid)["NetworkSettings"]["Networks"][network]["IPAddress"]
        return ip

    def rm(self, cid: str) -> None:
        self.podman("rm", "-f", "-t", "0", cid)

    def _remove_all(self) -> None:
        if hasattr(self, "conf"):
            self.podman("rm", "-f", "-a", "-t", "0", timeout=60)


# ---- containerd ----------------------------------------------------------------------
class Containerd(Runtime):
    """containerd 1.6 driven with ``ctr``, images from an OCI archive, the ``native``
    snapshotter, crun (through the wrapper) as the runc binary.

    Two network modes, because ``ctr`` has no port publishing:

    - ``run(..., cni=True)``: ``ctr run --cni``: go-cni with its fixed defaults (first
      configuration in ``/etc/cni/net.d``, plugins in ``/opt/cni/bin``; bound here to
      ``cni_conf_dir`` and ``cni_bin_dir``), no capability arguments, so no ports.
      ``ctr`` never calls DEL; :meth:`rm` does, through :mod:`libcni`, from go-cni's
      cached result (same cache format and place).
    - ``run(..., publish=[...], network=conflist)``: what a CRI runtime does: a netns made
      with ``ip netns add``, CNI ADD through :mod:`libcni` with ``portMappings``, then
      ``ctr run --with-ns network:<path>``; :meth:`rm` does DEL and removes the netns.
    """

    kind = "containerd"

    def __init__(
        self,
        box: Sandbox,
        workdir: str | Path,
        cni_bin_dir: str = "/usr/lib/cni",
        cni_conf_dir: str | Path | None = None,
    ) -> None:
        self.cni_bin_dir = cni_bin_dir
        self.conf_dir = Path(cni_conf_dir) if cni_conf_dir else None
        self.containers: dict[str, dict[str, Any]] = {}
        super().__init__(box, workdir)

    def _start(self) -> None:
        s = self.state
        self.socket = f"{s}/containerd.sock"
        self.wrapper = private.crun_wrapper(self.dir, disable_cgroups=True)
        config = self.dir / f"containerd-{self.tag}.toml"
        config.write_text(
            "version = 2\n"
            f'root = "{s}/root"\nstate = "{s}/state"\n'
            'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
            "oom_score = 0\n"
            f'[grpc]\n  address = "{self.socket}"\n'
            f'[ttrpc]\n  address = "{self.socket}.ttrpc"\n'
            f'[plugins."io.containerd.internal.v1.opt"]\n  path = "{s}/opt"\n'
        )
        if self.conf_dir is None:
            self.conf_dir = self.dir / f"containerd-{self.tag}-net.d"
        self.conf_dir.mkdir(parents=True, exist_ok=True)
        self._bind(str(self.conf_dir), "/etc/cni/net.d")
        self._bind(self.cni_bin_dir, "/opt/cni/bin")
        # one cache with go-cni: the sandbox's /var/lib/cni
        cache = sandbox_cache_dir(self.box)
        self.cni = CNIConfig([self.cni_bin_dir], cache, SandboxExec(self.box))
        with open(self.log_path, "ab") as log:
            self.proc = self.box.popen(
                ["containerd", "--config", str(config)], stdout=log, stderr=subprocess.STDOUT
            )
        wait_for("containerd to answer", self._ready, timeout=30)

    def _ready(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise SandboxError(f"containerd exited ({self.proc.returncode}):\n{self.log()[-3000:]}")
        return self.ctr("version", check=False, timeout=10).returncode == 0

    def ctr(
        self, *args: str, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        return self.sh(["ctr", "--address", self.socket, *args], check=check, timeout=timeout)

    def import_image(self, oci_archive: str | Path) -> None:
        self.ctr("image", "import", "--snapshotter", "native", str(oci_archive))

    def _first_conflist(self) -> Path:
        """The configuration go-cni's default loader picks: the first ``.conf``,
        ``.conflist`` or ``.json`` file in name order."""
        assert self.conf_dir is not None
        files = sorted(
            p for p in self.conf_dir.iterdir() if p.suffix in (".conf", ".conflist", ".json")
        )
        if not files:
            raise SandboxError(f"no CNI configuration in {self.conf_dir}")
        return files[0]

    def run(
        self,
        name: str,
        image: str,
        args: Sequence[str] = HTTPD,
        cni: bool = True,
        publish: Sequence[str] = (),
        network: str | Path | None = None,
    ) -> str:
        base = ["run", "-d", "--snapshotter", "native", "--runc-binary", str(self.wrapper)]
        if publish or network is not None:
            net = NetworkConfigList.from_file(network or self._first_conflist())
            nsname = f"ctd-{name}"
            self.sh(["ip", "netns", "add", nsname], timeout=10)
            rt = RuntimeConf(
                name,
                f"/run/netns/{nsname}",
                "eth0",
                capability_args={"portMappings": _port_mappings(publish)},
            )
            self.containers[name] = {"net": net, "rt": rt, "netns": nsname}
            self.cni.add_network_list(net, rt)
            self.ctr(*base, "--with-ns", f"network:{rt.netns}", image, name, *args)
        elif cni:
            net = NetworkConfigList.from_file(self._first_conflist())
            self.containers[name] = {"net": net, "rt": None, "netns": None}
            self.ctr(*base, "--cni", image, name, *args)
        else:
            self.containers[name] = {"net": None, "rt": None, "netns": None}
            self.ctr(*base, image, name, *args)
        return name

    def task_pid(self, cid: str) -> int:
        for line in self.ctr("task", "ls").stdout.splitlines()[1:]:
            fields = line.split()
            if fields and fields[0] == cid:
                return int(fields[1])
        raise SandboxError(f"no task {cid}")

    def _task_status(self, cid: str) -> str | None:
        for line in self.ctr("task", "ls", timeout=20).stdout.splitlines()[1:]:
            fields = line.split()
            if fields and fields[0] == cid:
                return fields[2]
        return None

    def result(self, cid: str) -> dict[str, Any] | None:
        """The cached CNI result of a container (its addresses: ``ips[].address``)."""
        c = self.containers[cid]
        rt = c["rt"] or RuntimeConf(f"default-{cid}", "", "eth0")
        return self.cni.cached_result(c["net"], rt) if c["net"] else None

    def rm(self, cid: str) -> None:
        """CNI DEL (while the netns exists, as a CRI runtime tears down before stopping),
        then the task and the container, then the netns we made."""
        c = self.containers.pop(cid)
        errors = []
        if c["net"] is not None:
            rt = c["rt"]
            if rt is None:  # ctr --cni: go-cni's ID and interface, the task's netns
                try:
                    netns = f"/proc/{self.task_pid(cid)}/ns/net"
                except SandboxError:
                    netns = ""
                rt = RuntimeConf(f"default-{cid}", netns, "eth0")
            try:
                self.cni.del_network_list(c["net"], rt)
            except Exception as exc:
                errors.append(f"CNI DEL: {exc}")
        # not ``task rm -f``: it kills with --all, which needs the task's cgroup, and
        # crun runs without cgroups here, so it would wait forever
        self.ctr("task", "kill", "-s", "SIGKILL", cid, check=False, timeout=30)
        with contextlib.suppress(WaitTimeout):  # the removals below say what failed
            wait_for(
                f"task {cid} to stop",
                lambda: self._task_status(cid) in ("STOPPED", None),
                timeout=20,
            )
        self.ctr("task", "rm", cid, check=False, timeout=30)
        r = self.ctr("container", "rm", cid, check=False, timeout=30)
        if r.returncode != 0:
            errors.append(f"ctr container rm: {r.stderr.strip()}")
        if c["netns"]:
            self.sh(["ip", "netns", "del", c["netns"]], check=False, timeout=10)
        if errors:
            raise SandboxError(f"removing {cid}: {'; '.join(errors)}")

    def _remove_all(self) -> None:
        errors = []
        for cid in list(self.containers):
            try:
                self.rm(cid)
            except Exception as exc:
                errors.append(str(exc))
        if errors:
            raise SandboxError("; ".join(errors))


def _port_mappings(publish: Sequence[str]) -> list[dict[str, Any]]:
    """``[IP:]HOST:CONTAINER[/PROTO]`` -> CNI ``portMappings`` capability entries."""
    out = []
    for spec in publish:
        spec, _, proto = spec.partition("/")
        parts = spec.rsplit(":", 2)
        entry: dict[str, Any] = {
            "hostPort": int(parts[-2]),
            "containerPort": int(parts[-1]),
            "protocol": proto or "tcp",
        }
        if len(parts) == 3 and parts[0]:
            entry["hostIP"] = parts[0]
        out.append(entry)
    return out


# ---- Docker ----------------------------------------------------------------------------
class Dockerd(Runtime):
    """Docker 20.10 (Debian's docker.io): dockerd with its own containerd, vfs storage,
    crun without cgroups as the default runtime, its own bridge ``docker0`` (at
    ``bridge_cidr`` when given) and its own iptables chains in the sandbox."""

    kind = "docker"

    def __init__(
        self,
        box: Sandbox,
        workdir: str | Path,
        bridge_cidr: str | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.bridge_cidr = bridge_cidr
        self.extra_args = list(extra_args)
        super().__init__(box, workdir)

    def _start(self) -> None:
        s = self.state
        self.socket = f"{s}/docker.sock"
        wrapper = private.crun_wrapper(self.dir, disable_cgroups=True)
        config = self.dir / f"docker-{self.tag}.json"
        config.write_text("{}\n")
        self.client_config = self.dir / f"docker-{self.tag}-client"
        self.client_config.mkdir(exist_ok=True)
        argv = [
            "dockerd",
            "--data-root",
            f"{s}/data",
            "--exec-root",
            f"{s}/exec",
            "--pidfile",
            f"{s}/docker.pid",
            "-H",
            f"unix://{self.socket}",
            "--config-file",
            str(config),
            "--storage-driver",
            "vfs",
            "--add-runtime",
            f"crun-nocgroup={wrapper}",
            "--default-runtime",
            "crun-nocgroup",
        ]
        if self.bridge_cidr:
            argv += ["--bip", self.bridge_cidr]
        with open(self.log_path, "ab") as log:
            self.proc = self.box.popen(
                [*argv, *self.extra_args], stdout=log, stderr=subprocess.STDOUT
            )
        wait_for("dockerd to answer", self._ready, timeout=60)

    def _ready(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise SandboxError(f"dockerd exited ({self.proc.returncode}):\n{self.log()[-3000:]}")
        return self.docker("version", check=False, timeout=10).returncode == 0

    def docker(
        self, *args: str, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        env = dict(os.environ, DOCKER_CONFIG=str(self.client_config))
        return self.sh(
            [DOCKER, "-H", f"unix://{self.socket}", *args], check=check, timeout=timeout, env=env
        )

    def import_image(self, tarball: str | Path, ref: str) -> None:
        self.docker("import", str(tarball), ref)

    def run(
        self,
        name: str,
        image: str,
        args: Sequence[str] = HTTPD,
        publish: Sequence[str] = (),
        extra: Sequence[str] = (),
    ) -> str:
        argv = ["run", "-d", "--name", name]
        for p in publish:
            argv += ["-p", p]
        return self.docker(*argv, *extra, image, *args).stdout.strip().splitlines()[-1]

    def inspect(self, cid: str) -> dict[str, Any]:
        doc: list[dict[str, Any]] = json.loads(self.docker("inspect", cid).stdout)
        return doc[0]

    def ip(self, cid: str) -> str:
        ip: str = self.inspect(cid)["NetworkSettings"]["IPAddress"]
        return ip

    def rm(self, cid: str) -> None:
        self.docker("rm", "-f", cid)

    def iptables_chains(self, table: str = "filter") -> list[str]:
        """The chains Docker made in the sandbox's iptables (``DOCKER*``)."""
        out = self.sh(["iptables", "-t", table, "-S"], timeout=10).stdout
        return [
            line.split()[1]
            for line in out.splitlines()
            if line.startswith(("-N ", "-P ")) and line.split()[1].startswith("DOCKER")
        ]

    def forward_policy(self) -> str:
        for line in self.sh(["iptables", "-S", "FORWARD"], timeout=10).stdout.splitlines():
            if line.startswith("-P FORWARD "):
                return line.split()[2]
        return "?"

    def _remove_all(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        ids = self.docker("ps", "-aq", check=False, timeout=30).stdout.split()
        if ids:
            self.docker("rm", "-f", *ids, timeout=60)
