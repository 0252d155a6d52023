"""Who may talk to the daemon: root and the socket group change things, the read-only
group only looks, anyone else is refused (and logged with uid and pid).

Real non-root users run the client. The project's interpreter lives under /root (0700),
out of their reach, so they run the system's python3 on the source tree: the CLI's
read-only commands through its real entry point, changes through ``ctl.run_op``, the
function every ``netagent ctl`` command ends in (standard library only, as the CLI's fast
path is). The users and groups are system accounts created once and left in place
(``useradd --system``, no home, no login shell)."""

from __future__ import annotations

import grp
import json
import os
import pwd
import shutil
import stat
import struct
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from netagent.cli.sandbox import Sandbox
from tests.support.daemon import Daemon
from tests.support.protocol import request
from tests.support.state import snapshot
from tests.support.units import REPO

ADMIN_GROUP = "natest-admin"
RO_GROUP = "natest-ro"
#: user -> supplementary groups in /etc/group
USERS = {"natest-admin": [ADMIN_GROUP], "natest-ro": [RO_GROUP], "natest-none": []}
SYSTEM_PYTHON = "/usr/bin/python3"

pytestmark = pytest.mark.e2e


def _ensure_accounts() -> None:
    for group in (ADMIN_GROUP, RO_GROUP):
        try:
            grp.getgrnam(group)
        except KeyError:
            subprocess.run(["groupadd", "--system", group], check=True, timeout=60)
    for user, groups in USERS.items():
        try:
            pwd.getpwnam(user)
        except KeyError:
            argv = [
                "useradd",
                "--system",
                "--no-create-home",
                "--home-dir",
                "/nonexistent",
                "--shell",
                "/usr/sbin/nologin",
                "--gid",
                "nogroup",
            ]
            if groups:
                argv += ["--groups", ",".join(groups)]
            subprocess.run([*argv, user], check=True, timeout=60)


@pytest.fixture(scope="module")
def accounts() -> None:
    for tool in ("useradd", "groupadd", "setpriv"):
        if shutil.which(tool) is None:
            pytest.skip(f"needs {tool}")
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        pytest.skip(f"needs {SYSTEM_PYTHON} for the non-root client")
    if os.geteuid() != 0:
        pytest.skip("needs root to create the test users")
    _ensure_accounts()


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str

    def reply(self) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(self.stdout)
        return result


def as_user(user: str, argv: list[str], groups: str | None = None) -> Run:
    """Run argv as ``user``: uid, primary group nogroup, supplementary groups from
    /etc/group (``--init-groups``) or exactly ``groups``."""
    group_opt = (
        ["--init-groups"]
        if groups is None
        else (["--clear-groups"] if groups == "" else [f"--groups={groups}"])
    )
    env = {
        "PATH": "/usr/bin:/bin",
        "PYTHONPATH": str(REPO),
        "PYTHONDONTWRITEBYTECODE": "1",
        "LANG": "C.UTF-8",
    }
    r = subprocess.run(
        ["setpriv", f"--reuid={user}", "--regid=nogroup", *group_opt, "--", *argv],
        capture_output=True,
        text=True,
        env=env,
        cwd="/",
        timeout=30,
    )
    return Run(r.returncode, r.stdout, r.stderr)


def cli(user: str, sock: str, *args: str, groups: str | None = None) -> Run:
    """The real CLI (its read-only fast path) as another user."""
    return as_user(
        user, [SYSTEM_PYTHON, "-m", "netagent", "ctl", "--socket", sock, "--json", *args], groups
    )


_RUN_OP = (
    "import json, os, sys\n"
    "from netagent.cli.ctl import run_op\n"
    "print(os.getpid(), file=sys.stderr, flush=True)\n"
    "run_op(sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], True)\n"
)


def op(user: str, sock: str, name: str, args: dict[str, Any], groups: str | None = None) -> Run:
    """One op as another user, through the function every ctl command calls."""
    return as_user(user, [SYSTEM_PYTHON, "-c", _RUN_OP, name, json.dumps(args), sock], groups)


def acl_groups(path: str) -> dict[int, int]:
    """gid -> permission bits of the named-group entries of a file's access ACL."""
    try:
        raw = os.getxattr(path, "system.posix_acl_access")
    except OSError:
        return {}
    out = {}
    for off in range(4, len(raw), 8):
        tag, perm, ident = struct.unpack("<HHI", raw[off : off + 8])
        if tag == 0x08:
            out[ident] = perm
    return out


