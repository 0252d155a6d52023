"""The CLI without a daemon: a clear error and its own exit status (no root)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.support.daemon import netagent_argv


def test_no_daemon_is_a_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "nothing-here" / "x.sock"
    r = subprocess.run(
        [*netagent_argv(), "ctl", "--socket", str(missing), "status"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 69
    assert f"no netagent socket at {missing}" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1  # one line, no traceback
