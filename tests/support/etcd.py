"""A real 3-member etcd cluster (Debian's etcd-server 3.4) on the cluster's underlay.

Each member runs in a node of its own (a :class:`~tests.support.cluster.Host` added to the
cluster for it, or any sandbox on the underlay), listening on that node's underlay
address: client URL ``:2379``, peer URL ``:2380``. Data dirs are tmpfs mounts in the
members' nodes (see :meth:`EtcdCluster._tmpfs`). Members are started and stopped by PID.
``etcdctl`` (Debian's etcd-client) runs in ``client``, a sandbox on the underlay (the
outer sandbox by default, which stays up when members die).

``tls=True`` makes a CA, one server certificate (every member's IP in its SAN) and a
client certificate with ``openssl``, serves the client URLs over https and requires
client certificates (``--client-cert-auth``); peers stay on plain http.

Facts this relies on (etcd 3.4.23, see docs/cluster-etcd.md): a member restarted with
its old data dir and ``--initial-cluster-state existing`` rejoins and catches up;
``etcdctl endpoint health`` exits non-zero when any endpoint named is unhealthy, and waits
its whole ``--command-timeout`` on a refused one; etcd re-raises SIGTERM after a graceful
stop (status -15); with ``--client-cert-auth`` the server certificate also needs the
clientAuth extended key usage: etcd's grpc-gateway (the HTTP ``/v3`` JSON API) dials the
member's own gRPC port with it, and without it answers ``{"error":"connection
closed","code":14}`` while gRPC clients work.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from netagent.cli.sandbox import Sandbox, SandboxError

from .cluster import Host

CLIENT_PORT = 2379
PEER_PORT = 2380
TOOL_TIMEOUT = 15.0  # seconds, for one etcdctl or openssl call


def check_installed() -> str | None:
    """Why etcd cannot run here, or None. Debian: ``apt-get install -y
    --no-install-recommends etcd-server etcd-client``."""
    for tool in ("etcd", "etcdctl", "openssl"):
        if shutil.which(tool) is None:
            return f"the {tool} program is missing (Debian: etcd-server, etcd-client, openssl)"
    return None


@dataclass
class Certs:
    """File names of the CA, server and client certificates and keys (PEM)."""

    dir: Path
    ca: Path = field(init=False)
    server_cert: Path = field(init=False)
    server_key: Path = field(init=False)
    client_cert: Path = field(init=False)
    client_key: Path = field(init=False)

    def __post_init__(self) -> None:
        self.ca = self.dir / "ca.crt"
        self.server_cert = self.dir / "server.crt"
        self.server_key = self.dir / "server.key"
        self.client_cert = self.dir / "client.crt"
        self.client_key = self.dir / "client.key"


def _openssl(*args: str, cwd: Path) -> None:
    r = subprocess.run(
        ["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=TOOL_TIMEOUT
    )
    if r.returncode != 0:
        raise SandboxError(f"openssl {args[0]} failed: {r.stderr.strip()}")


def make_certs(directory: Path, ips: Sequence[str], client_cn: str = "netagent") -> Certs:
    """A CA, a server certificate valid for ``ips`` (and 127.0.0.1), a client certificate.

    ECDSA P-256 keys (fast to make; Go's TLS takes them). One server certificate for all
    members keeps the files few; its SAN lists every member's address."""
    directory.mkdir(parents=True, exist_ok=True)
    certs = Certs(directory)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl(
        "req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
        "-subj", "/CN=netagent-test-ca",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=directory,
    )  # fmt: skip
    san = ",".join(f"IP:{ip}" for ip in [*ips, "127.0.0.1"])
    for name, cn, ext in (
        ("server", "etcd", f"subjectAltName={san}\nextendedKeyUsage=serverAuth,clientAuth\n"),
        ("client", client_cn, "extendedKeyUsage=clientAuth\n"),
    ):
        (directory / f"{name}.ext").write_text(
            "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n" + ext
        )
        _openssl(
            "req", "-new", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr",
            "-subj", f"/CN={cn}", cwd=directory,
        )  # fmt: skip
        _openssl(
            "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "2", "-extfile", f"{name}.ext",
            "-out", f"{name}.crt", cwd=directory,
        )  # fmt: skip
    return certs


@dataclass
class Member:
    name: str
    node: Host
    data_dir: Path
    log_path: Path
    proc: subprocess.Popen[Any] | None = None
    starts: int = 0

    @property
    def ip(self) -> str:
        return self.node.underlay_ip

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


class EtcdCluster:
    """``EtcdCluster(nodes).start()``: one member per node, formed as one cluster.

    ``endpoints`` are the client URLs, in member order. ``stop_member(i)`` (SIGTERM, by
    PID), ``kill_member(i)`` (SIGKILL), ``start_member(i)`` (rejoin with its data dir),
    ``kill_all()``; ``close()`` also removes the data dirs and certificates."""

    def __init__(
        self,
        nodes: Sequence[Host],
        *,
        client: Sandbox | None = None,
        tls: bool = False,
        heartbeat_ms: int = 100,
        election_ms: int = 1000,
        token: str = "netagent-test",
    ) -> None:
        if len(nodes) < 1:
            raise ValueError("an etcd cluster needs at least one node")
        why = check_installed()
        if why:
            raise SandboxError(why)
        self.client = client if client is not None else nodes[0].outer
        self.dir = Path(tempfile.mkdtemp(prefix="netagent-etcd-"))
        self.tls = tls
        self.scheme = "https" if tls else "http"
        self.heartbeat_ms = heartbeat_ms
        self.election_ms = election_ms
        self.token = token
        self.members = [
            Member(
                name=f"e{i + 1}",
                node=node,
                data_dir=self.dir / f"e{i + 1}.data",
                log_path=self.dir / f"e{i + 1}.log",
            )
            for i, node in enumerate(nodes)
        ]
        self.certs = make_certs(self.dir / "pki", [m.ip for m in self.members]) if tls else None
        self.startup_seconds: float | None = None

    # ---- addresses ------------------------------------------------------------------
    def client_url(self, i: int) -> str:
        return f"{self.scheme}://{self.members[i].ip}:{CLIENT_PORT}"

    def peer_url(self, i: int) -> str:
        return f"http://{self.members[i].ip}:{PEER_PORT}"

    @property
    def endpoints(self) -> list[str]:
        return [self.client_url(i) for i in range(len(self.members))]

    @property
    def hostports(self) -> list[tuple[str, int]]:
        """(address, port) of each member: what gRPC client libraries take."""
        return [(m.ip, CLIENT_PORT) for m in self.members]

    def _argv(self, i: int, state: str) -> list[str]:
        m = self.members[i]
        initial = ",".join(f"{x.name}={self.peer_url(j)}" for j, x in enumerate(self.members))
        argv = [
            "etcd",
            "--name", m.name,
            "--data-dir", str(m.data_dir),
            "--listen-client-urls", self.client_url(i),
            "--advertise-client-urls", self.client_url(i),
            "--listen-peer-urls", self.peer_url(i),
            "--initial-advertise-peer-urls", self.peer_url(i),
            "--initial-cluster", initial,
            "--initial-cluster-state", state,
            "--initial-cluster-token", self.token,
            "--heartbeat-interval", str(self.heartbeat_ms),
            "--election-timeout", str(self.election_ms),
            "--logger", "zap",
            "--log-outputs", "stderr",
        ]  # fmt: skip
        if self.certs is not None:
            argv += [
                "--cert-file", str(self.certs.server_cert),
                "--key-file", str(self.certs.server_key),
                "--trusted-ca-file", str(self.certs.ca),
                "--client-cert-auth",
            ]  # fmt: skip
        return argv

    # ---- lifecycle --------------------------------------------------------------------
    def start(self, timeout: float = 30) -> float:
        """Start every member as a new cluster and wait until all are healthy; returns
        the seconds that took (also in ``startup_seconds``)."""
        t0 = time.monotonic()
        for i in range(len(self.members)):
            self._spawn(i, "new")
        self.wait_healthy(timeout=timeout)
        self.startup_seconds = time.monotonic() - t0
        return self.startup_seconds

    def _spawn(self, i: int, state: str) -> None:
        m = self.members[i]
        if m.running():
            raise SandboxError(f"etcd member {m.name} is already running")
        if m.starts == 0:
            self._tmpfs(m)
        m.starts += 1
        with open(m.log_path, "a") as log:
            m.proc = m.node.popen(self._argv(i, state), stdout=log, stderr=subprocess.STDOUT)

    @staticmethod
    def _tmpfs(m: Member) -> None:
        """The member's data dir is a tmpfs in its node's own mount namespace: its WAL
        fsyncs cost nothing (on this machine's disk each is 1.5-4 ms, and a put waits for
        the leader's and a follower's in turn), nothing reaches the disk, and it lives
        as long as the node, so a member restarted on it finds its data again."""
        m.data_dir.mkdir(mode=0o700)
        m.node.run(
            ["mount", "-t", "tmpfs", "-o", "size=256m,mode=0700", "tmpfs", str(m.data_dir)],
            timeout=TOOL_TIMEOUT,
        )

    def start_member(self, i: int, timeout: float = 30) -> None:
        """Restart member ``i`` with its data dir and ``--initial-cluster-state
        existing``; returns once it is healthy."""
        self._spawn(i, "existing")
        self.wait_healthy([i], timeout=timeout)

    def start_all(self, timeout: float = 30) -> None:
        """Restart every member that is down, with its data dir, at once (a member alone
        cannot be healthy without a quorum); returns once all are healthy."""
        for i, m in enumerate(self.members):
            if not m.running():
                self._spawn(i, "existing")
        self.wait_healthy(timeout=timeout)

    def stop_member(self, i: int, timeout: float = 10) -> int | None:
        """SIGTERM member ``i`` (by PID) and wait for it to exit; its exit status (etcd
        stops gracefully, then re-raises the signal, so that is ``-SIGTERM``)."""
        m = self.members[i]
        if m.proc is None:
            return None
        return m.node.stop(m.proc, signal.SIGTERM, timeout=timeout)

    def kill_member(self, i: int) -> None:
        m = self.members[i]
        if m.proc is not None and m.proc.poll() is None:
            m.proc.kill()
            m.proc.wait(10)

    def kill_all(self) -> None:
        for i in range(len(self.members)):
            self.kill_member(i)

    def close(self) -> None:
        self.kill_all()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> EtcdCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- talking to it ----------------------------------------------------------------
    def etcdctl(
        self,
        *args: str,
        members: Sequence[int] | None = None,
        check: bool = True,
        timeout: float = TOOL_TIMEOUT,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``etcdctl`` (API v3) in the client sandbox against ``members`` (default:
        all). ``--command-timeout`` keeps each request below our own time limit."""
        which = range(len(self.members)) if members is None else members
        argv = [
            "etcdctl",
            "--endpoints=" + ",".join(self.client_url(i) for i in which),
            "--dial-timeout=2s",
            f"--command-timeout={max(1, int(timeout) - 2)}s",
        ]
        if self.certs is not None:
            argv += [
                f"--cacert={self.certs.ca}",
                f"--cert={self.certs.client_cert}",
                f"--key={self.certs.client_key}",
            ]
        env = {**os.environ, "ETCDCTL_API": "3"}
        return self.client.run([*argv, *args], check=check, timeout=timeout, env=env)

    def healthy(self, i: int, timeout: float = 4) -> bool:
        """Whether member ``i`` answers a quorum read within ``timeout`` s (etcdctl waits
        its whole ``--command-timeout`` on a refused endpoint, so keep this short)."""
        r = self.etcdctl("endpoint", "health", members=[i], check=False, timeout=timeout)
        return r.returncode == 0

    def wait_healthy(self, members: Sequence[int] | None = None, timeout: float = 30) -> None:
        """Until every member named answers ``endpoint health`` (a quorum read, so this
        also says the cluster has a leader). Fails early if a member exits."""
        which = list(range(len(self.members))) if members is None else list(members)
        deadline = time.monotonic() + timeout
        while True:
            for i in which:
                m = self.members[i]
                if not m.running():
                    raise SandboxError(f"etcd {m.name} exited:\n{m.log()[-3000:]}")
            left = deadline - time.monotonic()
            r = self.etcdctl(
                "endpoint", "health", members=which, check=False, timeout=min(5.0, max(left, 3))
            )
            if r.returncode == 0:
                return
            if time.monotonic() >= deadline:
                raise SandboxError(
                    f"etcd {[self.members[i].name for i in which]} not healthy within "
                    f"{timeout:g} s: {r.stdout.strip()} {r.stderr.strip()[-500:]}"
                )
            time.sleep(0.1)

    def member_list(self) -> list[dict[str, Any]]:
        out = json.loads(self.etcdctl("member", "list", "-w", "json").stdout)
        members: list[dict[str, Any]] = out.get("members", [])
        return members

    def put(self, key: str, value: str, member: int | None = None, timeout: float = 15) -> None:
        """Write ``key`` through ``member``, retrying until ``timeout`` s: right after the
        leader is killed, a write fails with "etcdserver: request timed out, possibly due
        to previous leader failure" until a new leader is elected (etcdctl does not retry
        a put). Writing the same value twice is harmless here."""
        deadline = time.monotonic() + timeout
        which = None if member is None else [member]
        while True:
            # short attempts: a new leader is there long before the old one's request
            # times out on the server
            attempt = min(max(deadline - time.monotonic(), 3), 4)
            r = self.etcdctl("put", key, value, members=which, check=False, timeout=attempt)
            if r.returncode == 0:
                return
            if time.monotonic() >= deadline:
                raise SandboxError(f"etcdctl put {key} failed: {r.stderr.strip()[-500:]}")
            time.sleep(0.1)

    def get(self, key: str, member: int | None = None) -> str | None:
        """The value of ``key`` read through ``member`` (a linearizable read), or None."""
        r = self.etcdctl(
            "get", key, "--print-value-only", members=None if member is None else [member]
        )
        value = r.stdout.removesuffix("\n")
        return value if r.stdout else None
