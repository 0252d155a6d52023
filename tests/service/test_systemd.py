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
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from netagent.agent import sdnotify
from netagent.cli.sandbox import Sandbox

from .helpers import REPO, ServiceDaemon, request, wait_for

UNITS = REPO / "systemd"
SERVICE = UNITS / "netagent.service"
SOCKET = UNITS / "netagent.socket"


def unit_settings(path: Path) -> list[tuple[str, str]]:
    """(key, value) of every assignment, in order (continuation lines are not used)."""
    out = []
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line[0] in "#;[":
            continue
        key, _, value = line.partition("=")
        out.append((key.strip(), value.strip()))
    return out


def setting(path: Path, key: str) -> list[str]:
    return [v for k, v in unit_settings(path) if k == key]


# ---- the unit files ------------------------------------------------------------------
def test_units_say_what_the_issue_asks() -> None:
    s = dict(unit_settings(SERVICE))
    assert s["Type"] == "notify"
    assert s["Restart"] == "on-failure"
    assert s["StateDirectory"] == "netagent"
    assert s["RuntimeDirectory"] == "netagent"
    assert s["WatchdogSec"]
    assert s["NotifyAccess"] == "main"
    assert set(s["CapabilityBoundingSet"].split()) == {"CAP_NET_ADMIN", "CAP_SYS_ADMIN"}
    sock = dict(unit_settings(SOCKET))
    assert sock["ListenStream"] == "/run/netagent/netagent.sock"
    assert (sock["SocketMode"], sock["SocketUser"], sock["SocketGroup"]) == (
        "0660",
        "root",
        "netagent",
    )
    assert s["Group"] == sock["SocketGroup"]


@pytest.mark.privileged
def test_systemd_analyze_verify_is_clean(tmp_path: Path) -> None:
    """``systemd-analyze verify`` checks that ExecStart= exists; the units name the usual
    install path /usr/local/bin/netagent, so it is provided in a private mount namespace
    of the check (nothing on the host changes)."""
    real = shutil.which("netagent")
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


# What ``systemd-analyze security`` leaves open, and why. A setting that opens up, or one
# that is closed, fails the test so this table (and the report) stays true.
OPEN_SETTINGS = {
    "User=/DynamicUser=": "root is needed: setns/unshare and bind mounts under /run/netns; "
    "the bounding set keeps only CAP_NET_ADMIN and CAP_SYS_ADMIN",
    "PrivateNetwork=": "its job is the host's network",
    "CapabilityBoundingSet=~CAP_SYS_ADMIN": "ip netns add / setns need it",
    "CapabilityBoundingSet=~CAP_NET_ADMIN": "links, routes, nftables, conntrack need it",
    "SystemCallFilter=~@mount": "ip netns add bind-mounts the namespace under /run/netns",
    "RestrictNamespaces=~net": "it creates network namespaces",
    "RestrictAddressFamilies=~AF_NETLINK": "netlink is how it talks to the kernel",
    "RestrictAddressFamilies=~AF_UNIX": "its own socket, sd_notify",
    "PrivateMounts=": "mount namespace: the /run/netns bind mounts would not reach the host",
    "ProtectSystem=": "mount namespace (as above)",
    "ProtectHome=": "mount namespace (as above)",
    "PrivateTmp=": "mount namespace (as above)",
    "PrivateDevices=": "mount namespace (as above); DevicePolicy=closed limits devices",
    "ProtectKernelTunables=": "mount namespace, and it must write net.ipv4.ip_forward",
    "ProtectKernelModules=": "mount namespace (CAP_SYS_MODULE is dropped anyway)",
    "ProtectKernelLogs=": "mount namespace (CAP_SYSLOG is dropped anyway)",
    "ProtectControlGroups=": "mount namespace",
    "ProtectProc=": "mount namespace; it reads /proc/self/ns and /proc/sys/net",
    "ProcSubset=": "mount namespace (as above)",
    "PrivateUsers=": "capabilities in a user namespace do not reach the host's network",
    "RootDirectory=/RootImage=": "runs ip, nft, iptables, conntrack from the host",
    "DeviceAllow=": "ProtectClock= adds char-rtc read access",
}