@pytest.fixture
def guarded(accounts: None, sandbox: Sandbox, workdir: Path) -> Iterator[Daemon]:
    os.chmod(workdir, 0o711)  # the users may reach the socket, not list the directory
    d = Daemon(
        sandbox, workdir, extra=["--socket-group", ADMIN_GROUP, "--readonly-group", RO_GROUP]
    )
    d.start()
    try:
        yield d
    finally:
        if d.proc is not None and d.proc.poll() is None:
            d.stop()


def test_socket_is_0660_root_group_with_readonly_acl(guarded: Daemon) -> None:
    st = os.stat(guarded.socket)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o660
    assert st.st_uid == 0
    assert st.st_gid == grp.getgrnam(ADMIN_GROUP).gr_gid
    assert acl_groups(guarded.socket) == {grp.getgrnam(RO_GROUP).gr_gid: 6}


def test_socket_group_member_may_change_things(guarded: Daemon) -> None:
    r = cli("natest-admin", guarded.socket, "status")
    assert r.returncode == 0, r.stderr
    assert r.reply()["ok"] is True
    r = op("natest-admin", guarded.socket, "ns.add", {"name": "adm"})
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.reply()["result"]["changed"] is True
    assert "adm" in guarded.sh("ip", "netns", "list").stdout


def test_readonly_group_member_may_only_look(guarded: Daemon) -> None:
    guarded.ok("ns", "add", "red")
    before = snapshot(guarded)
    for args in (("status",), ("show",), ("ns", "list"), ("forwards",), ("links",)):
        r = cli("natest-ro", guarded.socket, *args)
        assert r.returncode == 0, (args, r.stdout, r.stderr)
        assert r.reply()["ok"] is True
    changes: list[tuple[str, dict[str, Any]]] = [
        ("ns.add", {"name": "ro"}),
        ("ns.del", {"name": "red"}),
        ("fwd.add", {"host_ports": 80, "destination": "10.0.0.2:80"}),
        ("purge", {}),
    ]
    for name, change in changes:
        r = op("natest-ro", guarded.socket, name, change)
        assert r.returncode == 5, (name, r.stdout, r.stderr)  # PermissionDenied's status
        err = r.reply()["error"]
        assert err["name"] == "read-only" and "may only look" in err["message"]
    assert snapshot(guarded) == before


def test_anyone_else_is_refused_and_logged(guarded: Daemon) -> None:
    # by the file's permissions first ...
    r = cli("natest-none", guarded.socket, "status")
    assert r.returncode == 69 and "permission denied" in r.stdout, r.stdout + r.stderr
    # ... and by SO_PEERCRED when the file is too open (e.g. a SocketMode=0666 mistake)
    os.chmod(guarded.socket, 0o666)
    before = snapshot(guarded)
    r = op("natest-none", guarded.socket, "ns.add", {"name": "intruder"})
    assert r.returncode == 5, r.stdout + r.stderr
    err = r.reply()["error"]
    uid = pwd.getpwnam("natest-none").pw_uid
    assert err["name"] == "permission-denied"
    assert f"uid {uid}" in err["message"] and ADMIN_GROUP in err["message"]
    client_pid = int(r.stderr.split()[0])
    refusals = [
        e for e in guarded.log_events() if e.get("event", "").startswith("connection refused")
    ]
    assert refusals and refusals[-1]["peer_uid"] == uid
    assert refusals[-1]["peer_pid"] == client_pid
    assert refusals[-1]["level"] == "warning"
    assert snapshot(guarded) == before
    # the daemon keeps serving everyone else
    assert request(guarded.socket, "status")["ok"]


def test_access_follows_the_process_credentials(guarded: Daemon) -> None:
    """Groups are the connecting process's own (SO_PEERGROUPS), as for the file's
    permissions: not what /etc/group says now."""
    os.chmod(guarded.socket, 0o666)
    ro_gid = grp.getgrnam(RO_GROUP).gr_gid
    admin_gid = grp.getgrnam(ADMIN_GROUP).gr_gid
    # listed in no group, but the process has the read-only group: looks, cannot change
    r = cli("natest-none", guarded.socket, "status", groups=str(ro_gid))
    assert r.returncode == 0, r.stdout + r.stderr
    r = op("natest-none", guarded.socket, "ns.add", {"name": "x"}, groups=str(ro_gid))
    assert r.reply()["error"]["name"] == "read-only"
    # listed in the admin group, but the process dropped it: refused
    r = op("natest-admin", guarded.socket, "ns.add", {"name": "x"}, groups="")
    assert r.reply()["error"]["name"] == "permission-denied"
    r = op("natest-none", guarded.socket, "ns.add", {"name": "x"}, groups=str(admin_gid))
    assert r.reply()["ok"] is True
