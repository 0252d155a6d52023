"""The ``netagent`` console script.

typer costs ~250 ms to import and build here (it pulls in pydantic and rich), more than
``ctl status`` should take in all. Read-only ``ctl`` commands without arguments of their
own, and ``ctl apply FILE`` (big documents), are recognized here and handed straight to
the functions in ``ctl.py`` that the typer commands call too; everything else,
``--help`` included, goes through typer.
"""

from __future__ import annotations

import os
import sys

# argv after "ctl" (global options removed) -> op
FAST: dict[tuple[str, ...], str] = {
    ("status",): "status",
    ("show",): "show",
    ("forwards",): "fwd.list",
    ("ns", "list"): "ns.list",
    ("bridge", "list"): "bridge.list",
    ("attach", "list"): "rule.list",
    ("links",): "links",
    ("neigh",): "neigh",
    ("routes",): "routes",
}
_NS_OK = {"links", "neigh", "routes"}


def _fast(argv: list[str]) -> bool:
    """Handle ``ctl`` read-only commands without typer; False when it is not one."""
    if len(argv) < 2 or argv[0] != "ctl":
        return False
    socket: str | None = None
    as_json = False
    prune = False
    ns: str | None = None
    words: list[str] = []
    rest = argv[1:]
    i = 0
    while i < len(rest):
        a = rest[i]
        if a == "--json":
            as_json = True
        elif a == "--prune":
            prune = True
        elif a in ("--socket", "--ns") and i + 1 < len(rest) and not rest[i + 1].startswith("-"):
            if a == "--socket":
                socket = rest[i + 1]
            else:
                ns = rest[i + 1]
            i += 1
        elif a.startswith("--socket="):
            socket = a.split("=", 1)[1]
        elif a.startswith("-") and a != "-":
            return False  # --help and anything else: typer
        else:
            words.append(a)
        i += 1
    sock = socket or os.environ.get("NETAGENT_SOCKET")
    if len(words) == 2 and words[0] == "apply" and ns is None:
        # big documents: 10,000 forwards should not wait for typer to load
        from .ctl import apply_file

        apply_file(words[1], prune, sock, as_json)
        return True
    op = FAST.get(tuple(words))
    if op is None or prune or (ns is not None and op not in _NS_OK):
        return False
    from .ctl import run_op

    run_op(op, {"ns": ns} if ns else {}, sock, as_json)
    return True


def main() -> None:
    if _fast(sys.argv[1:]):
        return
    from .app import app

    app(prog_name="netagent")


if __name__ == "__main__":
    main()
