"""The real daemon in a sandbox, started with its real command line (``netagent run``)
and driven with its real CLI (``netagent ctl``) or its socket."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from netagent.cli.client import Client
from netagent.cli.sandbox import Sandbox, SandboxError, wait_ready

#: the time limit of one CLI command, one command in the sandbox, one socket request
CTL_TIMEOUT = 60.0


def netagent_script() -> str | None:
    """The ``netagent`` console script installed beside this interpreter (the venv's),
    else the one on PATH, else None."""
    beside = Path(sys.executable).with_name("netagent")
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("netagent")


def netagent_argv() -> list[str]:
    """The real CLI: the console script, else the module. An unprivileged user running
    the system's python gets the module: the venv's script names an interpreter they may
    not be allowed to run."""
    script = netagent_script()
    return [script] if script else [sys.executable, "-m", "netagent"]


class Daemon:
    """The real daemon in a sandbox.

    ``wrap`` goes in front of the interpreter (``systemd-socket-activate -l PATH``,
    ``setpriv``, ``prlimit``); ``launcher`` replaces ``python -m netagent``; ``env`` is
    added to the environment; ``extra`` goes after ``run``'s usual options. Every start
    appends to one log file; :meth:`log` and :meth:`log_events` take ``since_start`` to
    read only what the current run wrote (a restarted daemon's lines, not the first's)."""

    def __init__(
        self,
        box: Sandbox,
        workdir: Path,
        *,
        firewall: str = "nftables",
        extra: list[str] | None = None,
        wrap: list[str] | None = None,
        launcher: list[str] | None = None,
        env: dict[str, str] | None = None,
        with_socket_option: bool = True,
    ) -> None:
        self.box = box
        self.dir = workdir
        self.socket = str(workdir / "netagent.sock")
        self.state_dir = workdir / "state"
        self.log_path = workdir / "daemon.log"
        self.firewall = firewall
        self.extra = extra or []
        self.wrap = wrap or []
        self.launcher = launcher or [sys.executable, "-m", "netagent"]
        self.env = env or {}
        self.with_socket_option = with_socket_option
        self.proc: subprocess.Popen[Any] | None = None
        self.starts = 0
        self.log_offset = 0  # where the current run's lines begin in the log

    def argv(self) -> list[str]:
        sock = ["--socket", self.socket] if self.with_socket_option else []
        return [
            *self.wrap,
            *self.launcher,
            "run",
            *sock,
            "--state-dir",
            str(self.state_dir),
            "--firewall",
            self.firewall,
            "--log-format",
            "json",
            *self.extra,
        ]

    # ---- life ------------------------------------------------------------------------
    def start(self, wait: bool = True) -> None:
        self.starts += 1
        self.log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "a") as log:
            self.proc = self.box.popen(
                self.argv(), stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **self.env}
            )
        if wait:
            self.wait_ready()

    def wait_ready(self, timeout: float = 20) -> None:
        assert self.proc is not None
        try:
            wait_ready(self.socket, self.proc, timeout)
        except SandboxError as exc:
            raise AssertionError(f"{exc}:\n{self.log()}") from None

    def stop(self) -> int:
        """SIGTERM and wait (then SIGKILL): the exit status."""
        assert self.proc is not None
        return self.box.stop(self.proc)

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def restart(self) -> None:
        self.stop()
        self.start()

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def run_to_exit(self, timeout: float = 30) -> tuple[int, str]:
        """Start and wait for the process to end by itself (a start that must fail):
        (exit status, what this run logged)."""
        self.start(wait=False)
        assert self.proc is not None
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.box.stop(self.proc)
            raise AssertionError(f"the daemon kept running:\n{self.log()}") from None
        return code, self.log(since_start=True)

    # ---- what it logged --------------------------------------------------------------
    def log(self, since_start: bool = False) -> str:
        if not self.log_path.exists():
            return ""
        with open(self.log_path, "rb") as f:
            if since_start:
                f.seek(self.log_offset)
            return f.read().decode(errors="replace")

    def log_events(self, since_start: bool = False) -> list[dict[str, Any]]:
        out = []
        for line in self.log(since_start).splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict):
                out.append(event)
        return out

    def event_names(self, since_start: bool = False) -> list[str]:
        return [str(e.get("event")) for e in self.log_events(since_start)]

    # ---- talking to it ---------------------------------------------------------------
    def ctl(
        self,
        *args: str,
        check: bool | None = None,
        json_out: bool = False,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run the real CLI (outside the sandbox: the socket is a file in /tmp)."""
        argv = [*netagent_argv(), "ctl", "--socket", self.socket]
        if json_out:
            argv.append("--json")
        result = subprocess.run(
            [*argv, *args], capture_output=True, text=True, timeout=CTL_TIMEOUT, input=input
        )
        if check is True and result.returncode != 0:
            raise AssertionError(
                f"ctl {' '.join(args)} failed ({result.returncode}): "
                f"{result.stdout}{result.stderr}\n--- daemon log ---\n{self.log()[-4000:]}"
            )
        return result

    def ok(self, *args: str) -> str:
        return self.ctl(*args, check=True).stdout

    def ctl_json(self, *args: str) -> Any:
        """``ctl --json ARGS``: the reply's result (the command must succeed)."""
        reply = json.loads(self.ctl(*args, json_out=True, check=True).stdout)
        assert reply["ok"] is True, reply
        return reply["result"]

    def status(self) -> dict[str, Any]:
        result: dict[str, Any] = self.ctl_json("status")
        return result

    def call(self, op: str, args: dict[str, Any] | None = None) -> Any:
        with Client(self.socket, timeout=CTL_TIMEOUT) as c:
            return c.call(op, args)

    def sh(
        self, *argv: str, check: bool = True, timeout: float = 30
    ) -> subprocess.CompletedProcess[str]:
        """A command inside the sandbox (the daemon's "host")."""
        return self.box.run(list(argv), check=check, timeout=timeout)

    def in_ns(
        self, ns: str, *argv: str, check: bool = True, timeout: float = 30
    ) -> subprocess.CompletedProcess[str]:
        return self.box.run(["ip", "netns", "exec", ns, *argv], check=check, timeout=timeout)