def test_systemd_analyze_security_exposure() -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--no-pager", str(SERVICE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    out = result.stdout
    score = re.search(r"Overall exposure level for netagent\.service: ([0-9.]+)", out)
    assert score is not None, out + result.stderr
    open_now = {m.group(1) for m in re.finditer(r"^✗ (\S+)", out, re.M)}
    print(f"systemd-analyze security: exposure {score.group(1)}; open: {sorted(open_now)}")
    assert float(score.group(1)) <= 4.0
    assert open_now == set(OPEN_SETTINGS), open_now ^ set(OPEN_SETTINGS)


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
class NotifyListener:
    """Stands in for systemd's NOTIFY_SOCKET: collects (time, message) datagrams."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, str]] = []
        self.closed = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.closed:
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            self.messages.append((time.monotonic(), data.decode()))

    def having(self, prefix: str) -> list[tuple[float, str]]:
        """Messages with a line starting with ``prefix`` (e.g. READY=1, STATUS=)."""
        return [
            (t, m)
            for t, m in list(self.messages)
            if any(line.startswith(prefix) for line in m.split("\n"))
        ]

    def close(self) -> None:
        self.closed = True
        self.thread.join(2)
        self.sock.close()


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
    first = ServiceDaemon(sandbox, workdir)
    first.start()
    first.ok("ns", "add", "red")
    first.ok("bridge", "add", "br0", "--address", "10.7.0.1/24")
    first.ok("plug", "red", "br0", "--address", "10.7.0.2/24")
    first.ok("forward", "8080", "10.7.0.2:80")
    assert first.stop() == 0
    # drift while the daemon is down: the bridge is gone
    first.sh("ip", "link", "del", "br0")

    d = ServiceDaemon(
        sandbox,
        workdir,
        env={"NOTIFY_SOCKET": str(notify_listener.path), "WATCHDOG_USEC": "300000"},
    )
    d.start(wait=False)
    assert wait_for(lambda: notify_listener.having("READY=1"), timeout=20), d.log()
    # the instant READY=1 arrives, the kernel already has what was lost, and it serves
    assert d.sh("ip", "link", "show", "br0", check=False).returncode == 0
    status = request(d.socket, "status")["result"]
    assert status["intents"] == 4
    ready_at, ready = notify_listener.having("READY=1")[0]
    summary = [line for line in ready.split("\n") if line.startswith("STATUS=")]
    assert summary == ["STATUS=1 namespaces, 1 bridges, 1 plugs, 1 forwards"], ready
    before = [m for t, m in notify_listener.messages if t < ready_at]
    assert any("STATUS=starting" in m for m in before), notify_listener.messages
    events = [e.get("event") for e in d.log_events()]
    assert events.index("state loaded and reconciled") < events.index("netagent ready")

    # the watchdog: pinged from the loop every WATCHDOG_USEC/2 = 0.15 s
    time.sleep(1.2)
    pings = [t for t, m in notify_listener.having("WATCHDOG=1") if t > ready_at]
    gaps = [b - a for a, b in itertools.pairwise(pings)]
    print(f"watchdog: {len(pings)} pings in 1.2 s, largest gap {max(gaps):.3f} s")
    assert len(pings) >= 5 and max(gaps) < 0.5

    # STATUS= follows the state
    d.ok("forward", "8081", "10.7.0.2:81")
    assert wait_for(lambda: any("2 forwards" in m for _, m in notify_listener.messages), 3)

    assert d.stop() == 0
    assert wait_for(lambda: notify_listener.having("STOPPING=1"), 3)


def test_watchdog_stops_when_the_event_loop_hangs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A thread would keep petting a wedged loop; the task must not: while the loop is
    blocked for 0.8 s, no WATCHDOG=1 may arrive (systemd would then restart us)."""
    listener = NotifyListener(tmp_path / "notify.sock")
    monkeypatch.setenv("NOTIFY_SOCKET", str(listener.path))
    monkeypatch.setenv("WATCHDOG_USEC", "100000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    blocked: list[float] = []

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(sdnotify.watchdog_loop, lambda: "ok")
            await anyio.sleep(0.3)
            blocked.append(time.monotonic())
            time.sleep(0.8)  # the loop hangs
            blocked.append(time.monotonic())
            await anyio.sleep(0.3)
            tg.cancel_scope.cancel()

    try:
        anyio.run(main)
    finally:
        listener.close()
    pings = [t for t, _ in listener.having("WATCHDOG=1")]
    inside = [t for t in pings if blocked[0] + 0.01 < t < blocked[1] - 0.01]
    assert len(pings) >= 5 and not inside, (pings, blocked)
    assert listener.having("STATUS=ok")


def test_notify_speaks_the_protocol(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Path and abstract (@) sockets; nothing at all without NOTIFY_SOCKET; LISTEN_FDS only
    for the right pid, and cleared for children."""
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sdnotify.notify("READY=1") is False
    name = f"@netagent-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name[1:])
        monkeypatch.setenv("NOTIFY_SOCKET", name)
        assert sdnotify.notify("READY=1\nSTATUS=a\nb")
        assert sock.recv(100) == b"READY=1\nSTATUS=a\nb"
    assert sdnotify.one_line("3 namespaces,\n 1 bridges") == "3 namespaces, 1 bridges"
    monkeypatch.setenv("LISTEN_PID", str(os.getpid() + 1))
    monkeypatch.setenv("LISTEN_FDS", "1")
    assert sdnotify.listen_fds() == []
    monkeypatch.setenv("LISTEN_PID", str(os.getpid()))
    monkeypatch.setenv("LISTEN_FDS", "2")
    monkeypatch.setenv("LISTEN_FDNAMES", "a:b")
    assert sdnotify.listen_fds() == [3, 4]
    monkeypatch.setenv("LISTEN_FDS", "0")
    assert sdnotify.listen_fds(unset_environment=True) == []
    assert "LISTEN_FDS" not in os.environ and "LISTEN_PID" not in os.environ
    monkeypatch.setenv("WATCHDOG_USEC", "bogus")
    assert sdnotify.watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert sdnotify.watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert sdnotify.watchdog_interval() == 1.0


# ---- socket activation ---------------------------------------------------------------
def _activate_argv(path: str, *extra: str) -> list[str]:
    tool = shutil.which("systemd-socket-activate")
    if tool is None:
        pytest.skip("systemd-socket-activate is not installed")
    return [tool, "-l", path, *extra]


@pytest.mark.e2e
def test_socket_activation_takes_the_passed_socket(sandbox: Sandbox, workdir: Path) -> None:
    sock_path = str(workdir / "netagent.sock")
    d = ServiceDaemon(sandbox, workdir, wrap=_activate_argv(sock_path))
    d.start(wait=False)
    # systemd-socket-activate made and listens on the socket; the daemon is not running
    assert wait_for(lambda: os.path.exists(sock_path), 10)
    inode = os.stat(sock_path).st_ino
    d.wait_ready()  # the first connection activates the daemon and is served
    status = request(d.socket, "status")["result"]
    assert d.proc is not None
    assert status["pid"] == d.proc.pid  # exec'd in place: LISTEN_PID was right
    assert "using the socket systemd passed in" in [e.get("event") for e in d.log_events()]
    d.ok("ns", "add", "red")
    assert d.stop() == 0
    # not the daemon's socket to remove: systemd keeps it for the next activation
    assert os.path.exists(sock_path) and os.stat(sock_path).st_ino == inode


@pytest.mark.e2e
def test_socket_activation_refuses_a_wrong_socket(sandbox: Sandbox, workdir: Path) -> None:
    sock_path = str(workdir / "netagent.sock")
    d = ServiceDaemon(
        sandbox, workdir, wrap=_activate_argv(sock_path, "--datagram"), with_socket_option=False
    )
    d.start(wait=False)
    assert wait_for(lambda: os.path.exists(sock_path), 10)
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
        ["systemd-analyze", "syscall-filter", group], capture_output=True, text=True, check=True
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


def walk_under_trace(d: ServiceDaemon, firewall: str) -> None:
    d.ok("ns", "add", "red")
    d.ok("ns", "add", "blue")
    d.ok("bridge", "add", "br0", "--address", "10.8.0.1/24", "--masquerade")
    d.ok("plug", "red", "br0", "--address", "10.8.0.2/24")
    d.ok("wire", "red", "10.9.0.1/30", "blue", "10.9.0.2/30")
    d.ok("forward", "8080", "10.8.0.2:80")
    d.ok("attach", "add", "tap-*", "br0")
    d.sh("ip", "link", "add", "tap-x", "type", "veth", "peer", "name", "peer-x")
    assert wait_for(lambda: "master br0" in d.sh("ip", "-o", "link", "show", "tap-x").stdout, 10)
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


def stop_traced(d: ServiceDaemon) -> None:
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
    d = ServiceDaemon(sandbox, workdir, firewall=firewall, wrap=wrap)
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
    d = ServiceDaemon(
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
