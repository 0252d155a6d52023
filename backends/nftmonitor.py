"""A drift watcher on ``nft monitor``: someone else changed what a backend owns.

``nft monitor`` prints every committed nf_tables change, each transaction closed by a
line ``# new generation N by process PID (COMM)``. A transaction by another process that
touches what the backend owns (``markers``: text such as `` inet netagent`` or
`` ip nat``; ``flush ruleset`` always counts) is reported once, with who did it.

Own changes are not drift: nf_tables names the committing *task*, so the daemon's pid,
any of its threads (big transactions run off the event loop), and the pids the backend
says are its own (``own_pids``: the iptables-restore processes it runs) are ignored.
iptables-nft (Debian's default iptables) is nf_tables underneath, so the same watcher
serves the iptables backend; iptables-legacy changes never show here.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
from collections.abc import Callable, Iterable

import anyio
import structlog

from .firewall import DriftCallback

log = structlog.get_logger("netagent.drift")
_GENERATION = re.compile(r"^# new generation \d+ by process (\d+) \((.*)\)")
#: pause before a dead monitor is started again
RESTART_DELAY = 1.0


def _die_with_parent() -> None:
    """In the child: SIGTERM when the daemon dies, even of SIGKILL, so no `nft monitor`
    outlives it (and keeps a sandbox's namespaces alive)."""
    import ctypes
    import signal

    pr_set_pdeathsig = 1
    ctypes.CDLL(None).prctl(pr_set_pdeathsig, signal.SIGTERM)


def is_own(pid: int, me: int, others: Iterable[int] = ()) -> bool:
    return pid == me or pid in others or os.path.exists(f"/proc/{me}/task/{pid}")


class Transactions:
    """Groups monitor lines into transactions and decides which are drift. Pure but for
    the pid test it is given, so it is tested without a kernel."""

    def __init__(self, markers: tuple[str, ...], own: Callable[[int], bool]) -> None:
        self.markers = (*markers, "flush ruleset")
        self.own = own
        self.pending: list[str] = []

    def feed(self, line: str) -> str | None:
        """A description of the drift when ``line`` ends a foreign transaction that
        touched what is watched; else None."""
        gen = _GENERATION.match(line)
        if gen is None:
            if any(m in line for m in self.markers):
                self.pending.append(line)
            return None
        pid, comm = int(gen.group(1)), gen.group(2)
        lines, self.pending = self.pending, []
        if not lines or self.own(pid):
            return None
        more = " ..." if len(lines) > 3 else ""
        return f"{comm} (pid {pid}) changed netagent's rules: {'; '.join(lines[:3])}{more}"


class NftMonitorWatcher:
    def __init__(
        self, markers: tuple[str, ...], own_pids: Callable[[], Iterable[int]] = tuple
    ) -> None:
        self.markers = markers
        self.own_pids = own_pids

    async def run(self, on_drift: DriftCallback) -> None:
        nft = shutil.which("nft")
        if nft is None:
            log.warning("nft is not installed: firewall drift is found by the periodic pass")
            return
        me = os.getpid()
        while True:
            proc = None
            tx = Transactions(self.markers, lambda pid: is_own(pid, me, self.own_pids()))
            try:
                proc = await asyncio.create_subprocess_exec(
                    nft,
                    "monitor",
                    stdout=asyncio.subprocess.PIPE,
                    stdin=asyncio.subprocess.DEVNULL,
                    env={"LANG": "C", "PATH": os.environ.get("PATH", "")},
                    preexec_fn=_die_with_parent,
                )
                assert proc.stdout is not None
                while raw := await proc.stdout.readline():
                    what = tx.feed(raw.decode(errors="replace").rstrip())
                    if what is not None:
                        log.info("firewall drift", what=what)
                        on_drift(what)
                log.warning("nft monitor ended; restarting it")
            except OSError as exc:
                log.warning("nft monitor failed; restarting it", error=str(exc))
            finally:
                if proc is not None and proc.returncode is None:
                    proc.kill()
                    await proc.wait()
            # what happened while it was down is unknown: look once
            on_drift("the nft monitor restarted")
            await anyio.sleep(RESTART_DELAY)
