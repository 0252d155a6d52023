"""Several "hosts" on one machine: nested sandboxes joined by an underlay bridge.

Inside one outer :class:`~netagent.cli.sandbox.Sandbox` there is a bridge ``underlay0``
(the switch; the outer sandbox itself sits on it at ``.254``, like an operator's laptop)
and N hosts. Each host is a sandbox of its own, nested in the outer one: a new network
AND mount namespace with its own tmpfs on ``/run/netns``, a fresh sysfs and ``lo`` up, so
a netagent daemon started in it sees an empty host, and ``ip netns add`` in one host is
invisible to the others and to the outer sandbox. Its cable to the switch is a veth pair,
``eth0`` in the host and ``u-NAME`` on ``underlay0`` in the outer sandbox, created with
the host end directly in the host's namespace (``ip link add ... netns PID``: moving a
link afterwards costs a grace period).

The addresses are TEST-NET-2 (198.51.100.0/24, RFC 5737) and exist only inside the outer
sandbox: nothing reaches the real host. Processes are started and stopped by PID; closing
a host also kills, by PID, whatever its processes left in its network namespace (a daemon
killed with -9 leaves its ``nft monitor`` behind, and that would pin the namespace).
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from netagent.cli.sandbox import Sandbox, SandboxError, daemon_argv

from .wait import wait_for

UNDERLAY = "underlay0"
UNDERLAY_NET = ipaddress.IPv4Network("198.51.100.0/24")
SWITCH_ADDR = UNDERLAY_NET[254]  # the outer sandbox's own address on the underlay
CMD_TIMEOUT = 15.0  # seconds, for any one ip/mount command

# Runs as the nested holder, inside the new namespaces. The mount namespace is a copy of
# the outer sandbox's (so /tmp is the same file system and sockets in it are reachable),
# then gets its own /run/netns and a sysfs that shows this network namespace. It lives
# until stdin closes (our process exiting for any reason closes it).
_HOLDER = r"""
import subprocess, sys
for argv in (["mount", "-t", "tmpfs", "tmpfs", "/run/netns"],
             ["mount", "-t", "sysfs", "sysfs", "/sys"],
             ["ip", "link", "set", "lo", "up"]):
    subprocess.run(argv, check=True, timeout=15)
print("ready", flush=True)
sys.stdin.read()
"""


def _readline(proc: subprocess.Popen[str], timeout: float) -> str:
    """One line from ``proc``'s stdout, or "" if none comes within ``timeout`` s (a plain
    readline would block forever on a holder stuck in mount)."""
    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            return ""
    return proc.stdout.readline()


def netns_id(pid: int) -> str:
    """The kernel's name of a process's network namespace (``net:[4026532249]``)."""
    return os.readlink(f"/proc/{pid}/ns/net")


def pids_in_netns(ns: str, exclude: Sequence[int] = ()) -> list[int]:
    """Processes whose network namespace is ``ns``: the ones a test started there (and
    their children), since nothing else ever enters these sandboxes."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in exclude:
            continue
        try:
            if os.readlink(f"/proc/{entry}/ns/net") == ns:
                out.append(int(entry))
        except OSError:
            continue
    return out


