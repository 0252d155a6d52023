"""Requests over the daemon's socket, for every ``ctl`` command and for :class:`Client`.

A ``ctl`` command should cost about what starting the interpreter costs: everything it
does besides must take a few milliseconds at most (``docs/cli.md``). So this talks to
CPython's C modules directly: ``_socket`` (``import socket`` also imports ``selectors``,
``enum``, ``array``: ~3 ms here) and ``_json``'s scanner and string quoting (``import
json`` pulls in ``re`` and three modules of its own: 1-4 ms), falling back to ``json``
on an interpreter without ``_json``. Replies are one JSON object per line
(``agent/protocol.py``).
"""

from __future__ import annotations

import _socket
import os
import sys

#: not typing.TYPE_CHECKING: importing typing costs ~1-3 ms (mypy reads this name alike)
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

VERSION = 1  # agent/protocol.py's, which the fast path does not import
DEFAULT_SOCKET = "/run/netagent/netagent.sock"


def _c_json() -> Any:
    """CPython's ``_json`` (the C half of ``json``), or None: then ``json`` does it."""
    try:
        import _json
    except ImportError:
        return None
    return _json


_C: Any = _c_json()


class Unreachable(Exception):
    """The daemon is not there (not running, wrong --socket, no permission on the file)."""

    exit_status = 69  # EX_UNAVAILABLE


def socket_path(explicit: str | None = None) -> str:
    return explicit or os.environ.get("NETAGENT_SOCKET") or DEFAULT_SOCKET


class _Context:
    """What ``_json``'s scanner reads off a ``json.JSONDecoder``: plain JSON."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    parse_constant = float  # NaN, Infinity, -Infinity


def _loader() -> Callable[[str], Any]:
    if _C is None:
        import json

        return json.loads
    scan = _C.make_scanner(_Context())

    def loads(text: str) -> Any:
        try:
            value, _end = scan(text, 0)
        except StopIteration:
            raise ValueError("not JSON") from None
        return value

    return loads


def dumps(value: Any) -> str:
    """Compact JSON, ASCII only, like ``json.dumps(separators=(",", ":"))``. A large
    document (``apply``) has loaded ``json`` already: its C encoder is faster."""
    json = sys.modules.get("json")
    if json is not None or _C is None:
        import json as json_

        return json_.dumps(value, separators=(",", ":"), ensure_ascii=True)
    return _dump(value)


def _dump(v: Any) -> str:
    if isinstance(v, str):
        quoted: str = _C.encode_basestring_ascii(v)
        return quoted
    if v is True:
        return "true"
    if v is False:
        return "false"
    if v is None:
        return "null"
    if isinstance(v, int):
        return str(int(v))
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, dict):
        return "{" + ",".join(f"{_dump(str(k))}:{_dump(x)}" for k, x in v.items()) + "}"
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_dump(x) for x in v) + "]"
    raise TypeError(f"cannot send a {type(v).__name__}")


def connect(path: str, timeout: float | None) -> Any:
    """A connected stream socket, or :class:`Unreachable` saying what to do."""
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
    except FileNotFoundError:
        sock.close()
        raise Unreachable(
            f"no netagent socket at {path}: is the daemon running "
            "(`netagent run`, or `systemctl start netagent`)? Use --socket or "
            "NETAGENT_SOCKET for another path"
        ) from None
    except PermissionError:
        sock.close()
        raise Unreachable(
            f"permission denied on {path}: run as root or as a member of the netagent group"
        ) from None
    except ConnectionRefusedError:
        sock.close()
        raise Unreachable(f"nothing listens on {path}: the daemon is not running") from None
    except BaseException:
        sock.close()
        raise
    return sock


class Connection:
    """One connection: requests sent in turn, each answered by one line."""

    def __init__(self, path: str, timeout: float | None = 60.0) -> None:
        self.sock = connect(path, timeout)
        self._buf = b""
        self._next_id = 1
        self._loads = _loader()

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def readline(self) -> bytes:
        while b"\n" not in self._buf:
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                raise Unreachable("the daemon closed the connection")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line

    def read_message(self) -> Any:
        try:
            line = self.readline()
        except ConnectionResetError:
            raise Unreachable("the daemon closed the connection") from None
        try:
            return self._loads(line.decode())
        except ValueError:  # UnicodeDecodeError too
            raise Unreachable("the daemon sent something that is not JSON") from None

    def raw(self, op: str, args: dict[str, Any] | None = None) -> dict[str, Any]:
        """Send one request; return the whole reply object."""
        req = {"v": VERSION, "id": self._next_id, "op": op, "args": args or {}}
        self._next_id += 1
        try:  # noqa: SIM105 (contextlib is one more import for every command)
            self.sock.sendall(dumps(req).encode() + b"\n")
        except (BrokenPipeError, ConnectionResetError):
            # the daemon stopped reading (a request over its size limit) and said why
            # before it hung up: that answer is the one to show, not "Broken pipe"
            pass
        reply = self.read_message()
        if not isinstance(reply, dict):
            raise Unreachable("the daemon sent something that is not a reply")
        return reply
