"""systemd integration without libsystemd: sd_notify, the watchdog and LISTEN_FDS.

The protocols are small and stable (sd_notify(3), sd_listen_fds(3), sd_watchdog_enabled(3)):

* notifications are datagrams of ``KEY=VALUE`` lines sent to ``$NOTIFY_SOCKET``, a path or,
  with a leading ``@``, an abstract socket name (abstract names live in the *network*
  namespace, so only a path reaches a manager outside the daemon's namespace);
* passed sockets start at fd 3; ``$LISTEN_PID`` says whom they are for (a child that
  inherited the variables must not take them), ``$LISTEN_FDS`` how many;
* the watchdog is on when ``$WATCHDOG_USEC`` is set (and ``$WATCHDOG_PID``, if set, is us);
  systemd's advice is to ping at half the interval.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Callable

import anyio

SD_LISTEN_FDS_START = 3
#: seconds between STATUS= updates when the watchdog is off
STATUS_EVERY = 5.0


def _address(path: str) -> str:
    return "\0" + path[1:] if path.startswith("@") else path


def notify(message: str) -> bool:
    """Send a notification to $NOTIFY_SOCKET; False when not run by systemd (or the
    manager is gone: a notification is never worth failing for)."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path or path[0] not in "/@":
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        try:
            sock.connect(_address(path))
            sock.sendall(message.encode("utf-8", "replace"))
        except OSError:
            return False
    return True


def one_line(text: str, limit: int = 200) -> str:
    """STATUS= carries one line: newlines would start a new KEY=VALUE assignment."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def listen_fds(unset_environment: bool = False) -> list[int]:
    """File descriptors systemd passed in (socket activation), if they are for us.

    With ``unset_environment`` the LISTEN_* variables are removed, so the programs the
    daemon runs (ip, nft, conntrack) do not see them, and the fds are made close-on-exec
    (systemd passes them inheritable)."""
    try:
        ours = int(os.environ.get("LISTEN_PID", "0")) == os.getpid()
        count = int(os.environ.get("LISTEN_FDS", "0")) if ours else 0
    except ValueError:
        ours, count = False, 0
    if unset_environment:
        for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            os.environ.pop(name, None)
    fds = list(range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + max(count, 0)))
    if unset_environment:
        for fd in fds:
            with contextlib.suppress(OSError):
                os.set_inheritable(fd, False)
    return fds


def watchdog_interval() -> float | None:
    """Half of WATCHDOG_USEC, in seconds, when the watchdog is on for this process."""
    try:
        usec = int(os.environ.get("WATCHDOG_USEC", "0"))
        pid = int(os.environ.get("WATCHDOG_PID", "0"))
    except ValueError:
        return None
    if usec <= 0 or (pid and pid != os.getpid()):
        return None
    return usec / 2_000_000


async def watchdog_loop(status: Callable[[], str]) -> None:
    """Pet the watchdog from the event loop itself, and keep STATUS= current.

    Running as an ordinary task is the point: a thread would keep petting while the loop
    is wedged; this task stops as soon as the loop stops turning, systemd sees the missed
    ping after WatchdogSec= and restarts the service (Restart=on-failure)."""
    if not os.environ.get("NOTIFY_SOCKET"):
        return
    interval = watchdog_interval()
    period = interval if interval is not None else STATUS_EVERY
    last_status = ""
    while True:
        current = one_line(status())
        lines = ["WATCHDOG=1"] if interval is not None else []
        if current != last_status:
            lines.append(f"STATUS={current}")
            last_status = current
        if lines:
            notify("\n".join(lines))
        await anyio.sleep(period)