class Host(Sandbox):
    """A host of the cluster: a sandbox nested in the outer one, cabled to the underlay.

    It is a :class:`Sandbox` (``run``, ``popen``, ``stop``, ``close``), so anything written
    for one sandbox, such as the test suite's ``Daemon``, works on a host unchanged.
    ``workdir`` is a private temp dir for its daemon's state dir and socket."""

    def __init__(
        self, outer: Sandbox, name: str, address: ipaddress.IPv4Interface, timeout: float = 15
    ) -> None:
        # Sandbox.__init__ is not called on purpose: it unshares from the root namespaces,
        # and a host must be made from inside the outer sandbox's mount namespace.
        self.outer = outer
        self.name = name
        self.address = address
        self.port = f"u-{name}"[:15]  # the cable's end on underlay0, in the outer sandbox
        self.children: list[subprocess.Popen[Any]] = []
        self.holder = subprocess.Popen(
            outer.argv(
                [
                    "unshare",
                    "--net",
                    "--mount",
                    "--propagation",
                    "private",
                    "--",
                    sys.executable,
                    "-c",
                    _HOLDER,
                ]
            ),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        # nsenter and unshare exec (no fork without a PID namespace), so this PID is the
        # holder's own and ``nsenter --target`` reaches its namespaces.
        self.pid = self.holder.pid
        self.workdir = Path(tempfile.mkdtemp(prefix=f"netagent-{name}-"))
        try:
            if _readline(self.holder, timeout).strip() != "ready":
                raise SandboxError(f"host {name} did not start (unshare/mount failed)")
            self.netns = netns_id(self.pid)
            self._cable()
        except BaseException:
            self.close()
            raise

    def _cable(self) -> None:
        outer = self.outer.run
        outer(
            ["ip", "link", "add", self.port, "type", "veth", "peer", "name", "eth0",
             "netns", str(self.pid)],
            timeout=CMD_TIMEOUT,
        )  # fmt: skip
        outer(["ip", "link", "set", self.port, "master", UNDERLAY, "up"], timeout=CMD_TIMEOUT)
        self.run(["ip", "addr", "add", str(self.address), "dev", "eth0"], timeout=CMD_TIMEOUT)
        self.run(["ip", "link", "set", "eth0", "up"], timeout=CMD_TIMEOUT)

    # ---- what tests use --------------------------------------------------------------
    @property
    def underlay_ip(self) -> str:
        return str(self.address.ip)

    @property
    def socket(self) -> str:
        return str(self.workdir / "netagent.sock")

    @property
    def state_dir(self) -> str:
        return str(self.workdir / "state")

    def daemon_argv(self, *extra: str) -> list[str]:
        """The netagent daemon's command line with this host's own socket and state dir."""
        return daemon_argv(self.socket, self.state_dir, *extra)

    def alive(self) -> bool:
        return self.holder.poll() is None

    def cut(self) -> None:
        """Unplug the cable (its switch end down): a partition, processes keep running."""
        self.outer.run(["ip", "link", "set", self.port, "down"], timeout=CMD_TIMEOUT)

    def reconnect(self) -> None:
        self.outer.run(["ip", "link", "set", self.port, "up"], timeout=CMD_TIMEOUT)

    def kill(self) -> None:
        """Power the host off: SIGKILL every process in it (by PID), end the holder; the
        kernel then frees its namespaces, its links and its cable."""
        self.close(graceful=False)

    def close(self, graceful: bool = True) -> None:
        """Stop what was started here (SIGTERM then SIGKILL when ``graceful``), kill what
        they left in the host's network namespace, end the holder, remove the workdir."""
        for proc in self.children:
            if graceful:
                self.stop(proc, signal.SIGTERM, timeout=10)
            elif proc.poll() is None:
                proc.kill()
                proc.wait(10)
        ns = getattr(self, "netns", None)
        if ns is not None:
            for pid in pids_in_netns(ns, exclude=(self.pid,)):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        super().close()
        shutil.rmtree(self.workdir, ignore_errors=True)


class Cluster:
    """``Cluster(box, hosts=3)``: an underlay bridge in ``box`` and N hosts on it.

    Hosts get 198.51.100.1, .2, ... in the order they are added; ``add_host`` adds more
    later (etcd members, say, in hosts of their own). ``remove_host`` kills one and waits
    until its cable is gone. ``close`` (or leaving the ``with`` block) kills every host and
    deletes the bridge, leaving the outer sandbox as it was."""

    def __init__(self, box: Sandbox, hosts: int = 3, prefix: str = "host") -> None:
        self.box = box
        self.hosts: list[Host] = []
        self._next = 1
        box.run(["ip", "link", "add", UNDERLAY, "type", "bridge"], timeout=CMD_TIMEOUT)
        try:
            box.run(
                ["ip", "addr", "add", f"{SWITCH_ADDR}/{UNDERLAY_NET.prefixlen}", "dev", UNDERLAY],
                timeout=CMD_TIMEOUT,
            )
            box.run(["ip", "link", "set", UNDERLAY, "up"], timeout=CMD_TIMEOUT)
            for i in range(hosts):
                self.add_host(f"{prefix}{i + 1}")
        except BaseException:
            self.close()
            raise

    def add_host(self, name: str) -> Host:
        if self._next >= 254:
            raise SandboxError("the underlay has no free address left")
        address = ipaddress.IPv4Interface(f"{UNDERLAY_NET[self._next]}/{UNDERLAY_NET.prefixlen}")
        self._next += 1
        host = Host(self.box, name, address)
        self.hosts.append(host)
        return host

    def remove_host(self, host: Host, graceful: bool = False) -> None:
        """Kill (default) or stop ``host`` and forget it; returns when its cable is gone
        (the kernel destroys a dead namespace's links asynchronously)."""
        host.close(graceful=graceful)
        self.hosts.remove(host)
        wait_for(
            f"{host.port} to vanish",
            lambda: (
                self.box.run(
                    ["ip", "link", "show", host.port], check=False, timeout=CMD_TIMEOUT
                ).returncode
                != 0
            ),
            timeout=10,
        )

    def __getitem__(self, i: int) -> Host:
        return self.hosts[i]

    def __len__(self) -> int:
        return len(self.hosts)

    def close(self) -> None:
        errors = []
        for host in self.hosts:
            try:
                host.close()
            except Exception as exc:  # keep closing the others
                errors.append(exc)
        self.hosts.clear()
        if self.box.holder.poll() is None:
            self.box.run(["ip", "link", "del", UNDERLAY], check=False, timeout=CMD_TIMEOUT)
        if errors:
            raise errors[0]

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
