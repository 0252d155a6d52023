"""Opening and emptying a sandbox (``netagent.cli.sandbox.Sandbox``).

Closing a sandbox kills, by pid, the processes the test started in it. That is not
enough when one of them was killed with SIGKILL: a daemon killed so leaves its ``nft
monitor`` child behind, and that process would hold the sandbox's network namespace
(and its links, namespaces and rules) alive after the test. So before closing, each
started process gets SIGTERM and time to exit, and whatever is still inside the
sandbox's network namespace is then killed by pid.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path

from netagent.cli.sandbox import Sandbox


def processes_in(box: Sandbox) -> dict[int, str]:
    """Processes in the sandbox's network namespace (pid -> command line), besides the
    one holding it."""
    target = os.readlink(f"/proc/{box.pid}/ns/net")
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == box.pid:
            continue
        try:
            if os.readlink(f"/proc/{entry}/ns/net") == target:
                cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ")
                found[int(entry)] = cmd.decode(errors="replace").strip()
        except OSError:
            continue
    return found


def stop_everything_in(box: Sandbox) -> None:
    """SIGTERM each process started in the sandbox (by pid) and wait for it, then
    SIGKILL (by pid) what is still in its network namespace."""
    for proc in box.children:
        box.stop(proc, signal.SIGTERM, timeout=10)
    for pid in processes_in(box):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def open_sandbox() -> Iterator[Sandbox]:
    """A fresh sandbox, emptied and closed afterwards whatever happens."""
    box = Sandbox()
    try:
        yield box
    finally:
        try:
            stop_everything_in(box)
        finally:
            box.close()


@contextlib.contextmanager
def scratch_dir() -> Iterator[Path]:
    """A private directory under /tmp for sockets and state. Not pytest's ``tmp_path``:
    a Unix socket path must stay under 108 bytes, and those paths grow with test
    names."""
    path = Path(tempfile.mkdtemp(prefix="netagent-test-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
