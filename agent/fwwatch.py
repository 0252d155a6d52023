"""Notice when someone changes the firewall under netagent, and have it put back.

``nft monitor`` prints every committed ruleset change, each batch closed by a line
``# new generation N by process PID (COMM)``. A batch by another process that touches
what the backend owns (its ``monitor_markers``: the table's name, the nat tables its
chains live in, ``flush ruleset``) kicks a firewall pass: observe, plan, apply. The
iptables backend is covered too when iptables is the nf_tables flavour (Debian's
default), whose changes are nf_tables changes. Batches by the daemon's own pid are its
own work (libnftables runs in-process) and ignored. The periodic full pass remains the
safety net (legacy iptables, a monitor that died). Changes made by the iptables backend's
own ``iptables-restore`` processes do cause one extra, idempotent firewall pass.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil

import anyio
import structlog

from netagent.backends.firewall import FirewallBackend

from .bus import EventBus
from .reconcile import FIREWALL_KEY, Reconciler

log = structlog.get_logger("netagent.fwwatch")
_GENERATION = re.compile(r"^# new generation \d+ by process (\d+) \((.*)\)")


def _ours(pid: int, me: int) -> bool:
    """nf_tables reports the committing *task*: a worker thread of the daemon (big
    transactions run off the event loop) shows its thread id, not the daemon's pid."""
    return pid == me or os.path.exists(f"/proc/{me}/task/{pid}")


def relevant(line: str, backend: FirewallBackend) -> bool:
    return any(marker in line for marker in (*backend.monitor_markers, "flush ruleset"))


def _die_with_parent() -> None:
    """In the child: SIGTERM when the daemon dies, even of SIGKILL, so no `nft monitor`
    outlives it (and keeps a sandbox's namespaces alive)."""
    import ctypes
    import signal

    pr_set_pdeathsig = 1
    ctypes.CDLL(None).prctl(pr_set_pdeathsig, signal.SIGTERM)


async def watch_firewall(rec: Reconciler, backend: FirewallBackend, bus: EventBus) -> None:
    nft = shutil.which("nft")
    if nft is None:
        log.warning("nft is not installed: firewall drift is found by the periodic pass only")
        return
    me = os.getpid()
    while True:
        proc = None
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
            pending: list[str] = []
            while raw := await proc.stdout.readline():
                line = raw.decode(errors="replace").rstrip()
                gen = _GENERATION.match(line)
                if gen is None:
                    if relevant(line, backend):
                        pending.append(line)
                    continue
                pid, comm = int(gen.group(1)), gen.group(2)
                if pending and not _ours(pid, me):
                    bus.publish(
                        "firewall-drift",
                        f"{comm} (pid {pid}) changed netagent's rules: "
                        f"{'; '.join(pending[:3])}{' ...' if len(pending) > 3 else ''}",
                        pid=pid,
                        process=comm,
                    )
                    log.info("firewall drift", process=comm, pid=pid, changes=len(pending))
                    rec.kick([FIREWALL_KEY])
                pending = []
            log.warning("nft monitor ended; restarting it")
        except OSError as exc:
            log.warning("nft monitor failed; restarting it", error=str(exc))
        finally:
            if proc is not None and proc.returncode is None:
                proc.kill()
                await proc.wait()
        rec.kick([FIREWALL_KEY])
        await anyio.sleep(1)
