"""netagent under systemd: the unit files, readiness, the watchdog, socket activation, and
whether the hardening in netagent.service allows everything the daemon really does.

No systemd manager runs here (the tests may run in a container), so each part of the
contract is checked against systemd's own tools or the protocol itself: ``systemd-analyze
verify`` and ``security`` read the units; a datagram socket stands in for the manager's
NOTIFY_SOCKET; ``systemd-socket-activate`` passes the listening socket; and the daemon runs
under ``setpriv`` (the capability bounding set of the unit) and ``strace`` (to compare every
system call, address family and namespace it uses with the unit's filters)."""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import shutil
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from netagent.cli.sandbox import Sandbox
from tests.support.daemon import Daemon, netagent_script
from tests.support.notify import NotifyListener
from tests.support.protocol import request
from tests.support.units import SERVICE, SOCKET, setting
from tests.support.wait import wait_for


# ---- the unit files (their static checks are in tests/systemd) ----------------------
@pytest.mark.privileged
def test_systemd_analyze_verify_is_clean(tmp_path: Path) -> None:
    """``systemd-analyze verify`` checks that ExecStart= exists; the units name the usual
    install path /usr/local/bin/netagent, so it is provided in a private mount namespace
    of the check (nothing on the host changes)."""
    real = netagent_script()
    if real is None or not Path("/usr/local/bin").is_dir():
        pytest.skip("needs the netagent console script and /usr/local/bin")
    script = (
        'mount -t tmpfs tmpfs /usr/local/bin && ln -s "$1" /usr/local/bin/netagent '
        '&& shift && exec systemd-analyze verify "$@"'
    )
    result = subprocess.run(
        [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            script,
            "sh",
            real,
            str(SOCKET),
            str(SERVICE),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    output = result.stdout + result.stderr
    print(f"systemd-analyze verify: rc={result.returncode} output={output!r}")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "" and result.stderr.strip() == ""


@pytest.mark.privileged
def test_a_private_mount_namespace_would_hide_the_namespaces(sandbox: Sandbox) -> None:
    """Why the unit sets none of the options that imply a mount namespace: systemd gives
    such a service a copy of the mount table that receives mounts but sends none back (a
    slave), and ``ip netns add`` inside it leaves the host an empty file."""
    inside = sandbox.run(
        ["unshare", "--mount", "--propagation", "slave", "ip", "netns", "add", "hidden"],
        check=False,
    )
    assert inside.returncode == 0, inside.stderr
    outside = sandbox.run(["ip", "netns", "exec", "hidden", "true"], check=False)
    assert outside.returncode != 0 and "Invalid argument" in outside.stderr
    sandbox.run(["ip", "netns", "add", "shown"])  # the daemon's way: the host sees it
    assert sandbox.run(["ip", "netns", "exec", "shown", "true"], check=False).returncode == 0


# ---- readiness, status, watchdog ---------------------------------------------------
@pytest.fixture
def notify_listener(workdir: Path) -> Iterator[NotifyListener]:
    listener = NotifyListener(workdir / "notify.sock")
    try:
        yield listener
    finally:
        listener.close()


@pytest.mark.e2e
def test_ready_only_after_state_is_loaded_and_reconciled(
    sandbox: Sandbox, workdir: Path, notify_listener: NotifyListener
) -> None:
    first = Daemon(sandbox, workdir)
    first.start()
    first.ok("ns", "add", "red")
    first.ok("bridge", "add", "br0", "--address", "10.7.0.1/24")
    first.ok("plug", "red", "br0", "--address", "10.7.0.2/24")
    first.ok("forward", "8080", "10.7.0.2:80")
    assert first.stop() == 0
    # drift while the daemon is down: the bridge is gone
    first.sh("ip", "link", "del", "br0")

    d = Daemon(
        sandbox,
        workdir,
        env={"NOTIFY_SOCKET": str(notify_listener.path), "WATCHDOG_USEC": "300000"},
    )
    d.start(wait=False)
    wait_for("READY=1", lambda: notify_listener.having("READY=1"), timeout=20, detail=d.log)
    # the instant READY=1 arrives, the kernel already has what was lost, and it serves
    assert d.sh("ip", "link", "show", "br0", check=False).returncode == 0
    status = request(d.socket, "status")["result"]
    assert status["intents"] == 4
    ready_at, ready = notify_listener.having("READY=1")[0]
    summary = [line for line in ready.split("\n") if line.startswith("STATUS=")]
    assert summary == ["STATUS=1 namespaces, 1 bridges, 1 plugs, 1 forwards"], ready
    before = [m for t, m in notify_listener.messages if t < ready_at]
    assert any("STATUS=starting" in m for m in before), notify_listener.messages
    # this daemon's own log (the first one wrote the same lines to the same file)
    events = d.event_names(since_start=True)
    assert events.count("state loaded and reconciled") == 1, events
    assert events.index("state loaded and reconciled") < events.index("netagent ready")

    # the watchdog: pinged from the loop every WATCHDOG_USEC/2 = 0.15 s
    def pings() -> list[float]:
        return [t for t, _m in notify_listener.having("WATCHDOG=1") if t > ready_at]

    wait_for("8 watchdog pings after READY=1", lambda: len(pings()) >= 8, timeout=5)
    got = pings()
    gaps = [b - a for a, b in itertools.pairwise([ready_at, *got])]
    took = got[-1] - ready_at
    print(f"watchdog: {len(got)} pings in {took:.2f} s, largest gap {max(gaps):.3f} s")
    assert max(gaps) < 0.5

    # STATUS= follows the state
    d.ok("forward", "8081", "10.7.0.2:81")
    wait_for(
        "STATUS= saying 2 forwards",
        lambda: any("2 forwards" in m for _, m in notify_listener.messages),
        timeout=5,
    )

    assert d.stop() == 0
    wait_for("STOPPING=1", lambda: notify_listener.having("STOPPING=1"), timeout=5)


# ---- socket activation ---------------------------------------------------------------
def _activate_argv(path: str, *extra: str) -> list[str]:
    tool = shutil.which("systemd-socket-activate")
    if tool is None:
        pytest.skip("systemd-socket-activate is not installed")
    return [tool, "-l", path, *extra]


@pytest.mark.e2e
def test_socket_activation_takes_the_passed_socket(sandbox: Sandbox, workdir: Path) -> None:
    sock_path = str(workdir / "netagent.sock")
    d = Daemon(sandbox, workdir, wrap=_activate_argv(sock_path))
    d.start(wait=False)
    # systemd-socket-activate made and listens on the socket; the daemon is not running
    wait_for(f"a listening socket at {sock_path}", lambda: os.path.exists(sock_path))
    inode = os.stat(sock_path).st_ino
    d.wait_ready()  # the first connection activates the daemon and is served
    status = request(d.socket, "status")["result"]
    assert d.proc is not None
    assert status["pid"] == d.proc.pid  # exec'd in place: LISTEN_PID was right
    assert "using the socket systemd passed in" in d.event_names()
    d.ok("ns", "add", "red")
    assert d.stop() == 0
    # not the daemon's socket to remove: systemd keeps it for the next activation
    assert os.path.exists(sock_path) and os.stat(sock_path).st_ino == inode


@pytest.mark.e2e
def test_socket_activation_refuses_a_wrong_socket(sandbox: Sandbox, workdir: Path) -> None:
    sock_path = str(workdir / "netagent.sock")
    d = Daemon(
        sandbox, workdir, wrap=_activate_argv(sock_path, "--datagram"), with_socket_option=False
    )
    d.start(wait=False)
    wait_for(f"a listening socket at {sock_path}", lambda: os.path.exists(sock_path))
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.sendto(b"wake up", sock_path)  # activates it
    assert d.proc is not None
    assert d.proc.wait(20) != 0
    assert "not a listening Unix stream socket" in d.log()


# ---- the hardening allows what the daemon does -------------------------------------
def _expand(group: str, seen: set[str] | None = None) -> set[str]:
    """A systemd syscall group, nested groups included."""
    seen = set() if seen is None else seen
    if group in seen:
        return set()
    seen.add(group)
    out = subprocess.run(
        ["systemd-analyze", "syscall-filter", group],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    calls: set[str] = set()
    for line in out.splitlines()[1:]:
        item = line.strip()
        if not item or item.startswith("#"):
            continue
        calls |= _expand(item, seen) if item.startswith("@") else {item}
    return calls


def allowed_syscalls() -> set[str]:
    """SystemCallFilter= lines applied in order, as systemd does: the first (an allow
    list) sets the base, later ``~`` lines remove, later plain lines add."""
    allowed: set[str] = set()
    for value in setting(SERVICE, "SystemCallFilter"):
        deny = value.startswith("~")
        names: set[str] = set()
        for item in value.lstrip("~").split():
            names |= _expand(item) if item.startswith("@") else {item}
        allowed = allowed - names if deny else allowed | names
    return allowed


_CALL = re.compile(r"^(\d+)\s+(?:<\.\.\. )?([a-z_0-9]+)(?:\(| resumed>)")


def walk_under_trace(d: Daemon, firewall: str) -> None:
    d.ok("ns", "add", "red")
    d.ok("ns", "add", "blue")
    d.ok("bridge", "add", "br0", "--address", "10.8.0.1/24", "--masquerade")
    d.ok("plug", "red", "br0", "--address", "10.8.0.2/24")
    d.ok("wire", "red", "10.9.0.1/30", "blue", "10.9.0.2/30")
    d.ok("forward", "8080", "10.8.0.2:80")
    d.ok("attach", "add", "tap-*", "br0")
    d.sh("ip", "link", "add", "tap-x", "type", "veth", "peer", "name", "peer-x")
    wait_for(
        "tap-x attached to br0",
        lambda: "master br0" in d.sh("ip", "-o", "link", "show", "tap-x").stdout,
    )
    d.ok("unforward", "8080")
    d.ok("unplug", "red", "br0")
    d.ok("ns", "list")
    d.ok("links", "--ns", "red")
    status = request(d.socket, "status")["result"]
    assert status["firewall"] == firewall
    bounding = next(
        line.split()[1]
        for line in Path(f"/proc/{status['pid']}/status").read_text().splitlines()
        if line.startswith("CapBnd:")
    )
    assert int(bounding, 16) == (1 << 12) | (1 << 21)  # CAP_NET_ADMIN | CAP_SYS_ADMIN


def stop_traced(d: Daemon) -> None:
    """SIGTERM the daemon itself, strace's child (by pid): killing strace alone would
    detach it and leave it running."""
    assert d.proc is not None
    tracer = d.proc.pid
    children = Path(f"/proc/{tracer}/task/{tracer}/children")
    for pid in children.read_text().split() if children.exists() else []:
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), signal.SIGTERM)
    try:
        d.proc.wait(30)
    finally:
        d.box.stop(d.proc)


@pytest.mark.e2e
@pytest.mark.parametrize("firewall", ["nftables", "iptables"])
def test_hardening_allows_everything_the_daemon_does(
    sandbox: Sandbox, workdir: Path, firewall: str
) -> None:
    """Run the daemon with the unit's capability bounding set and NoNewPrivileges, traced
    by strace; drive a full walk; then every system call, socket family, namespace
    operation and memory mapping must be one the unit's filters allow."""
    if shutil.which("strace") is None or shutil.which("setpriv") is None:
        pytest.skip("needs strace and setpriv")
    caps = ",".join(
        "+" + c.removeprefix("CAP_").lower()
        for c in setting(SERVICE, "CapabilityBoundingSet")[0].split()
    )
    trace = workdir / "trace"
    wrap = [
        "setpriv",
        f"--bounding-set=-all,{caps}",
        "--inh-caps=-all",
        "--no-new-privs",
        "strace",
        "-f",
        "-qq",
        "-s",
        "0",
        "-o",
        str(trace),
    ]
    d = Daemon(sandbox, workdir, firewall=firewall, wrap=wrap)
    d.start(wait=False)
    try:
        d.wait_ready(60)
        walk_under_trace(d, firewall)
    finally:
        stop_traced(d)
    assert "Traceback" not in d.log(), d.log()

    used: set[str] = set()
    families: set[str] = set()
    namespaces: set[str] = set()
    wx: list[str] = []
    devices: set[str] = set()
    programs: set[str] = set()
    for line in trace.read_text().splitlines():
        m = _CALL.match(line)
        if m is None:
            continue
        call = m.group(2)
        used.add(call)
        if call in ("socket", "socketpair") and "(" in line:
            families.add(line.split("(", 1)[1].split(",", 1)[0])
        if call in ("unshare", "setns", "clone", "clone3"):
            namespaces |= set(re.findall(r"CLONE_NEW[A-Z]+", line))
        if call == "mmap" and "PROT_WRITE" in line and "PROT_EXEC" in line:
            wx.append(line)
        if call in ("mprotect", "pkey_mprotect") and "PROT_EXEC" in line:
            wx.append(line)
        if call == "execve" and '"' in line and "ENOENT" not in line:
            programs.add(Path(line.split('"')[1]).name)
        if call in ("open", "openat", "openat2") and '"/dev/' in line:
            devices.add(line.split('"')[1])
    allowed = allowed_syscalls()
    allowed_families = set(setting(SERVICE, "RestrictAddressFamilies")[0].split())
    flag = {"mnt": "CLONE_NEWNS"}  # the one whose flag is not CLONE_NEW + its name
    allowed_ns = {
        flag.get(n, "CLONE_NEW" + n.upper())
        for n in setting(SERVICE, "RestrictNamespaces")[0].split()
    }
    print(
        f"{firewall}: {len(used)} distinct system calls; families {sorted(families)}; "
        f"namespaces {sorted(namespaces)}; programs run {sorted(programs)}"
    )
    assert used - allowed == set(), f"blocked by SystemCallFilter=: {sorted(used - allowed)}"
    assert families <= allowed_families, families - allowed_families
    assert namespaces <= allowed_ns, namespaces - allowed_ns
    if setting(SERVICE, "MemoryDenyWriteExecute") == ["yes"]:
        assert wx == [], wx[:5]
    if setting(SERVICE, "DevicePolicy") == ["closed"]:
        assert devices <= PSEUDO_DEVICES, devices - PSEUDO_DEVICES


#: what DevicePolicy=closed still allows (systemd.resource-control(5))
PSEUDO_DEVICES = {"/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom"}


@pytest.mark.e2e
@pytest.mark.parametrize("missing", ["CAP_NET_ADMIN", "CAP_SYS_ADMIN"])
def test_each_kept_capability_is_needed(sandbox: Sandbox, workdir: Path, missing: str) -> None:
    """Without either capability the unit keeps, the daemon cannot do its job: it fails
    to start, or the walk fails with a clear error (and keeps serving)."""
    keep = [c for c in setting(SERVICE, "CapabilityBoundingSet")[0].split() if c != missing]
    caps = ",".join("+" + c.removeprefix("CAP_").lower() for c in keep)
    d = Daemon(
        sandbox,
        workdir,
        wrap=["setpriv", f"--bounding-set=-all,{caps}", "--inh-caps=-all", "--no-new-privs"],
    )
    d.start(wait=False)
    assert d.proc is not None
    try:
        d.wait_ready(20)
    except AssertionError:
        assert d.proc.poll() not in (None, 0)  # refused to start, with a message
        return
    results = [
        d.ctl(*args)
        for args in (
            ("ns", "add", "red"),
            ("bridge", "add", "br0", "--address", "10.8.0.1/24"),
            ("forward", "8080", "10.8.0.2:80"),
        )
    ]
    assert any(r.returncode != 0 for r in results), [r.stdout for r in results]
    assert request(d.socket, "status")["ok"]
