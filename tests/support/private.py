"""Private state for container tools inside a sandbox, and the processes they leave.

Podman, containerd, dockerd, crun and libcni write to fixed paths that no flag moves
(``/var/lib/containers/cache``, ``/var/lib/cni/results``, ``/run/containers/networks``,
``/run/crun``, ``/run/containerd/s``; see docs/runtimes.md). Most of those directories do
not even exist on the host, so a tmpfs cannot simply be mounted on them without creating
them in the host's file system first. Instead, :func:`private_tree` turns ``/run``,
``/var/lib``, ``/etc`` and ``/opt`` into copy-on-write overlays inside the sandbox's mount
namespace, with their upper layers in a tmpfs: the tools see the host's files, and every
write lands in memory that disappears with the sandbox. The host's file system is never
written.

The tools' helpers (conmon, containerd shims) double-fork and are re-parented to PID 1,
so :class:`netagent.cli.sandbox.Sandbox` cannot stop them: :func:`owned_processes` finds
them by a marker in their command line (a state path unique to one runtime instance) and
:func:`kill_processes` ends them by PID.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path

from netagent.cli.sandbox import Sandbox

from .wait import WaitTimeout, wait_for

OVERLAID = ("/run", "/var/lib", "/etc", "/opt")

# Runs inside the sandbox: overlay each directory (keeping the mounts below it, such as
# the sandbox's own /run/netns, by moving a recursive bind of them back on top), then
# detach the scratch tmpfs (overlayfs holds a private clone of its upper mount, so the
# overlays keep working and nothing is left mounted on the host's scratch directory).
_OVERLAY = r"""
import os, subprocess, sys
scratch, dirs = sys.argv[1], sys.argv[2:]
def mounts():
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, right = line.split(" - ", 1)
            out.append((left.split()[4].replace("\\040", " "), right.split()[0]))
    return out
def top(d):
    last = [t for m, t in mounts() if m == d]
    return last[-1] if last else None
def run(*argv):
    subprocess.run(argv, check=True, timeout=30)
todo = [d for d in dirs if top(d) != "overlay"]
if not todo:
    sys.exit(0)
run("mount", "-t", "tmpfs", "-o", "mode=0700", "tmpfs", scratch)
for i, d in enumerate(todo):
    subs = sorted({m for m, _ in mounts() if m.startswith(d + "/")})
    tops = [m for m in subs if not any(m.startswith(s + "/") for s in subs)]
    kept = []
    for j, m in enumerate(tops):
        keep = f"{scratch}/keep-{i}-{j}"
        os.mkdir(keep)
        run("mount", "--rbind", m, keep)
        kept.append((keep, m))
    up, work = f"{scratch}/up-{i}", f"{scratch}/work-{i}"
    os.mkdir(up)
    os.mkdir(work)
    run("mount", "-t", "overlay", "overlay", "-o",
        f"lowerdir={d},upperdir={up},workdir={work}", d)
    for keep, m in kept:
        run("mount", "--move", keep, m)
