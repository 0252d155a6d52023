"""Untrusted paths with a real unprivileged user: a socket directory they own (their
own listener swapped in), a state directory they own (a planted ``lock`` link to a
root-owned file), a journal they may write (an injected line with a valid checksum).
The daemon refuses to start, names the path and the command that fixes it, and acts on
nothing of theirs; once fixed, it starts."""

from __future__ import annotations

import os
import pwd
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from netagent.cli.sandbox import Sandbox
from tests.service.test_access import SYSTEM_PYTHON, accounts, as_user  # noqa: F401
from tests.support.daemon import Daemon
from tests.support.state import nft_forwards

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("accounts")]

USER = "natest-none"

#: the user's own server on the socket path: it answers anything with a made-up "ok"
LISTENER = r"""
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.bind(sys.argv[1])
s.listen(8)
print("listening", flush=True)
while True:
    c, _ = s.accept()
    print("connected", flush=True)
    c.sendall(b'{"ok": true, "result": {"version": "theirs"}}\n')
    c.close()
"""

#: the user appends a journal line for a forward of their choosing, checksum and all
INJECT = r"""
import json, sys, zlib
path = sys.argv[1]
lines = open(path, "rb").read().splitlines()
seq = json.loads(lines[-1])["seq"] + 1
changes = [{"key": "fwd/tcp/9999", "intent": {"kind": "forward", "proto": "tcp",
            "host_port": 9999, "dest_ip": "10.6.0.99", "dest_port": 22}}]
crc = zlib.crc32(json.dumps(changes, separators=(",", ":"), sort_keys=True).encode())
with open(path, "ab") as f:
    f.write(json.dumps({"seq": seq, "changes": changes, "crc": crc}).encode() + b"\n")
"""


def uid() -> int:
    return pwd.getpwnam(USER).pw_uid


@pytest.fixture
def reachable(workdir: Path) -> Path:
    os.chmod(workdir, 0o711)  # the user may reach paths below, not list them
    return workdir


def refusal(d: Daemon) -> str:
    code, log = d.run_to_exit()
    print(f"exit {code}: {log.strip().splitlines()[-1]}")
    assert code == 6, log
    assert "Traceback" not in log and "netagent ready" not in log
    return log


@pytest.fixture
def their_listener(reachable: Path) -> Iterator[tuple[Path, subprocess.Popen[str]]]:
    """A socket directory the user owns, with the user's listener on netagent's path."""
    sockdir = reachable / "run"
    sockdir.mkdir(mode=0o755)
    os.chown(sockdir, uid(), -1)
    path = sockdir / "netagent.sock"
    proc = subprocess.Popen(
        [
            "setpriv",
            f"--reuid={USER}",
            "--regid=nogroup",
            "--clear-groups",
            "--",
            SYSTEM_PYTHON,
            "-c",
            LISTENER,
            str(path),
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd="/",
        env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "listening"
        yield path, proc
    finally:
        proc.kill()  # ours, by pid
        proc.wait(10)


def test_a_socket_directory_the_user_owns_is_refused(
    sandbox: Sandbox, reachable: Path, their_listener: tuple[Path, subprocess.Popen[str]]
) -> None:
    path, proc = their_listener
    d = Daemon(sandbox, reachable)
    d.socket = str(path)
    log = refusal(d)
    assert f"socket directory {path.parent} is owned by uid {uid()} ({USER}), not root" in log
    assert f"`chown root:root {path.parent}`" in log
    proc.kill()
    out, _ = proc.communicate(timeout=10)
    assert "connected" not in out  # the daemon never talked to their listener
    # the directory fixed, their socket is still there: refused too, never replaced
    os.chown(path.parent, 0, 0)
    log = refusal(d)
    assert f"the socket {path} was made by uid {uid()}, not by root" in log
    assert f"`rm {path}`" in log
    os.unlink(path)
    d.start()
    assert os.lstat(path).st_uid == 0
    d.stop()


def test_a_planted_lock_link_never_truncates_a_root_file(sandbox: Sandbox, reachable: Path) -> None:
    precious = reachable / "precious"
    precious.write_text("root's own data\n")
    d = Daemon(sandbox, reachable)
    d.state_dir.mkdir(mode=0o755)
    os.chown(d.state_dir, uid(), -1)
    r = as_user(USER, ["ln", "-s", str(precious), str(d.state_dir / "lock")])
    assert r.returncode == 0, r.stderr
    log = refusal(d)
    assert f"state directory {d.state_dir} is owned by uid {uid()} ({USER}), not root" in log
    assert precious.read_text() == "root's own data\n"
    # the directory given back to root, the link they left is still refused
    os.chown(d.state_dir, 0, 0)
    os.chmod(d.state_dir, 0o700)
    log = refusal(d)
    assert f"{d.state_dir / 'lock'} is a symbolic link (to {precious})" in log
    assert f"`rm {d.state_dir / 'lock'}`" in log
    assert precious.read_text() == "root's own data\n"
    os.unlink(d.state_dir / "lock")
    d.start()
    assert d.status()["intents"] == 0
    assert precious.read_text() == "root's own data\n"
    d.stop()


@pytest.mark.parametrize("how", ["owned by the user", "writable by everyone"])
def test_an_injected_journal_line_is_not_carried_out(
    sandbox: Sandbox, reachable: Path, how: str
) -> None:
    d = Daemon(sandbox, reachable)
    d.start()
    d.ok("forward", "9001", "10.6.0.2:80")
    assert d.stop() == 0
    os.chmod(d.state_dir, 0o711)  # a careless restore: the user reaches the journal ...
    journal = d.state_dir / "journal.jsonl"
    if how == "owned by the user":
        os.chown(journal, uid(), -1)  # ... and owns it
    else:
        os.chmod(journal, 0o666)  # ... and may write it
    r = as_user(USER, [SYSTEM_PYTHON, "-c", INJECT, str(journal)])
    assert r.returncode == 0, r.stderr
    assert b"fwd/tcp/9999" in journal.read_bytes()
    log = refusal(d)
    if how == "owned by the user":
        assert f"state file {journal} is owned by uid {uid()} ({USER}), not root" in log
        assert f"`chown root:root {journal}`" in log
    else:
        assert f"state file {journal} is writable by everyone" in log
        assert f"`chmod o-w {journal}`" in log
    # nothing of theirs was carried out: the kernel holds what root asked for
    assert set(nft_forwards(d)) == {("tcp", 9001, "10.6.0.2:80")}
