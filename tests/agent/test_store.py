"""Durable state: journal, torn writes, corruption, compaction (no root)."""

import os
from collections.abc import Callable
from functools import partial
from pathlib import Path

import pytest

from netagent.agent import errors as E
from netagent.agent import intents as I
from netagent.agent import store as S
from netagent.agent.kinds import default_kinds
from netagent.agent.state import DesiredState

KINDS = default_kinds()


def new_store(directory: Path) -> S.StateStore:
    return S.StateStore(directory, KINDS)


def new_state() -> DesiredState:
    return DesiredState(KINDS, external_namespace=lambda n: False)


def replay(directory: Path) -> DesiredState:
    st = new_state()
    st.load(new_store(directory).load())
    return st


def record(store: S.StateStore, state: DesiredState, fn: Callable[[DesiredState], object]) -> None:
    """What the API does: propose, persist, commit."""
    changes = state.propose(fn)
    store.append(changes)
    state.commit(changes)


RED = I.Namespace("red")
FWD80 = I.make_forward("80", "10.0.0.2:80")


def test_round_trip(tmp_path: Path) -> None:
    store, state = new_store(tmp_path), new_state()
    store.load()
    record(store, state, lambda s: s.put(RED))
    record(store, state, lambda s: s.put(FWD80))
    record(store, state, lambda s: s.forget(FWD80.key))
    store.close()
    assert replay(tmp_path).to_wire() == state.to_wire()


def test_torn_last_line_is_dropped(tmp_path: Path) -> None:
    store, state = new_store(tmp_path), new_state()
    store.load()
    record(store, state, lambda s: s.put(RED))
    store.close()
    with open(tmp_path / "journal.jsonl", "ab") as f:
        f.write(b'{"seq": 2, "changes": [{"key": "ns/bl')  # died inside write()
    assert replay(tmp_path).to_wire() == [{"kind": "ns", "name": "red"}]
    # the torn bytes were cut: the next append starts on a clean line
    assert (tmp_path / "journal.jsonl").read_bytes().endswith(b"\n")


def test_corrupt_journal_line_stops_start(tmp_path: Path) -> None:
    store, state = new_store(tmp_path), new_state()
    store.load()
    record(store, state, lambda s: s.put(RED))
    store.close()
    with open(tmp_path / "journal.jsonl", "ab") as f:
        f.write(b"not json\n")
    # line 1 is the header, 2 the namespace
    with pytest.raises(E.StateCorrupt, match=r"journal\.jsonl is damaged.*line 3") as exc:
        new_store(tmp_path).load()
    assert "keep a copy of journal.jsonl" in exc.value.message


def test_a_flipped_key_is_caught_by_the_checksum(tmp_path: Path) -> None:
    store, state = new_store(tmp_path), new_state()
    store.load()
    record(store, state, lambda s: s.put(I.make_forward("9", "10.0.0.2:9")))
    record(store, state, lambda s: s.forget("fwd/tcp/9"))
    store.close()
    journal = tmp_path / "journal.jsonl"
    journal.write_bytes(
        journal.read_bytes().replace(
            b'"key":"fwd/tcp/9","intent":null', b'"key":"fwd/tcp/8","intent":null'
        )
    )
    with pytest.raises(E.StateCorrupt, match="checksum mismatch"):
        new_store(tmp_path).load()


def test_a_failed_append_leaves_no_partial_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, state = new_store(tmp_path), new_state()
    store.load()
    record(store, state, lambda s: s.put(RED))
    real_write = os.write

    def half_then_enospc(fd: int, data: bytes) -> int:
        real_write(fd, bytes(data[:10]))
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "write", half_then_enospc)
    with pytest.raises(OSError, match="No space"):
        record(store, state, lambda s: s.put(I.Namespace("blue")))
    monkeypatch.undo()
    record(store, state, lambda s: s.put(I.Namespace("green")))
    store.close()
    names = [d["name"] for d in replay(tmp_path).to_wire()]
    assert names == ["green", "red"]


def test_corrupt_snapshot_names_last_good_copy(tmp_path: Path) -> None:
    store, state = new_store(tmp_path), new_state()
    store.load()
    record(store, state, lambda s: s.put(RED))
    store.compact(state.to_wire())
    record(store, state, lambda s: s.put(I.Namespace("blue")))
    store.compact(state.to_wire())
    store.close()
    (tmp_path / "state.json").write_bytes(b'{"format": 1, "seq": 2, "intents": [')
    with pytest.raises(E.StateCorrupt) as exc:
        new_store(tmp_path).load()
    assert str(tmp_path / "state.json") in exc.value.message
    assert "state.json.prev" in exc.value.message
    # the last good copy is real: a recovery starts from it
    recovered = new_state()
    recovered.load(new_store(tmp_path).load(recover=True))
    assert recovered.to_wire() == [{"kind": "ns", "name": "red"}]
    assert replay(tmp_path).to_wire() == [{"kind": "ns", "name": "red"}]


def test_compaction_keeps_everything(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(S, "COMPACT_EVERY", 10)
    store, state = new_store(tmp_path), new_state()
    store.load()
    for port in range(1, 26):
        fwd = I.make_forward(str(port), f"10.0.0.2:{port}")
        record(store, state, partial(DesiredState.put, intent=fwd))
        if store.needs_compaction():
            store.compact(state.to_wire())
    store.close()
    again = replay(tmp_path)
    assert again.to_wire() == state.to_wire()
    assert len(again.of_kind("forward")) == 25


def test_crash_between_snapshot_and_journal_truncate(tmp_path: Path) -> None:
    """The snapshot holds seq N, the journal still has lines <= N: they are skipped."""
    store, state = new_store(tmp_path), new_state()
    store.load()
    record(store, state, lambda s: s.put(RED))
    journal = (tmp_path / "journal.jsonl").read_bytes()
    store.compact(state.to_wire())
    store.close()
    (tmp_path / "journal.jsonl").write_bytes(journal)  # as if truncate never happened
    assert replay(tmp_path).to_wire() == [{"kind": "ns", "name": "red"}]


def test_a_damaged_key_in_the_journal_is_detected(tmp_path: Path) -> None:
    """A key damaged on disk (here into one no intent can have) in a line the store
    wrote is caught by that line's checksum, and the error names the line."""
    store, state = new_store(tmp_path), new_state()
    store.load()
    fwd = I.make_forward("9101", "10.6.0.98:80")
    record(store, state, partial(DesiredState.put, intent=fwd))
    record(store, state, partial(DesiredState.forget, key=fwd.key))
    store.close()
    journal = tmp_path / "journal.jsonl"
    header, first, second = journal.read_bytes().splitlines(keepends=True)
    assert b'"key":"fwd/tcp/9101","intent":null' in second
    journal.write_bytes(header + first + second.replace(b"fwd/tcp/9101", b"fwd/tcp/9#01"))
    with pytest.raises(E.StateCorrupt, match=r"line 3: checksum mismatch"):
        new_store(tmp_path).load()
