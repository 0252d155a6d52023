"""Running the iptables programs: never through a shell, always with a time limit, and
knowing which of them are ours while they run.

The drift watcher (``nft monitor``) names the process behind every nf_tables commit.
iptables-nft commits from the ``iptables-restore`` process the backend started, not
from the daemon, so the backend tells the watcher those pids (:meth:`Programs.own_pids`).
A pid is registered before its program reads its input (so before it can commit), and
kept for :data:`GRACE` seconds after it has exited: ``nft monitor`` prints the commit
line asynchronously, and the daemon may read it only after it has reaped the process.
Linux hands out pids in sequence up to ``pid_max``, so one coming back within seconds
(and to someone changing our rules) is not a practical concern.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable

import anyio
from anyio.abc import ByteReceiveStream

from netagent.agent.errors import BackendFailed

#: where the programs usually live when the daemon's PATH lacks the sbin directories
SBIN = "/usr/local/sbin:/usr/sbin:/sbin"
#: an xtables lock held by someone else (``-w`` waits for it) must not hang a pass forever
TIMEOUT = 60.0
#: how long an exited program's pid still counts as ours (see the module's notes)
GRACE = 5.0


class Running:
    """The pids of our programs running now, and of those that exited in the last
    ``grace`` seconds."""

    def __init__(self, grace: float = GRACE, clock: Callable[[], float] = time.monotonic):
        self.grace = grace
        self.clock = clock
        self.now: set[int] = set()
        self.ended: dict[int, float] = {}  # pid -> when it stops counting

    def start(self, pid: int) -> None:
        self.now.add(pid)

    def end(self, pid: int) -> None:
        self.now.discard(pid)
        self.ended[pid] = self.clock() + self.grace

    def pids(self) -> frozenset[int]:
        t = self.clock()
        for pid in [p for p, until in self.ended.items() if until <= t]:
            del self.ended[pid]
        return frozenset(self.now | self.ended.keys())


async def _drain(stream: ByteReceiveStream | None, into: list[bytes]) -> None:
    if stream is not None:
        async for chunk in stream:
            into.append(chunk)


async def exec_program(
    argv: list[str], stdin: bytes | None, env: dict[str, str], running: Running
) -> tuple[int, bytes, bytes]:
    """Run ``argv`` to its end: (exit status, stdout, stderr). Like
    :func:`anyio.run_process`, which does not say the pid; cancelled (the caller's time
    limit), the process is killed and reaped before this returns."""
    out: list[bytes] = []
    err: list[bytes] = []
    proc = await anyio.open_process(
        argv,
        stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    running.start(proc.pid)
    try:
        async with proc:
            async with anyio.create_task_group() as tg:
                tg.start_soon(_drain, proc.stdout, out)
                tg.start_soon(_drain, proc.stderr, err)
                if proc.stdin is not None and stdin is not None:
                    await proc.stdin.send(stdin)
                    await proc.stdin.aclose()
                rc = await proc.wait()
    finally:
        running.end(proc.pid)
    return rc, b"".join(out), b"".join(err)


class Programs:
    """Runs one program at a time per call and says what it said when it fails."""

    def __init__(self, timeout: float = TIMEOUT) -> None:
        self.timeout = timeout
        self.running = Running()

    def own_pids(self) -> frozenset[int]:
        return self.running.pids()

    @staticmethod
    def env() -> dict[str, str]:
        return {"LANG": "C", "PATH": f"{os.environ.get('PATH', '')}:{SBIN}"}

    async def run(self, argv: list[str], stdin: bytes | None = None) -> bytes:
        name = os.path.basename(argv[0])
        try:
            with anyio.fail_after(self.timeout):
                rc, out, err = await exec_program(argv, stdin, self.env(), self.running)
        except TimeoutError:
            raise BackendFailed(
                f"{name} did not finish in {self.timeout:g} s "
                "(is another program holding the xtables lock?)"
            ) from None
        except OSError as exc:
            raise BackendFailed(f"cannot run {argv[0]}: {exc}") from None
        if rc != 0:
            text = err.decode(errors="replace").strip()
            raise BackendFailed(f"{name} {' '.join(argv[1:])}: {text}")
        return out
