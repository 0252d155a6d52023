"""sd_notify, socket activation and the watchdog (``agent/sdnotify.py``), against a
stand-in for systemd's notify socket (no root)."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import anyio
import pytest

from netagent.agent import sdnotify
from tests.support.notify import NotifyListener
from tests.support.wait import wait_for


def test_watchdog_stops_when_the_event_loop_hangs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A thread would keep petting a wedged loop; the task must not: while the loop is
    blocked for 0.8 s, no WATCHDOG=1 may arrive (systemd would then restart us)."""
    listener = NotifyListener(tmp_path / "notify.sock")
    monkeypatch.setenv("NOTIFY_SOCKET", str(listener.path))
    monkeypatch.setenv("WATCHDOG_USEC", "100000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    blocked: list[float] = []

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(sdnotify.watchdog_loop, lambda: "ok")
            await anyio.sleep(0.3)
            blocked.append(time.monotonic())
            time.sleep(0.8)  # the loop hangs
            blocked.append(time.monotonic())
            await anyio.sleep(0.3)
            tg.cancel_scope.cancel()

    try:
        anyio.run(main)
        # evidence that the listener got what the loop sent once it ran again, before
        # looking for pings that should not be there
        wait_for(
            "a WATCHDOG=1 received after the loop resumed",
            lambda: [t for t, _ in listener.having("WATCHDOG=1") if t > blocked[1]],
            timeout=5,
        )
    finally:
        listener.close()
    pings = [t for t, _ in listener.having("WATCHDOG=1")]
    inside = [t for t in pings if blocked[0] + 0.01 < t < blocked[1] - 0.01]
    assert len(pings) >= 5 and not inside, (pings, blocked)
    assert listener.having("STATUS=ok")


def test_notify_speaks_the_protocol(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Path and abstract (@) sockets; nothing at all without NOTIFY_SOCKET; LISTEN_FDS only
    for the right pid, and cleared for children."""
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sdnotify.notify("READY=1") is False
    name = f"@netagent-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name[1:])
        monkeypatch.setenv("NOTIFY_SOCKET", name)
        assert sdnotify.notify("READY=1\nSTATUS=a\nb")
        assert sock.recv(100) == b"READY=1\nSTATUS=a\nb"
    assert sdnotify.one_line("3 namespaces,\n 1 bridges") == "3 namespaces, 1 bridges"
    monkeypatch.setenv("LISTEN_PID", str(os.getpid() + 1))
    monkeypatch.setenv("LISTEN_FDS", "1")
    assert sdnotify.listen_fds() == []
    monkeypatch.setenv("LISTEN_PID", str(os.getpid()))
    monkeypatch.setenv("LISTEN_FDS", "2")
    monkeypatch.setenv("LISTEN_FDNAMES", "a:b")
    assert sdnotify.listen_fds() == [3, 4]
    monkeypatch.setenv("LISTEN_FDS", "0")
    assert sdnotify.listen_fds(unset_environment=True) == []
    assert "LISTEN_FDS" not in os.environ and "LISTEN_PID" not in os.environ
    monkeypatch.setenv("WATCHDOG_USEC", "bogus")
    assert sdnotify.watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert sdnotify.watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert sdnotify.watchdog_interval() == 1.0
