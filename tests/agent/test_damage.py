"""Damaged state files: what is missing shows as a hole in the sequence, the start stops
with the file and the last good sequence, and ``--recover`` starts from it with the
damaged files kept aside (no root)."""

from __future__ import annotations

import json
import os
import zlib
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from netagent.agent import errors as E
from netagent.agent import intents as I
from netagent.agent import replay as R
from netagent.agent import store as S
from netagent.agent.kinds import default_kinds
from netagent.agent.listen import lock_state_dir
from netagent.agent.state import Change
from tests.support.statefiles import build, files, forward, journal_lines

KINDS = default_kinds()


def load(directory: Path, recover: bool = False) -> list[str]:
    """The keys a start loads."""
    store = S.StateStore(directory, KINDS)
    try:
        return sorted(k for k, _ in store.load(recover=recover))
    finally:
        store.close()


def keys(*numbers: int) -> list[str]:
    return sorted(forward(i).key for i in numbers)


def refused(directory: Path, match: str) -> E.StateCorrupt:
    """The start stops, names the damage, and writes nothing."""
    before = files(directory)
    with pytest.raises(E.StateCorrupt, match=match) as exc:
        load(directory)
    print(exc.value.message)
    assert files(directory) == before
    return exc.value


def test_a_deleted_middle_line_stops_the_start(tmp_path: Path) -> None:
    build(tmp_path, 5)
    lines = journal_lines(tmp_path)  # the header, then seq 1..5
    (tmp_path / "journal.jsonl").write_bytes(b"".join(lines[:3] + lines[4:]))
    err = refused(tmp_path, r"journal\.jsonl is damaged \(line 4: seq 4 follows seq 2: seq 3")
    assert "the last good sequence is 2" in err.message
    assert err.details["last_good_seq"] == 2
    assert err.details["file"] == str(tmp_path / "journal.jsonl")
    assert "netagent run --recover" in err.message


def test_a_sequence_gap_stops_the_start(tmp_path: Path) -> None:
    build(tmp_path, 2)
    store = S.StateStore(tmp_path, KINDS)
    store.load()
    store.seq += 3  # as if seqs 3-5 were written and lost
    store.append([Change(forward(6).key, None, forward(6))])
    store.close()
    err = refused(tmp_path, r"seq 6 follows seq 2: seqs 3-5 are missing")
    assert "the last good sequence is 2" in err.message


def test_a_line_twice_stops_the_start(tmp_path: Path) -> None:
    """A line copied in again (an injected replay of an old request) is no change of
    its own: it is out of sequence."""
    build(tmp_path, 3)
    lines = journal_lines(tmp_path)
    (tmp_path / "journal.jsonl").write_bytes(b"".join([*lines, lines[2]]))
    refused(tmp_path, r"line 5: seq 2 comes after seq 3")


@pytest.mark.parametrize("with_snapshot", [False, True], ids=["journal only", "after a snapshot"])
def test_an_emptied_journal_stops_the_start(tmp_path: Path, with_snapshot: bool) -> None:
    build(tmp_path, 4, compact_at=(2,) if with_snapshot else ())
    (tmp_path / "journal.jsonl").write_bytes(b"")
    err = refused(tmp_path, r"journal\.jsonl has no header and no line: it was emptied")
    assert f"the last good sequence is {2 if with_snapshot else 0}" in err.message


def test_a_journal_cut_at_the_front_stops_the_start(tmp_path: Path) -> None:
    build(tmp_path, 4)
    lines = journal_lines(tmp_path)
    (tmp_path / "journal.jsonl").write_bytes(b"".join(lines[2:]))  # header and seq 1 gone
    refused(tmp_path, r"state\.json is missing, and journal\.jsonl begins at seq 2")


