"""Durable state: journal, torn writes, corruption, compaction (no root)."""

import os
from pathlib import Path

import pytest

from netagent.agent import errors as E
from netagent.agent import intents as I
from netagent.agent import store as S
from netagent.agent.state import DesiredState


def replay(directory: Path) -> DesiredState:
    st = DesiredState()
    st.load_changes(S.StateStore(directory).load())
    return st


def record(store: S.StateStore, state: DesiredState, fn) -> None:  # type: ignore[no-untyped-def]
    with state.transaction() as changes:
        fn()
    store.append(changes)


def test_round_trip(tmp_path: Path) -> None:
    store, state = S.StateStore(tmp_path), DesiredState()
    store.load()
    record(store, state, lambda: state.add_namespace("red"))
    record(store, state, lambda: state.add_forward(I.make_forward("80", "10.0.0.2:80")))
    record(store, state, lambda: state.del_forward("tcp", 80, 1, None))
    store.close()
    assert replay(tmp_path).to_wire() == state.to_wire()


def test_torn_last_line_is_dropped(tmp_path: Path) -> None:
    store, state = S.StateStore(tmp_path), DesiredState()
    store.load()
    record(store, state, lambda: state.add_namespace("red"))
    store.close()
    with open(tmp_path / "journal.jsonl", "ab") as f:
        f.write(b'{"seq": 2, "changes": [{"key": "ns/bl')  # died inside write()
    assert replay(tmp_path).to_wire() == [{"kind": "ns", "name": "red"}]
    # the torn bytes were cut: the next append starts on a clean line
    assert (tmp_path / "journal.jsonl").read_bytes().endswith(b"\n")


def test_corrupt_journal_line_stops_start(tmp_path: Path) -> None:
    store, state = S.StateStore(tmp_path), DesiredState()
    store.load()
    record(store, state, lambda: state.add_namespace("red"))
    store.close()
    with open(tmp_path / "journal.jsonl", "ab") as f:
        f.write(b"not json\n")
    with pytest.raises(E.StateCorrupt, match=r"journal\.jsonl is damaged.*line 2") as exc:
        S.StateStore(tmp_path).load()
    assert "keep a copy of journal.jsonl" in exc.value.message


def test_a_flipped_key_is_caught_by_the_checksum(tmp_path: Path) -> None:
    store, state = S.StateStore(tmp_path), DesiredState()
    store.load()
    record(store, state, lambda: state.add_forward(I.make_forward("9", "10.0.0.2:9")))
    record(store, state, lambda: state.del_forward("tcp", 9, 1, None))
    store.close()
    journal = tmp_path / "journal.jsonl"
    journal.write_bytes(
        journal.read_bytes().replace(
            b'"key":"fwd/tcp/9","intent":null', b'"key":"fwd/tcp/8","intent":null'
        )
    )
    with pytest.raises(E.StateCorrupt, match="checksum mismatch"):
        S.StateStore(tmp_path).load()


def test_a_failed_append_leaves_no_partial_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, state = S.StateStore(tmp_path), DesiredState()
    store.load()
    record(store, state, lambda: state.add_namespace("red"))
    real_write = os.write

    def half_then_enospc(fd: int, data: bytes) -> int:
        real_write(fd, bytes(data[:10]))
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "write", half_then_enospc)
    with pytest.raises(OSError, match="No space"):
        record(store, state, lambda: state.add_namespace("blue"))
    monkeypatch.undo()
    record(store, state, lambda: state.add_namespace("green"))
    store.close()
    names = [d["name"] for d in replay(tmp_path).to_wire()]
    assert names == ["green", "red"]


def test_corrupt_snapshot_names_last_good_copy(tmp_path: Path) -> None:
    store, state = S.StateStore(tmp_path), DesiredState()
    store.load()
    record(store, state, lambda: state.add_namespace("red"))
    store.compact(state.to_wire())
    record(store, state, lambda: state.add_namespace("blue"))
    store.compact(state.to_wire())
    store.close()
    (tmp_path / "state.json").write_bytes(b'{"format": 1, "seq": 2, "intents": [')
    with pytest.raises(E.StateCorrupt) as exc:
        S.StateStore(tmp_path).load()
    assert str(tmp_path / "state.json") in exc.value.message
    assert "state.json.prev" in exc.value.message
    # the last good copy is real and loads
    (tmp_path / "state.json.prev").rename(tmp_path / "state.json")
    (tmp_path / "journal.jsonl").unlink()
    assert replay(tmp_path).to_wire() == [{"kind": "ns", "name": "red"}]


def test_compaction_keeps_everything(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(S, "COMPACT_EVERY", 10)
    store, state = S.StateStore(tmp_path), DesiredState()
    store.load()
    for port in range(1, 26):
        record(
            store, state, lambda p=port: state.add_forward(I.make_forward(str(p), f"10.0.0.2:{p}"))
        )
        if store.needs_compaction():
            store.compact(state.to_wire())
    store.close()
    again = replay(tmp_path)
    assert again.to_wire() == state.to_wire()
    assert len(again.of_kind(I.Forward)) == 25


def test_crash_between_snapshot_and_journal_truncate(tmp_path: Path) -> None:
    """The snapshot holds seq N, the journal still has lines <= N: they are skipped."""
    store, state = S.StateStore(tmp_path), DesiredState()
    store.load()
    record(store, state, lambda: state.add_namespace("red"))
    journal = (tmp_path / "journal.jsonl").read_bytes()
    store.compact(state.to_wire())
    store.close()
    (tmp_path / "journal.jsonl").write_bytes(journal)  # as if truncate never happened
    assert replay(tmp_path).to_wire() == [{"kind": "ns", "name": "red"}]


def test_a_damaged_key_in_the_journal_is_detected(tmp_path: Path) -> None:
    """A key damaged on disk (here into one no intent can have) in a line the store
    wrote is caught by that line's checksum, and the error names the line."""
    store, state = S.StateStore(tmp_path), DesiredState()
    store.load()
    record(store, state, lambda: state.add_forward(I.make_forward("9101", "10.6.0.98:80")))
    record(store, state, lambda: state.del_forward("tcp", 9101, 1, None))
    store.close()
    journal = tmp_path / "journal.jsonl"
    first, second = journal.read_bytes().splitlines(keepends=True)
    assert b'"key":"fwd/tcp/9101","intent":null' in second
    journal.write_bytes(first + second.replace(b"fwd/tcp/9101", b"fwd/tcp/9#01"))
    with pytest.raises(E.StateCorrupt, match=r"line 2: checksum mismatch"):
        S.StateStore(tmp_path).load()
