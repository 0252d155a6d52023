"""DELs that could not be delivered, kept on disk until the daemon carries them out.

A runtime that gets an error from DEL retries, or worse, keeps a pod in "terminating"
forever; the spec wants DEL to succeed as far as it can. So when the daemon is down (or
does not answer in time) the plugin records the DEL here and succeeds, and the daemon
carries it out when it is back (``agent/cni.py``: at start, then every few seconds), as
does the next plugin call that reaches it. A DEL is idempotent, so carrying one out twice
is harmless; each records when it was queued, so an attachment made again afterwards is
not removed by an old DEL.

One JSON file per DEL, written to a temporary name, fsynced and renamed, then the
directory fsynced: a reader sees whole records or none, and a recorded DEL survives a
crash. Standard library only (the plugin imports it).
"""

from __future__ import annotations

import os
import time

from . import jsonlite as json

TYPE_CHECKING = False  # not typing's: importing typing costs ~2 ms, and nothing here needs it
if TYPE_CHECKING:
    from typing import Any

DEFAULT_DIR = "/var/lib/netagent/cni-queue"
SUFFIX = ".json"
REJECTED = ".rejected"


def enqueue(directory: str, record: dict[str, Any]) -> str:
    """Record a DEL (``command``, ``containerID``, ``ifname``, ``netns``, ``args``,
    ``config``); ``queued_at`` is added. Returns the file."""
    os.makedirs(directory, mode=0o700, exist_ok=True)
    record = {**record, "queued_at": time.time()}
    name = f"{time.time_ns():020d}-{os.getpid()}{SUFFIX}"
    tmp = os.path.join(directory, f".{name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.write(fd, json.dumps(record).encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    path = os.path.join(directory, name)
    os.replace(tmp, path)
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return path


def pending(directory: str) -> list[str]:
    """The queued DELs, oldest first (none when the directory does not exist)."""
    try:
        names = os.listdir(directory)
    except (FileNotFoundError, NotADirectoryError):
        return []
    return [os.path.join(directory, n) for n in sorted(names) if n.endswith(SUFFIX)]


def load(path: str) -> dict[str, Any] | None:
    """A queued DEL, or None when the file is not one (or is gone)."""
    try:
        with open(path, "rb") as f:
            doc = json.loads(f.read())
    except (OSError, ValueError):
        return None
    if (
        not isinstance(doc, dict)
        or doc.get("command") != "DEL"
        or not isinstance(doc.get("config"), dict)
        or not isinstance(doc.get("queued_at"), (int, float))
    ):
        return None
    return doc


def done(path: str) -> None:
    try:  # noqa: SIM105 - contextlib costs the plugin ~1 ms to import
        os.unlink(path)
    except FileNotFoundError:
        pass


def reject(path: str, why: str) -> None:
    """Set a record aside that can never be carried out (kept for a person to read)."""
    try:
        os.replace(path, path + REJECTED)
        with open(path + REJECTED + ".why", "w") as f:
            f.write(why + "\n")
    except OSError:
        pass