def test_a_missing_journal_after_a_snapshot_stops_the_start(tmp_path: Path) -> None:
    build(tmp_path, 3, compact_at=(2,))
    (tmp_path / "journal.jsonl").unlink()
    err = refused(tmp_path, r"journal\.jsonl is missing")
    assert f"the last good copy is {tmp_path / 'state.json'};" in err.message


def test_a_deleted_snapshot_the_journal_refers_past_stops_the_start(tmp_path: Path) -> None:
    build(tmp_path, 4, compact_at=(2,))
    (tmp_path / "state.json").unlink()
    err = refused(tmp_path, r"state\.json is missing, and journal\.jsonl continues from seq 2")
    assert "the last good sequence is 0" in err.message


def test_a_deleted_snapshot_with_an_earlier_copy_names_it(tmp_path: Path) -> None:
    build(tmp_path, 5, compact_at=(2, 4))
    (tmp_path / "state.json").unlink()
    err = refused(tmp_path, r"state\.json is missing, but state\.json\.prev is there")
    assert "the last good sequence is 2" in err.message
    assert f"the last good copy is {tmp_path / 'state.json.prev'};" in err.message


def test_an_older_snapshot_put_back_stops_the_start(tmp_path: Path) -> None:
    """state.json.prev copied over state.json: the journal continues past it."""
    build(tmp_path, 5, compact_at=(2, 4))
    (tmp_path / "state.json").write_bytes((tmp_path / "state.json.prev").read_bytes())
    refused(
        tmp_path,
        r"header says it continues from seq 4, but the snapshot holds only up to "
        r"seq 2: seqs 3-4 are missing",
    )


def test_a_damaged_snapshot_is_caught_by_its_checksum(tmp_path: Path) -> None:
    build(tmp_path, 3, compact_at=(3,))
    snap = tmp_path / "state.json"
    snap.write_bytes(snap.read_bytes().replace(b"10.6.0.3", b"10.6.0.9"))
    refused(tmp_path, r"state\.json is damaged \(checksum mismatch\)")


def test_a_journal_that_is_a_directory_stops_the_start(tmp_path: Path) -> None:
    build(tmp_path, 3, compact_at=(3,))
    (tmp_path / "journal.jsonl").unlink()
    (tmp_path / "journal.jsonl").mkdir()
    err = refused(tmp_path, r"journal\.jsonl: journal\.jsonl is a directory")
    assert "the last good sequence is 3" in err.message


def test_a_lock_that_is_a_directory_stops_the_start(tmp_path: Path) -> None:
    (tmp_path / "lock").mkdir()
    with pytest.raises(E.StateCorrupt, match=r"lock is a directory, not netagent's lock file"):
        lock_state_dir(str(tmp_path))
    assert (tmp_path / "lock").is_dir()


# ---- an unfinished last line --------------------------------------------------------
def test_a_whole_last_line_without_its_newline_is_set_aside_with_a_word(tmp_path: Path) -> None:
    """Written whole, checksum valid, but its newline never was: the write had not
    finished, so it was never fsynced nor answered. Not carried out; kept and reported."""
    build(tmp_path, 2)
    line = R.entry_line(3, [{"key": forward(3).key, "intent": forward(3).to_dict()}])
    with open(tmp_path / "journal.jsonl", "ab") as f:
        f.write(line[:-1])
    with capture_logs() as logs:
        store = S.StateStore(tmp_path, KINDS)
        assert sorted(k for k, _ in store.load()) == keys(1, 2)
    [note] = store.notes
    assert "without its newline (a whole entry, seq 3, checksum valid" in note
    [warning] = [e for e in logs if e["log_level"] == "warning"]
    assert warning["entry_seq"] == 3 and warning["keys"] == [forward(3).key]
    [aside] = tmp_path.glob("aside-*/journal-tail")
    assert aside.read_bytes() == line[:-1]
    assert (tmp_path / "journal.jsonl").read_bytes().endswith(b"\n")
    # the next change takes seq 3, and everything reads back
    store.append([Change(forward(4).key, None, forward(4))])
    store.close()
    assert load(tmp_path) == keys(1, 2, 4)


