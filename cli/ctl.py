"""What every ``netagent ctl`` command does: send one op, print the answer, exit.

Shared by the typer commands and the start-up fast path (``entry.py``), so both behave
exactly alike. Standard library only, and only what a command needs: the socket and the
JSON through :mod:`netagent.cli.wire`, the renderers once a reply is in, the picture
(``show --graph``) only when asked for (``docs/cli.md`` says why it matters).
"""

from __future__ import annotations

import sys

from .wire import Connection, Unreachable, socket_path

#: not typing.TYPE_CHECKING: importing typing costs ~1-3 ms (mypy reads this name alike)
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, NoReturn


def fail(message: str, status: int) -> NoReturn:
    print(f"netagent: {message}", file=sys.stderr)
    raise SystemExit(status)


def exchange(op: str, args: dict[str, Any], socket: str | None, as_json: bool) -> dict[str, Any]:
    """One request and its reply; a daemon that is not there ends the command (69)."""
    try:
        with Connection(socket_path(socket)) as conn:
            return conn.raw(op, args)
    except Unreachable as exc:
        if as_json:
            print(
                dumps_pretty(
                    {"ok": False, "error": {"code": 0, "name": "unreachable", "message": str(exc)}}
                )
            )
        fail(str(exc), Unreachable.exit_status)
    except OSError as exc:
        fail(f"talking to the daemon failed: {exc}", Unreachable.exit_status)


def run_op(
    op: str,
    args: dict[str, Any],
    socket: str | None,
    as_json: bool,
    local: dict[str, Any] | None = None,
) -> None:
    """Send ``op`` with ``args``; print the answer (``--json``: the reply as it came);
    exit with the status its error code means. ``local``: the command's own options
    (``show --graph ...``), which change how the answer is shown."""
    if local and op == "show" and any(local.values()):
        from .graph import show_graph

        show_graph(exchange(op, args, socket, False), local, as_json)
        return
    reply = exchange(op, args, socket, as_json)
    if as_json:
        print(dumps_pretty(reply))
        if not reply.get("ok"):
            raise SystemExit(exit_status(reply))
        _doctor_status(op, reply.get("result"))
        return
    if not reply.get("ok"):
        err = reply.get("error") or {}
        fail(
            f"{err.get('message', 'unknown error')} [{err.get('name')} {err.get('code')}]",
            exit_status(reply),
        )
    from .render import render

    render(op, reply.get("result"))
    _doctor_status(op, reply.get("result"))


def _doctor_status(op: str, result: Any) -> None:
    """``doctor`` exits 1 when it found a problem (0 only when nothing is wrong)."""
    if op == "doctor" and isinstance(result, dict) and result.get("problems"):
        raise SystemExit(1)


def check(reply: dict[str, Any]) -> Any:
    """The result of a reply, or the command ends with its error (as :func:`run_op`)."""
    if not reply.get("ok"):
        err = reply.get("error") or {}
        fail(
            f"{err.get('message', 'unknown error')} [{err.get('name')} {err.get('code')}]",
            exit_status(reply),
        )
    return reply.get("result")


def dumps_pretty(value: Any) -> str:
    import json

    return json.dumps(value, indent=2, sort_keys=True)


def exit_status(reply: dict[str, Any]) -> int:
    """The exit status an error reply means (``README``: 2 invalid input, 3 not found,
    4 conflict, 5 not allowed, 6 the host refused, 1 anything else)."""
    from .words import EXIT_STATUS

    code = (reply.get("error") or {}).get("code")
    return EXIT_STATUS.get(code, 1) if isinstance(code, int) else 1


def apply_file(path: str, prune: bool, socket: str | None, as_json: bool) -> None:
    """``ctl apply FILE``: a JSON document ``{"intents": [...]}`` (or ``-``: stdin)."""
    import json

    try:
        text = sys.stdin.read() if path == "-" else open(path).read()  # noqa: SIM115
        doc = json.loads(text)
    except OSError as exc:
        fail(f"cannot read {path}: {exc.strerror}", 2)
    except ValueError as exc:
        fail(f"{path} is not valid JSON: {exc}", 2)
    intents = doc.get("intents") if isinstance(doc, dict) else doc
    if not isinstance(intents, list):
        fail(f'{path}: expected {{"intents": [...]}} or a list of intents', 2)
    run_op("apply", {"intents": intents, "prune": prune}, socket, as_json)


def stream_events(socket: str | None, as_json: bool) -> None:
    import time

    try:
        with Connection(socket_path(socket)) as conn:
            conn.sock.settimeout(None)
            check(conn.raw("events"))
            while True:
                msg = conn.read_message()
                if not isinstance(msg, dict) or "event" not in msg:
                    continue
                event = msg["event"]
                if as_json:
                    import json

                    print(json.dumps(event), flush=True)
                else:
                    ts = time.strftime("%H:%M:%S", time.localtime(event.get("ts", 0)))
                    ms = f"{event.get('ts', 0) % 1:.3f}"[1:]
                    print(
                        f"{ts}{ms} {event.get('type', '?'):<14} {event.get('message', '')}",
                        flush=True,
                    )
    except Unreachable as exc:
        fail(str(exc), Unreachable.exit_status)
    except KeyboardInterrupt:
        pass
