"""The ``netagent`` CNI plugin: one CNI call in, one request to the daemon, its answer out.

It implements the CNI specification 1.1.0 for configurations of cniVersion 0.4.0, 1.0.0
and 1.1.0 (``ADD``, ``DEL``, ``CHECK``, ``STATUS``, ``GC``, ``VERSION``): the ``CNI_*``
variables and the configuration on stdin become one ``cni`` request on the daemon's
socket (``/run/netagent/netagent.sock``, or the configuration's ``socket``); the
daemon's answer becomes the result on stdout, or the spec's error object (on stdout,
exit status 1) with a line on stderr. All state is the daemon's (``agent/cni.py``).

When the daemon cannot be reached, or does not answer in time:

* ADD fails at once with code 11 (try again later), and so do CHECK and GC;
* STATUS fails with code 50 (the plugin cannot serve ADD);
* DEL is recorded on disk (``queue``; the configuration's ``queueDir``, by default
  ``/var/lib/netagent/cni-queue``, the daemon's default state dir's) and succeeds: the
  daemon carries it out when it is back, and so does the next call that reaches it.

Every call ends within :data:`DEADLINE` seconds. Standard library only; started with
``python -I -S`` by the installed binary, it imports nothing else of netagent's (the
daemon's errors are mapped here by their numbers).
"""

from __future__ import annotations

import _socket
import os
import sys
import time

from . import jsonlite as json
from . import queue

TYPE_CHECKING = False  # not typing's: importing typing costs ~2 ms, and nothing here needs it
if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import IO, Any

SUPPORTED = ("0.4.0", "1.0.0", "1.1.0")
CURRENT = "1.1.0"
DEFAULT_SOCKET = "/run/netagent/netagent.sock"
#: seconds a whole call may take, replaying queued DELs included (the spec sets no
#: limit; runtimes wait minutes, but a pod should never wait that long on netagent)
DEADLINE = 8.0
#: seconds for connecting (the daemon takes connections from its start on)
CONNECT_TIMEOUT = 1.0
#: seconds of a call spent at most on replaying queued DELs
REPLAY_BUDGET = 2.0
MAX_STDIN = 4 << 20
MAX_REPLY = 4 << 20
PROTOCOL = 1

# the spec's codes, and netagent's own (100 and up; docs/cni.md)
INCOMPATIBLE_VERSION = 1
INVALID_ENVIRONMENT = 4
IO_FAILURE = 5
DECODE_FAILURE = 6
INVALID_CONFIG = 7
TRY_AGAIN_LATER = 11
NOT_AVAILABLE = 50
REFUSED = 100  # a conflict or something missing (netagent 3xxx)
NOT_ALLOWED = 101  # the socket's access rules (netagent 4xxx)
HOST_FAILED = 102  # the kernel or the firewall refused (netagent 5xxx)
PROTOCOL_MISMATCH = 103  # the daemon does not understand the request (netagent 1xxx)

#: the CNI_* variables each command needs (the spec's "required environment parameters")
REQUIRED = {
    "ADD": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"),
    "CHECK": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"),
    "DEL": ("CNI_CONTAINERID", "CNI_IFNAME"),
    "STATUS": (),
    "GC": (),
}


class PluginError(Exception):
    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code, self.msg, self.details = code, msg, details


class Unreachable(Exception):
    """The daemon cannot be reached, or did not answer in time."""


def cni_code(error: Mapping[str, Any]) -> int:
    """The CNI code for an error the daemon answered with: the one it names
    (``details.cni_code``), else by netagent's code range."""
    details = error.get("details")
    if isinstance(details, dict) and isinstance(details.get("cni_code"), int):
        code: int = details["cni_code"]
        return code
    number = error.get("code")
    if not isinstance(number, int):
        return HOST_FAILED
    if number == 5005:  # host-timeout: the kernel did not answer in time
        return TRY_AGAIN_LATER
    for low, code in (
        (1000, PROTOCOL_MISMATCH),
        (2000, INVALID_CONFIG),
        (3000, REFUSED),
        (4000, NOT_ALLOWED),
        (5000, HOST_FAILED),
    ):
        if low <= number < low + 1000:
            return code
    return HOST_FAILED