run("umount", "-l", scratch)
"""


def private_tree(box: Sandbox, dirs: Iterable[str] = OVERLAID) -> None:
    """Make ``dirs`` copy-on-write overlays in the sandbox (idempotent: a directory that
    is an overlay already is left as it is, so several runtimes can share one sandbox).

    Mounts below an overlaid directory stay where they were: ``/run/netns`` keeps the
    sandbox's namespaces, including those made before this call.
    """
    scratch = tempfile.mkdtemp(prefix="netagent-priv-")
    try:
        box.run([sys.executable, "-c", _OVERLAY, scratch, *dirs], timeout=60)
    finally:
        os.rmdir(scratch)  # empty on the host; only ever mounted inside the sandbox


def mount_tmpfs(box: Sandbox, path: str, mode: str = "0755") -> None:
    """A fresh tmpfs on ``path`` inside the sandbox (made in the private overlay)."""
    box.run(["mkdir", "-p", path], timeout=10)
    box.run(["mount", "-t", "tmpfs", "-o", f"mode={mode}", "tmpfs", path], timeout=10)


def bind(box: Sandbox, source: str, target: str, readonly: bool = False) -> None:
    box.run(["mkdir", "-p", target], timeout=10)
    box.run(["mount", "--bind", source, target], timeout=10)
    if readonly:
        box.run(["mount", "-o", "remount,bind,ro", target], timeout=10)


def unmount(box: Sandbox, path: str) -> None:
    """Unmount ``path`` (lazily if something still holds it)."""
    if box.run(["umount", path], check=False, timeout=10).returncode != 0:
        box.run(["umount", "-l", path], check=False, timeout=10)


def cgroup_view(box: Sandbox) -> None:
    """Mount the unified cgroup hierarchy read-only on the sandbox's ``/sys/fs/cgroup``.

    The sandbox's fresh sysfs leaves ``/sys/fs/cgroup`` empty, and crun refuses to start
    ("invalid file system type on '/sys/fs/cgroup'") even when cgroups are disabled,
    because it detects the cgroup mode from that mount. Read-only: the runtimes here run
    with cgroups disabled, so nothing may create a cgroup in the host's hierarchy.
    """
    r = box.run(["stat", "-f", "-c", "%T", "/sys/fs/cgroup"], timeout=10)
    if r.stdout.strip() != "cgroup2fs":
        box.run(
            ["mount", "-t", "cgroup2", "-o", "ro,nosuid,nodev,noexec", "cgroup2", "/sys/fs/cgroup"],
            timeout=10,
        )


# ---- processes ---------------------------------------------------------------------
def _processes() -> dict[int, tuple[int, str, str, str]]:
    """pid -> (ppid, state, mount namespace, command line) for every process now."""
    out: dict[int, tuple[int, str, str, str]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
            mnt = os.readlink(f"/proc/{entry}/ns/mnt")
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        out[int(entry)] = (int(fields[1]), fields[0], mnt, cmdline)
    return out


def owned_processes(box: Sandbox, markers: Iterable[str], pids: Iterable[int] = ()) -> list[int]:
    """Processes in the sandbox's mount namespace whose command line holds one of
    ``markers``, the given ``pids``, and all their descendants (container processes live
    in mount namespaces of their own, below a conmon or a shim)."""
    marks = [m for m in markers if m]
    procs = _processes()
    box_mnt = os.readlink(f"/proc/{box.pid}/ns/mnt")
    roots = {p for p in pids if p in procs}
    roots |= {
        pid
        for pid, (_, _, mnt, cmd) in procs.items()
        if mnt == box_mnt and any(m in cmd for m in marks)
    }
    roots -= {os.getpid(), box.pid}
    found, todo = set(roots), list(roots)
    while todo:
        parent = todo.pop()
        for pid, (ppid, *_rest) in procs.items():
            if ppid == parent and pid not in found:
                found.add(pid)
                todo.append(pid)
    return sorted(found)


def kill_processes(pids: Iterable[int], timeout: float = 10) -> list[int]:
    """SIGKILL each PID, then wait until each is gone or a zombie; returns those that
    were still alive. Zombies are left to their parent (PID 1 reaps re-parented ones)."""
    pids = list(pids)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)

    def alive() -> list[int]:
        procs = _processes()
        return [p for p in pids if p in procs and procs[p][1] != "Z"]

    with contextlib.suppress(WaitTimeout):  # what is still alive is the answer
        wait_for("killed processes to exit", lambda: not alive(), timeout=timeout)
    return alive()


# ---- crun: the rlimit workaround ------------------------------------------------------
_CRUN_WRAPPER = """#!{python}
# crun wrapper written by tests/support/private.py: drops the OCI process.rlimits
# (setting them needs CAP_SYS_RESOURCE, which this machine's root lacks){cg_note}.
import json, os, sys
args = sys.argv[1:]
for i, a in enumerate(args):
    bundle = None
    if a in ("--bundle", "-b") and i + 1 < len(args):
        bundle = args[i + 1]
    elif a.startswith("--bundle="):
        bundle = a.split("=", 1)[1]
    if bundle:
        path = os.path.join(bundle, "config.json")
        with open(path) as f:
            spec = json.load(f)
        spec.get("process", {{}}).pop("rlimits", None)
        with open(path, "w") as f:
            json.dump(spec, f)
os.execv("/usr/bin/crun", ["crun", *{extra!r}, *args])
"""


def crun_wrapper(directory: Path, disable_cgroups: bool) -> Path:
    """Write the crun wrapper into ``directory``; with ``disable_cgroups`` it also runs
    crun with ``--cgroup-manager=disabled`` (for containerd and dockerd, which always ask
    for a cgroup; Podman is told ``cgroups = "disabled"`` itself)."""
    path = directory / ("crun-nocgroup" if disable_cgroups else "crun-norlimits")
    extra = ["--cgroup-manager=disabled"] if disable_cgroups else []
    note = ", and runs crun without cgroups" if disable_cgroups else ""
    path.write_text(_CRUN_WRAPPER.format(python=sys.executable, extra=extra, cg_note=note))
    path.chmod(0o755)
    return path
