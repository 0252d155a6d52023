"""A throwaway "host": a new network and mount namespace, held open by a small process.

Inside it the daemon sees its own empty network (its own namespaces under a private
``/run/netns``, its own bridges, nft tables and iptables chains); nothing it does reaches
the real host. Commands run inside with ``nsenter``. Closing the sandbox kills what was
started in it (by PID) and ends the holder; the kernel then frees every namespace, link
and rule in it. Used by ``netagent demo``, the privileged tests and the benchmark.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from typing import Any

# Runs inside the new namespaces: mount a private /run/netns and a sysfs that shows this
# network namespace, bring lo up, say ready, then live until stdin closes (our process
# exiting for any reason closes it, so a crashed test still frees its sandbox).
_HOLDER = r"""
import subprocess, sys
for argv in (["mount", "-t", "tmpfs", "tmpfs", "/run/netns"],
             ["mount", "-t", "sysfs", "sysfs", "/sys"],
             ["ip", "link", "set", "lo", "up"]):
    subprocess.run(argv, check=True)
print("ready", flush=True)
sys.stdin.read()
"""


class SandboxError(RuntimeError):
    pass


def check_privileges() -> str | None:
    """Why a sandbox cannot be made here, or None when it can."""
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    for tool in ("unshare", "nsenter", "ip", "mount"):
        if shutil.which(tool) is None:
            return f"the {tool} program is missing"
    return None


class Sandbox:
    def __init__(self) -> None:
        why = check_privileges()
        if why:
            raise SandboxError(f"cannot make a sandbox: {why}")
        os.makedirs("/run/netns", exist_ok=True)  # unshare needs the mount point
        self.holder = subprocess.Popen(
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
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.holder.stdout is not None
        line = self.holder.stdout.readline().strip()
        if line != "ready":
            self.close()
            raise SandboxError("the sandbox did not start (unshare/mount failed)")
        self.pid = self.holder.pid
        self.children: list[subprocess.Popen[Any]] = []

    def argv(self, argv: list[str]) -> list[str]:
        return ["nsenter", f"--target={self.pid}", "--net", "--mount", "--", *argv]

    def run(
        self, argv: list[str], check: bool = True, **kw: Any
    ) -> subprocess.CompletedProcess[str]:
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        kw.setdefault("timeout", 60)
        result = subprocess.run(self.argv(argv), check=False, **kw)
        if check and result.returncode != 0:
            raise SandboxError(
                f"{' '.join(argv)} failed ({result.returncode}): {result.stderr.strip()}"
            )
        return result

    def popen(self, argv: list[str], **kw: Any) -> subprocess.Popen[Any]:
        proc = subprocess.Popen(self.argv(argv), **kw)
        self.children.append(proc)
        return proc

    def stop(
        self, proc: subprocess.Popen[Any], sig: int = signal.SIGTERM, timeout: float = 10
    ) -> int:
        """Stop one process we started, by its PID."""
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return proc.returncode

    def close(self) -> None:
        for proc in self.children:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        self.children.clear()
        if self.holder.poll() is None:
            if self.holder.stdin:
                self.holder.stdin.close()
            try:
                self.holder.wait(10)
            except subprocess.TimeoutExpired:
                self.holder.kill()
                self.holder.wait()
        if self.holder.stdout:
            self.holder.stdout.close()

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---- steps the demo, the tests and the benchmark share ----------------------------------
CLIENT_HOST = "203.0.113.1"  # the host's "outside" address (TEST-NET-3, sandbox only)
CLIENT_ADDR = "203.0.113.2"


def outside_client_steps() -> list[list[str]]:
    """The commands that make the outside world: a namespace ``client`` wired to the host
    by hand (not netagent's), the host at 203.0.113.1, the client at .2 routing via it."""
    return [
        ["ip", "netns", "add", "client"],
        [
            "ip",
            "link",
            "add",
            "to-client",
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            "client",
        ],
        ["ip", "addr", "add", f"{CLIENT_HOST}/24", "dev", "to-client"],
        ["ip", "link", "set", "to-client", "up"],
        ["ip", "-n", "client", "addr", "add", f"{CLIENT_ADDR}/24", "dev", "eth0"],
        ["ip", "-n", "client", "link", "set", "eth0", "up"],
        ["ip", "-n", "client", "link", "set", "lo", "up"],
        ["ip", "-n", "client", "route", "add", "default", "via", CLIENT_HOST],
    ]


def daemon_argv(socket: str, state_dir: str, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "netagent",
        "run",
        "--socket",
        socket,
        "--state-dir",
        state_dir,
        "--log-format",
        "json",
        *extra,
    ]


def wait_ready(socket: str, proc: subprocess.Popen[Any], timeout: float = 20) -> None:
    """Until the daemon answers ``status``; SandboxError if it exits or takes too long."""
    import time

    from .client import Client

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SandboxError(f"the daemon exited at start ({proc.returncode})")
        try:
            with Client(socket, timeout=5) as c:
                c.call("status")
            return
        except Exception:
            time.sleep(0.02)
    raise SandboxError(f"the daemon did not answer within {timeout:g} s")