class Daemon:
    """One connection to the daemon's socket, each step within the call's deadline."""

    def __init__(self, path: str, deadline: float) -> None:
        self.path, self.deadline = path, deadline
        # _socket, not socket: the module costs ~5 ms to import (enum, selectors) and the
        # plugin needs a stream socket's five calls
        self.sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        self.sock.settimeout(max(0.01, min(CONNECT_TIMEOUT, self._left())))
        try:
            self.sock.connect(path)
        except FileNotFoundError:
            self.close()
            raise Unreachable(f"no netagent socket at {path}: is the daemon running?") from None
        except ConnectionRefusedError:
            self.close()
            raise Unreachable(f"nothing listens on {path}: the daemon is not running") from None
        except OSError as exc:
            self.close()
            raise Unreachable(f"cannot connect to {path}: {exc}") from None
        self.buf = b""
        self.next_id = 1

    def _left(self) -> float:
        return self.deadline - time.monotonic()

    def close(self) -> None:
        self.sock.close()

    def call(self, op: str, args: dict[str, Any], until: float | None = None) -> dict[str, Any]:
        """One request; the whole reply object."""
        end = min(self.deadline, until) if until is not None else self.deadline
        line = json.dumps({"v": PROTOCOL, "id": self.next_id, "op": op, "args": args})
        self.next_id += 1
        try:
            self.sock.settimeout(max(0.01, end - time.monotonic()))
            self.sock.sendall(line.encode() + b"\n")
            while b"\n" not in self.buf:
                left = end - time.monotonic()
                if left <= 0:
                    raise TimeoutError
                self.sock.settimeout(left)
                chunk = self.sock.recv(1 << 16)
                if not chunk:
                    raise Unreachable("the daemon closed the connection")
                self.buf += chunk
                if len(self.buf) > MAX_REPLY:
                    raise Unreachable("the daemon's reply is too large")
        except TimeoutError:
            raise Unreachable(
                f"the daemon did not answer within {DEADLINE:g} s (it may be starting or busy)"
            ) from None
        except OSError as exc:
            raise Unreachable(f"talking to the daemon failed: {exc}") from None
        reply, _, self.buf = self.buf.partition(b"\n")
        try:
            doc = json.loads(reply)
        except ValueError:
            raise Unreachable("the daemon's reply is not JSON") from None
        if not isinstance(doc, dict):
            raise Unreachable("the daemon's reply is not an object")
        return doc


def _read_config(stdin: IO[bytes]) -> dict[str, Any]:
    try:
        data = stdin.read(MAX_STDIN + 1)
    except OSError as exc:
        raise PluginError(IO_FAILURE, "cannot read the network configuration", str(exc)) from None
    if len(data) > MAX_STDIN:
        raise PluginError(IO_FAILURE, f"the network configuration is over {MAX_STDIN} bytes")
    try:
        doc = json.loads(data)
    except ValueError as exc:
        raise PluginError(
            DECODE_FAILURE, "the network configuration on stdin is not JSON", str(exc)
        ) from None
    if not isinstance(doc, dict):
        raise PluginError(DECODE_FAILURE, "the network configuration must be a JSON object")
    return doc


def _check_env(command: str, env: Mapping[str, str]) -> None:
    missing = [v for v in REQUIRED[command] if not env.get(v)]
    if missing:
        raise PluginError(
            INVALID_ENVIRONMENT,
            f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set",
            f"CNI {command} needs {', '.join(REQUIRED[command])}",
        )


def _request(command: str, env: Mapping[str, str], config: dict[str, Any]) -> dict[str, Any]:
    args: dict[str, Any] = {"command": command, "config": config}
    for var, name in (
        ("CNI_CONTAINERID", "container_id"),
        ("CNI_NETNS", "netns"),
        ("CNI_IFNAME", "ifname"),
        ("CNI_ARGS", "args"),
    ):
        value = env.get(var)
        if value:
            args[name] = value
    return args


def _replay(daemon: Daemon, directory: str, err: IO[str]) -> None:
    """DELs queued earlier, carried out before this call (a small share of its time)."""
    until = time.monotonic() + REPLAY_BUDGET
    for path in queue.pending(directory)[:32]:
        if time.monotonic() >= until:
            return
        record = queue.load(path)
        if record is None:
            queue.reject(path, "not a queued DEL")
            continue
        args: dict[str, Any] = {k: record[k] for k in ("command", "config", "queued_at")}
        for key, name in (
            ("containerID", "container_id"),
            ("ifname", "ifname"),
            ("netns", "netns"),
            ("args", "args"),
        ):
            if record.get(key):
                args[name] = record[key]
        reply = daemon.call("cni", args, until)
        if reply.get("ok"):
            queue.done(path)
            print(f"netagent: carried out a queued DEL ({os.path.basename(path)})", file=err)
        else:
            error = reply.get("error") or {}
            if isinstance(error.get("details"), dict) and "cni_code" in error["details"]:
                queue.reject(path, str(error.get("message")))


