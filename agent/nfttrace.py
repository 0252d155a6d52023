"""``explain --trace``: one real probe along the path, with nftables tracing on.

A table of its own (``inet na_trace``, made and deleted in-process, so the drift watcher
knows it as the daemon's) marks the probe at prerouting and output, before anything
else (priority -350), by protocol, destination port and a source port picked for it:
``meta nftrace set 1``. ``nft monitor trace`` then prints every rule of every table the
probe passes, in order, with verdicts, iptables-nft's rules among them (legacy
iptables is invisible to it). The probe is a TCP SYN or a UDP datagram, sent from the
host, or from inside a namespace when ``--from`` is one of its addresses; it is sent
again every 100 ms until the monitor shows it (the monitor says nothing when it is
ready), at most for :data:`TIMEOUT` seconds. Everything is removed afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shutil
import socket
import threading
from typing import Any

import anyio

TABLE = "inet na_trace"
#: seconds the whole probe may take
TIMEOUT = 4.0
#: seconds to keep reading once the probe showed up (the rest of its path)
LINGER = 0.3


def _socket_in(path: str | None, family: int, kind: int) -> socket.socket:
    """A socket in the network namespace at ``path`` (None: the daemon's own), made by a
    short-lived thread that setns()es, as ``backends/rtnldump.socket_in_netns`` does."""
    if path is None:
        return socket.socket(family, kind)
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    made: list[socket.socket | BaseException] = []

    def work() -> None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                if libc.setns(fd, 0x40000000) != 0:
                    raise OSError(ctypes.get_errno(), f"setns {path}")
            finally:
                os.close(fd)
            made.append(socket.socket(family, kind))
        except BaseException as exc:
            made.append(exc)

    thread = threading.Thread(target=work, name="netagent-probe", daemon=True)
    thread.start()
    thread.join(2)
    if not made:
        raise OSError(f"could not enter {path}")
    got = made[0]
    if isinstance(got, BaseException):
        raise got
    return got


def _send(proto: str, dest: str, port: int, sport: int, ns_path: str | None) -> None:
    family = socket.AF_INET6 if ":" in dest else socket.AF_INET
    kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    with contextlib.closing(_socket_in(ns_path, family, kind)) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.setblocking(False)
        any_addr = "::" if family == socket.AF_INET6 else "0.0.0.0"  # noqa: S104  a source port
        s.bind((any_addr, sport))
        if kind == socket.SOCK_DGRAM:
            s.sendto(b"netagent explain --trace", (dest, port))
        else:
            with contextlib.suppress(BlockingIOError, OSError):
                s.connect((dest, port))


async def trace(
    run_nft: Any, proto: str, dest: str, port: int, ns_path: str | None = None
) -> list[str]:
    """The trace lines of one probe. ``run_nft(script) -> (rc, out, err)``: in-process
    libnftables (the daemon's own commits)."""
    nft = shutil.which("nft")
    if nft is None:
        return ["nft is not installed: no trace (Debian package nftables)"]
    sport = random.randint(40000, 60999)  # noqa: S311  (not a secret: a probe's port)
    # a TCP probe is traced from its SYN only (a reset or a stray ACK of an earlier
    # probe from the same port would take another path)
    syn = "tcp flags & (syn | ack) == syn " if proto == "tcp" else ""
    match = f"meta l4proto {proto} th dport {port} th sport {sport} {syn}meta nftrace set 1"
    script = (
        f"table {TABLE} {{\n"
        f"  chain pre {{ type filter hook prerouting priority -350; {match}; }}\n"
        f"  chain out {{ type filter hook output priority -350; {match}; }}\n}}\n"
    )
    rc, _out, err = await anyio.to_thread.run_sync(run_nft, script.encode())
    if rc != 0:
        return [f"could not set up tracing: {err.decode(errors='replace').strip()}"]
    proc = await asyncio.create_subprocess_exec(
        nft, "monitor", "trace",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
        stdin=asyncio.subprocess.DEVNULL, env={"LANG": "C", "PATH": os.environ.get("PATH", "")},
    )  # fmt: skip
    lines: list[str] = []
    ids: set[str] = set()
    try:
        assert proc.stdout is not None
        stdout = proc.stdout

        async def read() -> None:
            while raw := await stdout.readline():
                line = raw.decode(errors="replace").rstrip()
                parts = line.split()
                if len(parts) > 2 and parts[0] == "trace" and parts[1] == "id":
                    if f"sport {sport}" in line:
                        ids.add(parts[2])
                    if parts[2] in ids:
                        lines.append(" ".join(parts[3:]))

        with anyio.move_on_after(TIMEOUT):
            async with anyio.create_task_group() as tg:
                tg.start_soon(read)
                while not ids:
                    await anyio.to_thread.run_sync(_send, proto, dest, port, sport, ns_path)
                    await anyio.sleep(0.1)
                await anyio.sleep(LINGER)
                tg.cancel_scope.cancel()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await anyio.to_thread.run_sync(run_nft, f"delete table {TABLE}".encode())
    if not ids:
        return [f"the probe did not show up within {TIMEOUT:g} s"]
    return lines
