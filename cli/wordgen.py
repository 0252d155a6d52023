"""Writes ``cli/words.py``, the fast path's table, from the request declarations.

``python -m netagent.cli.wordgen`` after changing ``agent/ops.py`` or the error codes;
``tests/cli/test_words.py`` fails until the table says what they declare.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

HEADER = '''"""The ``netagent ctl`` command lines, as plain data, for the CLI's fast path.

GENERATED from ``agent/ops.py`` and ``agent/errors.py`` by ``python -m
netagent.cli.wordgen``: do not edit. Building the request classes costs a ``ctl`` command
~10 ms (``typing``, descriptors, ~25 classes); a literal loads from its ``.pyc`` in well
under one. ``tests/cli/test_words.py`` keeps it equal to what the declarations say.
"""

from __future__ import annotations

#: not ``typing.TYPE_CHECKING``: importing typing costs ~1-3 ms (mypy reads this name alike)
TYPE_CHECKING = False
if TYPE_CHECKING:
    from netagent.agent.argv import Shape

'''


def table() -> tuple[dict[tuple[str, ...], tuple[str, Any]], dict[int, int]]:
    """(command words -> (op, shape), error code -> the CLI's exit status)."""
    from netagent.agent import errors, ops

    commands = {r.cli: (r.op, r.shape()) for r in ops.REQUESTS if r.cli}
    exits = {code: cls.exit_status for code, cls in sorted(errors.ERRORS_BY_CODE.items())}
    return commands, exits


def source() -> str:
    """The module's text: one command per line (long lines are allowed in this file
    alone, see ``pyproject.toml``)."""
    commands, exits = table()
    lines = [HEADER, "#: command words -> (op, shape: see netagent.agent.argv.parse)\n"]
    lines.append("COMMANDS: dict[tuple[str, ...], tuple[str, Shape]] = {\n")
    lines += [f"    {words!r}: {entry!r},\n" for words, entry in commands.items()]
    lines.append("}\n\n#: error code of a reply -> the CLI's exit status\n")
    lines.append("EXIT_STATUS: dict[int, int] = {\n")
    lines += [f"    {code}: {status},\n" for code, status in exits.items()]
    lines.append("}\n")
    return "".join(lines)


def main() -> None:
    path = Path(__file__).with_name("words.py")
    path.write_text(source())
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