def _error(version: str, exc: PluginError, out: IO[str], err: IO[str]) -> int:
    doc = {"cniVersion": version, "code": exc.code, "msg": exc.msg}
    if exc.details:
        doc["details"] = exc.details
    print(json.dumps(doc), file=out)
    print(f"netagent: {exc.msg}" + (f" ({exc.details})" if exc.details else ""), file=err)
    return 1


def run(
    env: Mapping[str, str], stdin: IO[bytes], out: IO[str], err: IO[str], now: float | None = None
) -> int:
    """One CNI call; the exit status."""
    deadline = (now if now is not None else time.monotonic()) + DEADLINE
    command = env.get("CNI_COMMAND", "")
    version = CURRENT
    try:
        if command == "VERSION":
            try:
                asked = json.loads(stdin.read(MAX_STDIN) or b"{}").get("cniVersion")
            except (ValueError, AttributeError, OSError):
                asked = None
            answer = asked if isinstance(asked, str) and asked in SUPPORTED else CURRENT
            print(
                json.dumps({"cniVersion": answer, "supportedVersions": list(SUPPORTED)}), file=out
            )
            return 0
        if command not in REQUIRED:
            raise PluginError(
                INVALID_ENVIRONMENT,
                f"CNI_COMMAND {command!r} is not one of ADD, DEL, CHECK, STATUS, GC, VERSION"
                if command
                else "CNI_COMMAND is not set: this is netagent's CNI plugin, run by container "
                "runtimes (see `netagent cni install`)",
            )
        config = _read_config(stdin)
        asked = config.get("cniVersion")
        if asked not in SUPPORTED:
            raise PluginError(
                INCOMPATIBLE_VERSION,
                "incompatible CNI versions",
                f"the configuration has cniVersion {asked!r}; netagent supports "
                f"{', '.join(SUPPORTED)}",
            )
        assert isinstance(asked, str)
        version = asked
        _check_env(command, env)
        path = config.get("socket") if isinstance(config.get("socket"), str) else None
        queue_dir = config.get("queueDir") if isinstance(config.get("queueDir"), str) else None
        return _call(
            command,
            env,
            config,
            path or DEFAULT_SOCKET,
            queue_dir or queue.DEFAULT_DIR,
            deadline,
            out,
            err,
        )
    except PluginError as exc:
        return _error(version, exc, out, err)


def _call(
    command: str,
    env: Mapping[str, str],
    config: dict[str, Any],
    path: str,
    queue_dir: str,
    deadline: float,
    out: IO[str],
    err: IO[str],
) -> int:
    args = _request(command, env, config)
    try:
        daemon = Daemon(path, deadline)
        try:
            if queue.pending(queue_dir):
                _replay(daemon, queue_dir, err)
            reply = daemon.call("cni", args)
        finally:
            daemon.close()
    except Unreachable as exc:
        if command == "DEL":
            try:
                where = queue.enqueue(
                    queue_dir,
                    {
                        **{k: v for k, v in _record(env).items() if v},
                        "command": "DEL",
                        "config": config,
                    },
                )
            except OSError as qexc:
                raise PluginError(
                    TRY_AGAIN_LATER,
                    f"netagent is unreachable ({exc}) and the DEL cannot be queued",
                    f"{queue_dir}: {qexc}",
                ) from None
            print(
                f"netagent: {exc}; DEL queued in {where}, carried out when the daemon is back",
                file=err,
            )
            return 0
        code = NOT_AVAILABLE if command == "STATUS" else TRY_AGAIN_LATER
        raise PluginError(
            code, f"netagent is unreachable: {exc}", "try again when the daemon is up"
        ) from None
    if not reply.get("ok"):
        error = reply.get("error") or {}
        if not isinstance(error, dict):
            error = {}
        raise PluginError(
            cni_code(error),
            str(error.get("message") or "the daemon refused the request"),
            f"netagent error {error.get('code')} {error.get('name')}",
        )
    result = reply.get("result")
    if command == "ADD":
        body = result.get("result") if isinstance(result, dict) else None
        if not isinstance(body, dict):
            raise PluginError(PROTOCOL_MISMATCH, "the daemon's ADD answer holds no result")
        print(json.dumps(body), file=out)
    return 0


def _record(env: Mapping[str, str]) -> dict[str, str | None]:
    return {
        "containerID": env.get("CNI_CONTAINERID"),
        "ifname": env.get("CNI_IFNAME"),
        "netns": env.get("CNI_NETNS"),
        "args": env.get("CNI_ARGS"),
    }


def main() -> int:
    """The console script ``netagent-cni`` (and the installed ``netagent`` binary)."""
    return run(os.environ, sys.stdin.buffer, sys.stdout, sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
