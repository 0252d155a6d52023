"""The fast path's table (``cli/words.py``) says what the declarations say (no root)."""

from __future__ import annotations

from pathlib import Path

from netagent.agent import config, errors, ops, protocol
from netagent.agent.argv import parse
from netagent.cli import wire, wordgen, words


def test_the_table_is_what_wordgen_writes_from_the_declarations() -> None:
    text = Path(words.__file__).read_text()
    assert text == wordgen.source(), (
        "cli/words.py is stale: run `python -m netagent.cli.wordgen` after changing "
        "agent/ops.py or agent/errors.py"
    )


def test_every_command_and_error_code_is_in_it() -> None:
    assert {r.cli: (r.op, r.shape()) for r in ops.REQUESTS if r.cli} == words.COMMANDS
    assert {c: e.exit_status for c, e in errors.ERRORS_BY_CODE.items()} == words.EXIT_STATUS


def test_the_fast_path_parses_as_from_argv_does() -> None:
    argv = ["red", "br0", "--address", "10.0.0.2/24", "--address=fd00::2/64", "--ifname", "e0"]
    op, shape = words.COMMANDS[("plug",)]
    assert op == "plug.add"
    assert parse(shape, argv) == ops.PlugAdd.from_argv(argv)


def test_the_wire_speaks_the_protocol_of_the_daemon() -> None:
    assert wire.VERSION == protocol.VERSION
    assert wire.DEFAULT_SOCKET == config.DEFAULT_SOCKET


def test_the_lean_json_is_json() -> None:
    import json

    value = {"a": ["x", True, False, None, 3, 2.5], 'é"\n': {"k": []}, "n": -7}
    assert json.loads(wire._dump(value)) == value
    loads = wire._loader()
    text = json.dumps(value)
    assert loads(text) == value
    assert loads('{"x": NaN}')["x"] != loads('{"x": NaN}')["x"]  # NaN, as json reads it
