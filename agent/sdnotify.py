"""systemd integration without libsystemd: sd_notify, the watchdog and LISTEN_FDS."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable

import anyio

SD_LISTEN_FDS_START = 3


def notify(message: str) -> bool:
    """Send a notification to $NOTIFY_SOCKET; False when not run by systemd."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    addr = "\0" + path[1:] if path.startswith("@") else path
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        try:
            sock.connect(addr)
            sock.sendall(message.encode())
        except OSError:
            return False
    return True


def listen_fds() -> list[int]:
    """File descriptors systemd passed in (socket activation), if they are for us."""
    try:
        if int(os.environ.get("LISTEN_PID", "0")) != os.getpid():
            return []
        count = int(os.environ.get("LISTEN_FDS", "0"))
    except ValueError:
        return []
    return list(range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count))


def watchdog_interval() -> float | None:
    """Half of WATCHDOG_USEC, in seconds, when the watchdog is on for this process."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and int(pid) != os.getpid()):
        return None
    return int(usec) / 2_000_000


async def watchdog_loop(status: Callable[[], str]) -> None:
    """Pet the watchdog from the event loop itself: a hung loop stops petting and
    systemd restarts the service."""
    interval = watchdog_interval()
    if interval is None:
        return
    last_status = ""
    while True:
        current = status()
        msg = "WATCHDOG=1"
        if current != last_status:
            msg += f"\nSTATUS={current}"
            last_status = current
        notify(msg)
        await anyio.sleep(interval)
