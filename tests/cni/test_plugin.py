"""The CNI plugin without a daemon and with a stand-in for one (no root): the spec's
environment, stdin and error objects, its codes, the daemon-down behaviour (ADD, CHECK
and GC 11, STATUS 50, DEL queued and carried out by the next call), time limits, and the
plugin's start-up (standard library only)."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from netagent.cni import plugin, queue

Reply = Callable[[dict[str, Any]], dict[str, Any] | None]
CONF = {"cniVersion": "1.0.0", "name": "podnet", "type": "netagent", "bridge": "cni0"}
ENV = {
    "CNI_COMMAND": "ADD",
    "CNI_CONTAINERID": "c1",
    "CNI_NETNS": "/run/netns/c1",
    "CNI_IFNAME": "eth0",
    "CNI_ARGS": "IgnoreUnknown=1",
    "CNI_PATH": "/opt/cni/bin",
}
RESULT = {"cniVersion": "1.0.0", "interfaces": [], "ips": [], "routes": [], "dns": {}}


class FakeDaemon:
    """A socket that answers each request with ``reply(request)`` (None: no answer)."""

    def __init__(self, path: str, reply: Reply) -> None:
        self.path, self.reply = path, reply
        self.requests: list[dict[str, Any]] = []
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        self.sock.listen(16)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        self.sock.settimeout(0.05)
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        buf = b""
        with conn:
            conn.settimeout(10)
            while not self.stop.is_set():
                try:
                    chunk = conn.recv(1 << 16)
                except OSError:
                    return
                if not chunk:
                    return
                buf += chunk
                while b"\n" in buf:
                    line, _, buf = buf.partition(b"\n")
                    req = json.loads(line)
                    self.requests.append(req)
                    answer = self.reply(req)
                    if answer is None:
                        self.stop.wait(5)
                        return
                    conn.sendall(json.dumps({"v": 1, "id": req["id"], **answer}).encode() + b"\n")

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.sock.close()


@pytest.fixture
def short_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="na-cni-"))
    try:
        yield d
    finally:
        import shutil

        shutil.rmtree(d, ignore_errors=True)


def run(
    env: dict[str, str], conf: dict[str, Any] | bytes | None, **overrides: str
) -> tuple[int, Any, str, float]:
    """(exit status, stdout as JSON or None, stderr, seconds)."""
    data = conf if isinstance(conf, bytes) else json.dumps(conf).encode() if conf else b""
    out, err = io.StringIO(), io.StringIO()
    t0 = time.monotonic()
    code = plugin.run({**env, **overrides}, io.BytesIO(data), out, err)
    took = time.monotonic() - t0
    text = out.getvalue().strip()
    return code, json.loads(text) if text else None, err.getvalue(), took


def conf_for(tmp: Path, **extra: Any) -> dict[str, Any]:
    return {**CONF, "socket": str(tmp / "na.sock"), "queueDir": str(tmp / "queue"), **extra}


def test_version_needs_nothing() -> None:
    code, out, _err, _ = run({"CNI_COMMAND": "VERSION"}, {"cniVersion": "0.4.0"})
    assert (code, out) == (
        0,
        {"cniVersion": "0.4.0", "supportedVersions": ["0.4.0", "1.0.0", "1.1.0"]},
    )
    code, out, _err, _ = run({"CNI_COMMAND": "VERSION"}, None)
    assert out["cniVersion"] == "1.1.0"


@pytest.mark.parametrize(
    ("env", "conf", "code", "text"),
    [
        ({}, CONF, 4, "CNI_COMMAND is not set"),
        ({"CNI_COMMAND": "FROB"}, CONF, 4, "'FROB' is not one of"),
        (ENV, b"{not json", 6, "not JSON"),
        (ENV, b"[1]", 6, "must be a JSON object"),
        (ENV, {**CONF, "cniVersion": "0.3.1"}, 1, "incompatible CNI versions"),
        (ENV, {**CONF, "cniVersion": None}, 1, "incompatible CNI versions"),
        ({**ENV, "CNI_NETNS": ""}, CONF, 4, "CNI_NETNS is not set"),
        ({"CNI_COMMAND": "DEL"}, CONF, 4, "CNI_CONTAINERID, CNI_IFNAME are not set"),
    ],
)
def test_spec_errors_before_the_daemon_is_asked(
    env: dict[str, str], conf: Any, code: int, text: str
) -> None:
    status, out, err, _ = run(env, conf)
    assert status == 1 and out["code"] == code, out
    assert text in out["msg"] + out.get("details", "")
    assert out["cniVersion"] in plugin.SUPPORTED
    assert err.startswith("netagent: ")


def test_daemon_down_add_check_gc_fail_at_once_status_50(short_dir: Path) -> None:
    conf = conf_for(short_dir)
    for command, code in (("ADD", 11), ("CHECK", 11), ("GC", 11), ("STATUS", 50)):
        status, out, _err, took = run(ENV, conf, CNI_COMMAND=command)
        assert (status, out["code"]) == (1, code), (command, out)
        assert "netagent is unreachable" in out["msg"] and took < 1.0
        assert out["cniVersion"] == "1.0.0"
    assert queue.pending(str(short_dir / "queue")) == []


def test_daemon_down_del_is_queued_and_the_next_call_carries_it_out(short_dir: Path) -> None:
    conf = conf_for(short_dir, prevResult=RESULT)
    status, out, err, _ = run(ENV, conf, CNI_COMMAND="DEL")
    assert (status, out) == (0, None) and "DEL queued in" in err
    [path] = queue.pending(str(short_dir / "queue"))
    record = queue.load(path)
    assert record is not None
    assert {k: record[k] for k in ("command", "containerID", "ifname", "netns", "args")} == {
        "command": "DEL",
        "containerID": "c1",
        "ifname": "eth0",
        "netns": "/run/netns/c1",
        "args": "IgnoreUnknown=1",
    }
    assert record["config"] == conf and abs(record["queued_at"] - time.time()) < 60
    status, _out, _err, _ = run({**ENV, "CNI_NETNS": ""}, conf, CNI_COMMAND="DEL")
    assert len(queue.pending(str(short_dir / "queue"))) == 2  # without a netns, too

    daemon = FakeDaemon(
        str(short_dir / "na.sock"), lambda req: {"ok": True, "result": {"result": RESULT}}
    )
    try:
        status, out, err, _ = run(ENV, conf_for(short_dir))
        assert (status, out) == (0, RESULT)
    finally:
        daemon.close()
    ops = [(r["op"], r["args"]["command"]) for r in daemon.requests]
    assert ops == [("cni", "DEL"), ("cni", "DEL"), ("cni", "ADD")]
    assert all("queued_at" in r["args"] for r in daemon.requests[:2])
    assert daemon.requests[0]["args"]["container_id"] == "c1"
    assert queue.pending(str(short_dir / "queue")) == []


def test_a_request_per_call_and_the_daemons_answer(short_dir: Path) -> None:
    answers: list[dict[str, Any]] = [{"ok": True, "result": {"result": RESULT}}]
    daemon = FakeDaemon(str(short_dir / "na.sock"), lambda req: answers[-1])
    try:
        status, out, _err, _ = run(ENV, conf_for(short_dir))
        assert (status, out) == (0, RESULT)
        [req] = daemon.requests
        assert req["op"] == "cni" and req["v"] == 1
        assert req["args"] == {
            "command": "ADD",
            "config": conf_for(short_dir),
            "container_id": "c1",
            "netns": "/run/netns/c1",
            "ifname": "eth0",
            "args": "IgnoreUnknown=1",
        }
        answers.append({"ok": True, "result": {"result": None}})
        for command in ("DEL", "CHECK", "STATUS", "GC"):
            assert run(ENV, conf_for(short_dir), CNI_COMMAND=command)[:2] == (0, None)
        answers.append(
            {
                "ok": False,
                "error": {
                    "code": 3004,
                    "name": "port-in-use",
                    "message": "host port 8080/tcp is already forwarded",
                },
            }
        )
        status, out, _err, _ = run(ENV, conf_for(short_dir))
        assert (status, out["code"]) == (1, plugin.REFUSED)
        assert out["msg"] == "host port 8080/tcp is already forwarded"
        assert out["details"] == "netagent error 3004 port-in-use"
        answers.append(
            {
                "ok": False,
                "error": {"code": 2001, "name": "x", "message": "m", "details": {"cni_code": 2}},
            }
        )
        assert run(ENV, conf_for(short_dir))[1]["code"] == 2
    finally:
        daemon.close()


def test_cni_codes_for_netagents_errors_are_pinned() -> None:
    cases = {
        1001: 103,  # the daemon does not understand the request
        2003: 7,  # an invalid value: the configuration's
        3001: 100,  # something missing
        3004: 100,  # a conflict
        4001: 101,  # not allowed on the socket
        5002: 102,  # the host refused
        5005: 11,  # the kernel did not answer in time: try again
    }
    assert {n: plugin.cni_code({"code": n}) for n in cases} == cases
    assert plugin.cni_code({"code": 3004, "details": {"cni_code": 110}}) == 110
    assert plugin.cni_code({}) == 102


def test_a_daemon_that_does_not_answer_is_given_up_on_in_time(
    short_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(plugin, "DEADLINE", 0.5)
    daemon = FakeDaemon(str(short_dir / "na.sock"), lambda req: None)
    try:
        status, out, _err, took = run(ENV, conf_for(short_dir))
        assert (status, out["code"]) == (1, 11) and "did not answer within 0.5 s" in out["msg"]
        assert took < 2
        status, out, err, took = run(ENV, conf_for(short_dir), CNI_COMMAND="DEL")
        assert (status, out) == (0, None) and "DEL queued" in err and took < 2
    finally:
        daemon.close()
    assert len(queue.pending(str(short_dir / "queue"))) == 1


def test_the_default_socket_and_queue(monkeypatch: pytest.MonkeyPatch, short_dir: Path) -> None:
    seen: list[str] = []

    class Refuse(plugin.Daemon):
        def __init__(self, path: str, deadline: float) -> None:
            seen.append(path)
            raise plugin.Unreachable("no")

    monkeypatch.setattr(plugin, "Daemon", Refuse)
    monkeypatch.setattr(queue, "DEFAULT_DIR", str(short_dir / "default-queue"))
    run(ENV, CONF)
    assert seen == ["/run/netagent/netagent.sock"]
    assert plugin.DEFAULT_SOCKET == "/run/netagent/netagent.sock"


def test_the_plugin_imports_only_the_standard_library() -> None:
    """Started as the installed binary starts it (``-I -S``), the plugin loads none of
    netagent's daemon or CLI and nothing from site-packages."""
    repo = Path(__file__).resolve().parents[2]
    code = (
        f"import sys; sys.path.insert(0, {str(repo)!r}); import netagent.cni.plugin; "
        "print('\\n'.join(sorted(sys.modules)))"
    )
    r = subprocess.run(
        [sys.executable, "-I", "-S", "-c", code],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    mods = set(r.stdout.split())
    ours = {m for m in mods if m.startswith("netagent")}
    assert ours == {
        "netagent",
        "netagent.cni",
        "netagent.cni.jsonlite",
        "netagent.cni.plugin",
        "netagent.cni.queue",
    }
    heavy = {"typing", "typer", "anyio", "pyroute2", "structlog", "pathlib", "asyncio"}
    # nor what costs milliseconds to import: json (re, enum), socket (enum, selectors)
    assert not mods & (heavy | {"json", "re", "enum", "socket", "selectors", "contextlib"})
    assert os.path.exists(plugin.__file__)
