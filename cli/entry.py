"""The ``netagent`` console script.

A ``ctl`` command should cost about what starting Python costs (``docs/cli.md``). typer
costs ~150-250 ms to import and build here (it pulls in pydantic and rich), and even the
request classes of ``agent/ops.py`` cost ~10 ms. So every ``ctl`` command line that is
plainly valid is parsed here, with the one parser (``agent/argv.py``) over the requests'
shapes, compiled from ``agent/ops.py`` into a literal table (``cli/words.py``), and sent
at once; anything else (``--help``, completion, a mistake typer should explain, ``run``,
``demo``) goes through typer, whose commands are built from the same declarations.

A command that went the fast way ends with ``os._exit`` once its output is flushed:
tearing the interpreter down (modules, the heap) costs ~15-20 % of a ``python -c pass``
here and frees nothing the kernel does not.
"""

from __future__ import annotations

import os
import sys

#: set while a shell asks for completions: that is typer's (click's) work
COMPLETE_ENV = "_NETAGENT_COMPLETE"


def _fast(argv: list[str]) -> bool:
    """Handle a ``ctl`` command without typer; False when typer should."""
    if len(argv) < 2 or argv[0] != "ctl" or COMPLETE_ENV in os.environ:
        return False
    rest = argv[1:]
    socket: str | None = None
    as_json = False
    while rest and rest[0].startswith("-"):
        word = rest[0]
        if word == "--json":
            as_json, rest = True, rest[1:]
        elif word == "--socket" and len(rest) > 1:
            socket, rest = rest[1], rest[2:]
        elif word.startswith("--socket="):
            socket, rest = word.split("=", 1)[1], rest[1:]
        else:
            return False
    if "--json" in rest:
        as_json = True
        rest = [w for w in rest if w != "--json"]
    sock = socket or os.environ.get("NETAGENT_SOCKET")
    if rest[:1] == ["apply"]:
        return _apply(rest[1:], sock, as_json)
    if rest == ["events"]:
        from .ctl import stream_events

        stream_events(sock, as_json)
        return True
    if rest[:1] == ["purge"] and "--yes" not in rest:
        return False  # typer asks first
    from netagent.agent.argv import parse, split_local

    from .words import COMMANDS

    for n in (2, 1):
        entry = COMMANDS.get(tuple(rest[:n]))
        if entry is None:
            continue
        op, shape = entry
        if op in ("apply", "events"):
            return False
        words = rest[n:]
        if op == "purge":
            words = [w for w in words if w != "--yes"]
        args = parse(shape, words)
        if args is None:
            return False
        sent, local = split_local(shape, args)
        from . import ctl

        if local:
            ctl.run_op(op, sent, sock, as_json, local)
        else:
            ctl.run_op(op, sent, sock, as_json)
        return True
    return False


def _apply(rest: list[str], sock: str | None, as_json: bool) -> bool:
    prune = "--prune" in rest
    words = [w for w in rest if w != "--prune"]
    if len(words) != 1 or (words[0].startswith("-") and words[0] != "-"):
        return False
    from .ctl import apply_file

    apply_file(words[0], prune, sock, as_json)
    return True


def _exit_now(status: int) -> None:
    """Flush what was printed and leave without tearing the interpreter down."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (BrokenPipeError, ValueError):  # a reader that went away (| head)
            status = status or 1
    os._exit(status)


def main() -> None:
    try:
        fast = _fast(sys.argv[1:])
    except SystemExit as done:
        code = done.code
        if code is None or isinstance(code, int):
            _exit_now(code or 0)
        print(code, file=sys.stderr)
        _exit_now(1)
    except KeyboardInterrupt:
        _exit_now(130)
    except BrokenPipeError:  # the reader of our output went away (| head): say no more
        _exit_now(1)
    if fast:
        _exit_now(0)
    from .app import app

    app(prog_name="netagent")


if __name__ == "__main__":
    main()
