"""State files written as the daemon (or an older netagent) leaves them, without running
it: the daemon's own store, or journal lines built with its own format functions."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from netagent.agent import intents as I
from netagent.agent import replay as R
from netagent.agent.kinds import default_kinds
from netagent.agent.state import Change
from netagent.agent.store import StateStore


def forward(i: int) -> I.Forward:
    """The forward request ``i`` of :func:`build` added."""
    return I.make_forward(9000 + i, f"10.6.0.{i + 1}:80")


def build(directory: Path, n: int, compact_at: tuple[int, ...] = ()) -> None:
    """n acknowledged requests (seq 1..n), request i adding :func:`forward` i, with a
    compaction after each seq in ``compact_at``."""
    store = StateStore(directory, default_kinds())
    store.load()
    live: dict[str, dict[str, Any]] = {}
    for i in range(1, n + 1):
        fwd = forward(i)
        store.append([Change(fwd.key, None, fwd)])
        live[fwd.key] = fwd.to_dict()
        if i in compact_at:
            store.compact(list(live.values()))
    store.close()


def line(seq: int, key: str, intent: dict[str, Any] | None) -> bytes:
    """One journal line (valid checksum), as netagent writes it."""
    return R.entry_line(seq, [{"key": key, "intent": intent}])


def journal_lines(directory: Path) -> list[bytes]:
    return (directory / "journal.jsonl").read_bytes().splitlines(keepends=True)


def files(directory: Path) -> dict[str, bytes]:
    """The state dir's entries (a directory as ``name/``) with their bytes."""
    out: dict[str, bytes] = {}
    for p in sorted(directory.iterdir()):
        out[p.name + "/" if p.is_dir() else p.name] = p.read_bytes() if p.is_file() else b""
    return out
