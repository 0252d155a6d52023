"""Running programs (``backends/iptables/process.py``): time limits, errors, and the pids
the drift watcher is told are ours. Runs harmless programs (``sh``, ``cat``, Python),
never iptables, and needs no root."""

from __future__ import annotations

import os
import sys
import time

import anyio
import pytest

from netagent.agent.errors import BackendFailed
from netagent.backends.iptables.process import SBIN, Programs, Running

#: a child that would outlive any test's patience
SLEEPER = "import time; time.sleep(60)"


async def test_output_and_input_pass_through_whole() -> None:
    """2 MiB each way: the restore file of 10,000 forwards is ~1.6 MB, and neither
    side may block on a full pipe."""
    data = os.urandom(1 << 20).hex().encode()
    out = await Programs().run(["cat"], stdin=data)
    assert out == data


async def test_a_failure_says_what_the_program_said() -> None:
    with pytest.raises(BackendFailed, match=r"sh -c .*: line 3 failed"):
        await Programs().run(["sh", "-c", "echo 'line 3 failed' >&2; exit 3"])


async def test_a_missing_program_is_a_backend_error() -> None:
    with pytest.raises(BackendFailed, match="cannot run /nonexistent/iptables-restore"):
        await Programs().run(["/nonexistent/iptables-restore"])


async def test_the_environment_is_plain_and_finds_sbin() -> None:
    out = await Programs().run(["sh", "-c", 'echo "$LANG"; echo "$PATH"; echo "$HOME"'])
    lang, path, home = out.decode().splitlines()
    assert lang == "C"
    assert path.endswith(SBIN)
    assert home == ""


async def test_a_program_past_its_time_is_killed_and_reaped() -> None:
    programs = Programs(timeout=0.5)
    t0 = time.monotonic()
    with pytest.raises(BackendFailed, match=r"did not finish in 0\.5 s"):
        await programs.run([sys.executable, "-c", SLEEPER])
    assert time.monotonic() - t0 < 5
    (pid,) = programs.running.ended
    assert not programs.running.now
    assert not os.path.exists(f"/proc/{pid}")  # killed and reaped, not a zombie


async def test_the_running_program_is_named_ours_and_for_a_while_after() -> None:
    """While it runs, its pid is among ``own_pids`` (the drift watcher's callback) and
    is the child's; after it exits, still for the grace period."""
    programs = Programs()
    seen: list[frozenset[int]] = []

    async def watch() -> None:
        with anyio.fail_after(10):
            while not (pids := programs.own_pids()):
                await anyio.sleep(0.005)
        seen.append(pids)

    marker = "netagent-test-own-pid"
    async with anyio.create_task_group() as tg:
        tg.start_soon(watch)
        await programs.run(
            [sys.executable, "-c", f"import time; time.sleep(0.3)  # {marker}"], stdin=b""
        )
    (pids,) = seen
    (pid,) = pids
    assert pid != os.getpid()
    assert programs.own_pids() == {pid}  # exited, within the grace period
    assert not programs.running.now


def test_running_forgets_after_the_grace_period() -> None:
    now = [100.0]
    running = Running(grace=5.0, clock=lambda: now[0])
    running.start(7)
    running.start(8)
    assert running.pids() == {7, 8}
    running.end(7)
    now[0] += 4.9
    assert running.pids() == {7, 8}
    now[0] += 0.2
    assert running.pids() == {8}
    assert 7 not in running.ended
    running.end(8)
    now[0] += 5.0
    assert running.pids() == frozenset()
