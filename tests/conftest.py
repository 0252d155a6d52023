"""Fixtures: a sandbox per privileged test, and the real daemon running inside it.

Privileged tests need root and network namespaces. Without them they are skipped, except
under ``CI=true``, where a missing privilege is a failure: CI must run them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from netagent.cli.client import Client
from netagent.cli.sandbox import (
    Sandbox,
    SandboxError,
    check_privileges,
    daemon_argv,
    wait_ready,
)

IN_CI = os.environ.get("CI", "").lower() == "true"
REPO = Path(__file__).resolve().parent.parent


def netagent_argv() -> list[str]:
    """The real console script when installed, else the module."""
    exe = shutil.which("netagent")
    return [exe] if exe else [sys.executable, "-m", "netagent"]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Without root, skip privileged tests, except under CI=true: there the ``sandbox``
    fixture fails them, because CI must run them."""
    why = check_privileges()
    if why is None or IN_CI:
        return
    for item in items:
        if "privileged" in item.keywords or "e2e" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=f"privileged test: {why}"))


@pytest.fixture
def sandbox() -> Iterator[Sandbox]:
    why = check_privileges()
    if why is not None:
        if IN_CI:
            pytest.fail(f"CI=true but privileged tests cannot run: {why}")
        pytest.skip(f"privileged test: {why}")
    box = Sandbox()
    try:
        yield box
    finally:
        box.close()


class Daemon:
    """The real daemon in a sandbox, driven by the real CLI."""

    def __init__(
        self,
        box: Sandbox,
        workdir: Path,
        firewall: str = "nftables",
        extra: list[str] | None = None,
    ) -> None:
        self.box = box
        self.dir = workdir
        self.socket = str(workdir / "netagent.sock")
        self.state_dir = workdir / "state"
        self.log_path = workdir / "daemon.log"
        self.firewall = firewall
        self.extra = extra or []
        self.proc: subprocess.Popen[Any] | None = None
        self.starts = 0

    def start(self, wait: bool = True) -> None:
        self.starts += 1
        with open(self.log_path, "a") as log:
            self.proc = self.box.popen(
                daemon_argv(
                    self.socket, str(self.state_dir), "--firewall", self.firewall, *self.extra
                ),
                stdout=log,
                stderr=subprocess.STDOUT,
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
        assert self.proc is not None
        return self.box.stop(self.proc)

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def restart(self) -> None:
        self.stop()
        self.start()

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def log_events(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

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
            [*argv, *args], capture_output=True, text=True, timeout=60, input=input
        )
        if check is True and result.returncode != 0:
            raise AssertionError(
                f"ctl {' '.join(args)} failed ({result.returncode}): "
                f"{result.stdout}{result.stderr}\n--- daemon log ---\n{self.log()[-4000:]}"
            )
        return result

    def ok(self, *args: str) -> str:
        return self.ctl(*args, check=True).stdout

    def call(self, op: str, args: dict[str, Any] | None = None) -> Any:
        with Client(self.socket) as c:
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


@pytest.fixture
def workdir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="netagent-test-"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def daemon(sandbox: Sandbox, workdir: Path, request: pytest.FixtureRequest) -> Iterator[Daemon]:
    firewall = getattr(request, "param", "nftables")
    d = Daemon(sandbox, workdir, firewall=firewall)
    d.start()
    try:
        yield d
    finally:
        if d.proc is not None and d.proc.poll() is None:
            d.stop()
