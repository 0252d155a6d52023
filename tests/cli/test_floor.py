"""The CLI at the floor: a ``ctl`` command loads nothing but the few small modules it needs
(no typer, no request classes, not even ``typing``, ``socket`` or ``json``), and still
prints, exits and fails exactly as before. Against a stand-in daemon on a Unix socket
(no root); the figures themselves are ``make bench``'s (section ``floor``)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

#: what a ``ctl`` command may import beyond what ``python -c pass`` has loaded
ALLOWED = {
    "netagent",
    "netagent.cli",
    "netagent.cli.entry",
    "netagent.agent",
    "netagent.agent.argv",
    "netagent.cli.words",
    "netagent.cli.wire",
    "netagent.cli.ctl",
    "netagent.cli.render",
    "_socket",
    "_json",
    # ``from __future__ import annotations`` (~0.1 ms; interpreters whose start-up
    # imports it already, as setuptools' editable finder's does, do not count it)
    "__future__",
}
HEAVY = {"typing", "socket", "json", "typer", "anyio", "structlog", "pyroute2", "pydantic"}
#: the console script, as pip writes it, minus its ``import re``
SCRIPT = "import sys; sys.argv[0] = 'netagent'; from netagent.cli.entry import main; main()"

REPLIES: dict[str, dict[str, Any]] = {
    "status": {
        "version": "0.1.0",
        "pid": 1,
        "uptime_s": 1.0,
        "socket": "s",
        "state_dir": "d",
        "firewall": "nftables",
        "summary": "1 namespaces",
        "failing": {},
    },
    "ns.add": {
        "changed": True,
        "changes": [{"key": "ns/red", "action": "added", "what": "namespace red"}],
        "changes_total": 1,
        "actions": {"ns/red": ["create namespace red"]},
    },
}


@pytest.fixture
def stand_in(tmp_path: Path) -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """A Unix socket answering each request line: ``REPLIES[op]``, or not-found."""
    path = str(tmp_path / "s.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(8)
    server.settimeout(0.2)
    seen: list[dict[str, Any]] = []
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            with conn, conn.makefile("rwb") as f:
                for line in f:
                    req = json.loads(line)
                    seen.append(req)
                    result = REPLIES.get(req["op"])
                    if result is None:
                        reply = {
                            "v": 1,
                            "id": req["id"],
                            "ok": False,
                            "error": {"code": 3001, "name": "not-found", "message": "no such"},
                        }
                    else:
                        reply = {"v": 1, "id": req["id"], "ok": True, "result": result}
                    f.write(json.dumps(reply).encode() + b"\n")
                    f.flush()

    worker = threading.Thread(target=serve, daemon=True)
    worker.start()
    try:
        yield path, seen
    finally:
        stop.set()
        worker.join(5)
        server.close()


def run(*argv: str, importtime: bool = False) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "NETAGENT_SOCKET"}
    if importtime:
        env["PYTHONPROFILEIMPORTTIME"] = "1"
    return subprocess.run(
        [sys.executable, "-c", SCRIPT, *argv],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


def imported(stderr: str) -> set[str]:
    return {
        line.rsplit("|", 1)[1].strip()
        for line in stderr.splitlines()
        if line.startswith("import time:") and "|" in line
    }


def baseline() -> set[str]:
    env = {**os.environ, "PYTHONPROFILEIMPORTTIME": "1"}
    done = subprocess.run(
        [sys.executable, "-c", "pass"], capture_output=True, text=True, timeout=60, env=env
    )
    return imported(done.stderr)


def test_a_command_loads_only_what_it_needs(stand_in: tuple[str, list[Any]]) -> None:
    path, seen = stand_in
    before = baseline()
    for words in (["status"], ["ns", "add", "red"], ["ns", "del", "nope"]):
        done = run("ctl", "--socket", path, *words, importtime=True)
        extra = imported(done.stderr) - before
        assert extra <= ALLOWED, f"ctl {' '.join(words)} also imported {sorted(extra - ALLOWED)}"
        assert not extra & HEAVY
    assert [r["op"] for r in seen] == ["status", "ns.add", "ns.del"]
    assert seen[1]["args"] == {"name": "red"}


def test_it_prints_and_exits_as_before(stand_in: tuple[str, list[Any]]) -> None:
    path, _seen = stand_in
    done = run("ctl", "--socket", path, "status")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == "netagent 0.1.0 (pid 1), up 1.0s"
    done = run("ctl", "--socket", path, "ns", "add", "red")
    assert done.stdout.splitlines() == [
        "added: namespace red",
        "  ns/red: create namespace red",
    ]
    done = run("ctl", "--socket", path, "ns", "del", "nope")
    assert (done.returncode, done.stdout) == (3, "")
    assert done.stderr.strip() == "netagent: no such [not-found 3001]"
    done = run("ctl", "--socket", path, "--json", "ns", "del", "nope")
    assert done.returncode == 3
    assert json.loads(done.stdout)["error"]["name"] == "not-found"


def test_output_to_a_reader_that_went_away_is_no_traceback(
    stand_in: tuple[str, list[Any]],
) -> None:
    path, _seen = stand_in
    env = {k: v for k, v in os.environ.items() if k != "NETAGENT_SOCKET"}
    r, w = os.pipe()
    os.close(r)  # nobody reads
    try:
        done = subprocess.run(
            [sys.executable, "-c", SCRIPT, "ctl", "--socket", path, "status"],
            stdout=w,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
            env=env,
        )
    finally:
        os.close(w)
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
