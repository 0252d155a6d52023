"""Durable desired state: a snapshot plus an append-only journal.

A request is acknowledged only after its changes are in the journal and fsynced, so what
was acknowledged survives ``kill -9`` at any moment. Rewriting a 10,000-forward snapshot
for every change would cost milliseconds each; appending one line costs one fdatasync.

Files in the state dir:

* ``state.json``: snapshot ``{"format": 1, "seq": N, "intents": [...]}``, written with
  temp file + fsync + rename + fsync of the directory;
* ``state.json.prev``: the snapshot before the current one, the last good copy;
* ``journal.jsonl``: one line per acknowledged request
  ``{"seq": n, "changes": [...], "crc": crc32}``.

Loading replays journal lines with a seq above the snapshot's. A torn last line (no
newline: the process died inside ``write``) was never acknowledged and is dropped; any
other damage stops the start with an error naming the file and the last good copy.
"""

from __future__ import annotations

import contextlib
import json
import os
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import NetagentError, StateCorrupt

if TYPE_CHECKING:
    from .kinds import Registry
    from .kinds.base import Intent
    from .state import Change

FORMAT = 1
COMPACT_EVERY = 2000  # journal lines


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _crc(encoded_changes: Any) -> int:
    """A checksum of a journal entry's changes: a flipped bit in a key (which a removal
    carries alone) would otherwise load as a valid, different removal."""
    canonical = json.dumps(encoded_changes, separators=(",", ":"), sort_keys=True)
    return zlib.crc32(canonical.encode())


def _encode_changes(changes: Iterable[Change]) -> list[dict[str, Any]]:
    return [{"key": c.key, "intent": None if c.new is None else c.new.to_dict()} for c in changes]


class StateStore:
    """The files. Its methods block (fsync): the daemon calls them from a worker thread,
    one at a time (under the API's commit lock)."""

    def __init__(self, directory: Path, kinds: Registry) -> None:
        self.dir = directory
        self.kinds = kinds
        self.snapshot = directory / "state.json"
        self.prev = directory / "state.json.prev"
        self.journal = directory / "journal.jsonl"
        self.seq = 0
        self._journal_lines = 0
        self._fd: int | None = None

    # ---- loading --------------------------------------------------------------------
    def _corrupt(self, path: Path, why: str) -> StateCorrupt:
        if path == self.journal:
            good = self.snapshot if self.snapshot.exists() else None
            hint = (
                f"the last good copy is {good} (the changes after it are in the journal); "
                f"keep a copy of {path.name}, then move it away to start from {good.name}"
                if good
                else f"no snapshot exists; keep a copy of {path.name}, repair or remove "
                "the damaged line, and start again"
            )
        else:
            good = self.prev if self.prev.exists() else None
            hint = (
                f"the last good copy is {good}; keep a copy of both, then copy "
                f"{good.name} over {path.name} and move the journal away to start from it"
                if good
                else f"no earlier copy exists; keep a copy of {path.name} and repair it"
            )
        return StateCorrupt(
            f"state file {path} is damaged ({why}); {hint}",
            file=str(path),
            last_good=str(good) if good else None,
        )

    def load(self) -> list[tuple[str, Intent | None]]:
        """Everything persisted, as an ordered list of (key, intent or None)."""
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        changes: list[tuple[str, Intent | None]] = []
        snap_seq = 0
        if self.snapshot.exists():
            try:
                doc = json.loads(self.snapshot.read_bytes())
                if not isinstance(doc, dict) or doc.get("format") != FORMAT:
                    raise ValueError(
                        f"unknown format {doc.get('format') if isinstance(doc, dict) else doc!r}"
                    )
                snap_seq = int(doc["seq"])
                for d in doc["intents"]:
                    intent = self.kinds.from_dict(d)
                    changes.append((intent.key, intent))
            except (ValueError, KeyError, TypeError, NetagentError) as exc:
                raise self._corrupt(self.snapshot, str(exc)) from None
        self.seq = snap_seq
        if self.journal.exists():
            raw = self.journal.read_bytes()
            lines = raw.split(b"\n")
            torn = lines.pop()  # bytes after the last newline: a write that never finished
            count = 0
            for n, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    entry = json.loads(line)
                    seq = int(entry["seq"])
                    if entry["crc"] != _crc(entry["changes"]):
                        raise ValueError("checksum mismatch")
                    if seq <= snap_seq:
                        continue
                    for c in entry["changes"]:
                        key = c["key"]
                        if not isinstance(key, str):
                            raise TypeError("key is not a string")
                        d = c["intent"]
                        put = None if d is None else self.kinds.from_dict(d)
                        if put is not None and put.key != key:
                            raise ValueError(f"key {key!r} does not match its intent")
                        changes.append((key, put))
                    self.seq = max(self.seq, seq)
                    count += 1
                except (ValueError, KeyError, TypeError, NetagentError) as exc:
                    raise self._corrupt(self.journal, f"line {n}: {exc}") from None
            if torn:
                # never acknowledged; cut it so the next append starts on a clean line
                with open(self.journal, "r+b") as f:
                    f.truncate(len(raw) - len(torn))
                    os.fsync(f.fileno())
            self._journal_lines = count
        return changes

    # ---- writing --------------------------------------------------------------------
    def _journal_fd(self) -> int:
        if self._fd is None:
            self._fd = os.open(self.journal, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            _fsync_dir(self.dir)
        return self._fd

    def append(self, changes: list[Change]) -> None:
        """Make changes durable. Returns only when they are on disk."""
        if not changes:
            return
        encoded = _encode_changes(changes)
        entry = {"seq": self.seq + 1, "changes": encoded, "crc": _crc(encoded)}
        line = json.dumps(entry, separators=(",", ":")).encode() + b"\n"
        fd = self._journal_fd()
        end = os.lseek(fd, 0, os.SEEK_END)
        try:
            view = memoryview(line)
            while view:
                n = os.write(fd, view)
                view = view[n:]
            os.fdatasync(fd)
        except OSError:
            # disk full or an I/O error: take back the part that was written, so later
            # lines do not follow a broken one; the caller undoes the change in memory
            with contextlib.suppress(OSError):
                os.ftruncate(fd, end)
            raise
        self.seq += 1
        self._journal_lines += 1

    def needs_compaction(self) -> bool:
        return self._journal_lines >= COMPACT_EVERY

    def compact(self, intents: list[dict[str, Any]]) -> None:
        """Write a new snapshot of the whole state, keep the old one as the last good
        copy, then empty the journal. A crash between any two steps loses nothing: the
        journal's lines carry seqs and those the snapshot holds are skipped."""
        doc = json.dumps({"format": FORMAT, "seq": self.seq, "intents": intents}).encode()
        if self.snapshot.exists():
            tmp = self.prev.with_name(self.prev.name + ".tmp")
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            os.link(self.snapshot, tmp)
            os.replace(tmp, self.prev)
        _atomic_write(self.snapshot, doc)
        fd = self._journal_fd()
        os.ftruncate(fd, 0)
        os.fsync(fd)
        self._journal_lines = 0

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