def test_an_unreadable_last_line_is_set_aside_with_a_word(tmp_path: Path) -> None:
    build(tmp_path, 1)
    with open(tmp_path / "journal.jsonl", "ab") as f:
        f.write(b'{"seq": 2, "changes": [{"key": "fwd/tc')
    store = S.StateStore(tmp_path, KINDS)
    assert sorted(k for k, _ in store.load()) == keys(1)
    store.close()
    assert "38 bytes of an unfinished line" in store.notes[0]


# ---- --recover ------------------------------------------------------------------------
def test_recover_starts_from_the_last_good_sequence_and_keeps_the_files(tmp_path: Path) -> None:
    build(tmp_path, 5, compact_at=(1,))
    damaged = journal_lines(tmp_path)  # header (base 1), seq 2..5
    (tmp_path / "journal.jsonl").write_bytes(b"".join(damaged[:2] + damaged[3:]))  # seq 3 gone
    originals = files(tmp_path)
    with capture_logs() as logs:
        store = S.StateStore(tmp_path, KINDS)
        assert sorted(k for k, _ in store.load(recover=True)) == keys(1, 2)
    [aside] = tmp_path.glob("aside-*")
    kept = {p.name: p.read_bytes() for p in aside.iterdir()}
    assert kept == {n: originals[n] for n in ("state.json", "journal.jsonl")}
    assert "started from seq 2" in store.notes[0] and str(aside) in store.notes[0]
    assert any(e["event"].startswith("started from the last good state") for e in logs)
    # seqs go on after the highest any file named: no seq ever means two changes
    assert store.seq == 5
    store.append([Change(forward(6).key, None, forward(6))])
    store.close()
    assert load(tmp_path) == keys(1, 2, 6)  # and no --recover needed any more


def test_recover_from_a_damaged_snapshot_starts_from_the_earlier_copy(tmp_path: Path) -> None:
    build(tmp_path, 5, compact_at=(2, 4))
    (tmp_path / "state.json").write_bytes(b'{"format": 2, "seq": 4, "intents": [')
    assert load(tmp_path, recover=True) == keys(1, 2)
    assert load(tmp_path) == keys(1, 2)


def test_recover_from_an_emptied_journal_keeps_the_snapshot(tmp_path: Path) -> None:
    build(tmp_path, 4, compact_at=(3,))
    (tmp_path / "journal.jsonl").write_bytes(b"")
    assert load(tmp_path, recover=True) == keys(1, 2, 3)


def test_recover_moves_a_journal_directory_aside(tmp_path: Path) -> None:
    build(tmp_path, 2, compact_at=(2,))
    (tmp_path / "journal.jsonl").unlink()
    (tmp_path / "journal.jsonl").mkdir()
    assert load(tmp_path, recover=True) == keys(1, 2)
    assert (tmp_path / "journal.jsonl").is_file()
    [aside] = tmp_path.glob("aside-*")
    assert (aside / "journal.jsonl").is_dir()


def test_recover_with_nothing_damaged_changes_nothing(tmp_path: Path) -> None:
    build(tmp_path, 3, compact_at=(2,))
    before = files(tmp_path)
    assert load(tmp_path, recover=True) == keys(1, 2, 3)
    assert files(tmp_path) == before


# ---- today's files: format 1 --------------------------------------------------------
def old_line(seq: int, fwd: I.Forward) -> bytes:
    """A journal line as format 1 wrote it (the same as today's)."""
    return R.entry_line(seq, [{"key": fwd.key, "intent": fwd.to_dict()}])


