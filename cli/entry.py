"""The ``netagent`` console script.

typer costs ~150-250 ms to import and build here (it pulls in pydantic and rich): more
than a whole ``ctl`` command should take. So every ``ctl`` command line that is plainly
valid is parsed here, from the same request declarations the typer commands are built
from (``agent/ops.py``), and sent at once; anything else (``--help``, completion, a
mistake typer should explain, ``run``, ``demo``) goes through typer.
"""

from __future__ import annotations

import os
import sys


def _fast(argv: list[str]) -> bool:
    """Handle a ``ctl`` command without typer; False when typer should."""
    if len(argv) < 2 or argv[0] != "ctl":
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
    if rest[:1] == ["purge"] and "--yes" in rest:
        from netagent.agent.ops import Purge

        args = Purge.from_argv([w for w in rest[1:] if w != "--yes"])
        if args is None:
            return False
        from .ctl import run_op

        run_op("purge", args, sock, as_json)
        return True
    from netagent.agent.ops import BY_CLI

    for n in (2, 1):
        cls = BY_CLI.get(tuple(rest[:n]))
        if cls is not None and cls.op not in ("apply", "purge", "events"):
            args = cls.from_argv(rest[n:])
            if args is None:
                return False
            from .ctl import run_op

            run_op(cls.op, args, sock, as_json)
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


def main() -> None:
    if _fast(sys.argv[1:]):
        return
    from .app import app

    app(prog_name="netagent")


if __name__ == "__main__":
    main()
