"""Shell completion is typer's, and the fast path leaves it alone (no root)."""

from __future__ import annotations

import os
import subprocess

from tests.support.daemon import netagent_argv


def complete(words: str) -> list[str]:
    """What bash completion offers for the last word of ``words``."""
    env = {
        **os.environ,
        "COMP_WORDS": words,
        "COMP_CWORD": str(len(words.split()) - (0 if words.endswith(" ") else 1)),
        "_NETAGENT_COMPLETE": "complete_bash",
    }
    done = subprocess.run(
        netagent_argv(), capture_output=True, text=True, timeout=60, env=env, check=True
    )
    return done.stdout.split()


def test_commands_options_and_choices_complete() -> None:
    assert sorted(complete("netagent ctl f")) == ["forget", "forward", "forwards"]
    assert "--graph" in complete("netagent ctl show --")
    assert complete("netagent ctl show --format ") == ["dot", "svg", "png"]


def test_the_completion_script_is_shown() -> None:
    # typer (with shellingham) shows the script for the shell it runs under, found among
    # its ancestors: run it from bash, not from whatever runs the tests (make's sh)
    done = subprocess.run(
        ["bash", "-c", '"$@"; exit $?', "bash", *netagent_argv(), "--show-completion"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "_NETAGENT_COMPLETE=complete_bash" in done.stdout
    assert "complete -o default -F _netagent_completion netagent" in done.stdout