def test_format_1_files_are_read_and_rewritten_in_todays_format(tmp_path: Path) -> None:
    snapshot = {"format": 1, "seq": 2, "intents": [forward(1).to_dict(), forward(2).to_dict()]}
    (tmp_path / "state.json").write_text(json.dumps(snapshot))
    (tmp_path / "journal.jsonl").write_bytes(old_line(3, forward(3)) + old_line(4, forward(4)))
    assert load(tmp_path) == keys(1, 2, 3, 4)
    assert journal_lines(tmp_path) == [R.header_line(4)]
    assert json.loads((tmp_path / "state.json").read_bytes())["format"] == R.FORMAT
    assert json.loads((tmp_path / "state.json.prev").read_bytes()) == snapshot
    assert load(tmp_path) == keys(1, 2, 3, 4)


def test_format_1_empty_journal_after_a_compaction_is_fine(tmp_path: Path) -> None:
    snapshot = {"format": 1, "seq": 7, "intents": [forward(1).to_dict()]}
    (tmp_path / "state.json").write_text(json.dumps(snapshot))
    (tmp_path / "journal.jsonl").write_bytes(b"")
    assert load(tmp_path) == keys(1)


def test_format_1_journal_without_a_snapshot_is_read(tmp_path: Path) -> None:
    (tmp_path / "journal.jsonl").write_bytes(old_line(1, forward(1)) + old_line(2, forward(2)))
    assert load(tmp_path) == keys(1, 2)


def test_format_1_gap_is_caught_too(tmp_path: Path) -> None:
    (tmp_path / "journal.jsonl").write_bytes(old_line(1, forward(1)) + old_line(3, forward(3)))
    refused(tmp_path, r"seq 3 follows seq 1: seq 2 is missing")


def test_a_compaction_cut_short_loses_nothing(tmp_path: Path) -> None:
    """The snapshot was replaced, the journal not yet: its lines up to the snapshot's
    seq are skipped, the rest replayed."""
    build(tmp_path, 3)
    old = (tmp_path / "journal.jsonl").read_bytes()
    store = S.StateStore(tmp_path, KINDS)
    store.load()
    store.compact([forward(i).to_dict() for i in (1, 2, 3)])
    store.close()
    (tmp_path / "journal.jsonl").write_bytes(old)
    assert load(tmp_path) == keys(1, 2, 3)


def test_nothing_in_a_new_state_dir_but_a_header(tmp_path: Path) -> None:
    state = tmp_path / "state"
    assert load(state) == []
    assert journal_lines(state) == [R.header_line(0)]
    assert sorted(os.listdir(state)) == ["journal.jsonl"]


def test_the_checksum_is_over_the_canonical_form_whoever_writes_it() -> None:
    """orjson writes the checksums' canonical JSON when it can (ASCII); a journal line
    written by the standard library (this netagent before, or a float orjson writes
    another way) reads back, and a flipped bit in either does not."""
    plain = [{"key": "fwd/tcp/80", "intent": {"kind": "forward", "b": [1, None], "a": "x"}}]
    assert R.crc(plain) == zlib.crc32(
        json.dumps(plain, separators=(",", ":"), sort_keys=True).encode()
    )
    wide = [{"key": "ns/blau", "intent": {"kind": "ns", "name": "Grüße"}}]
    assert R.crc(wide) == zlib.crc32(
        json.dumps(wide, separators=(",", ":"), sort_keys=True).encode()
    )
    tiny = [{"key": "a/1", "intent": {"kind": "attachment", "created": 1e-05}}]
    for changes in (plain, wide, tiny):
        std = json.dumps(
            {"seq": 1, "changes": changes, "crc": zlib.crc32(R._canonical(changes))},
            separators=(",", ":"),
        ).encode()
        for line in (R.entry_line(1, changes), std + b"\n"):
            [entry] = R.parse_journal(line).entries
            assert entry.seq == 1 and [c for _k, c in entry.changes] == [
                c["intent"] for c in changes
            ]
            flipped = line.replace(b'"kind"', b'"kine"', 1)
            assert R.parse_journal(flipped).entries == []
