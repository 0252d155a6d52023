"""The real daemon over damaged state files: each hole in the sequence stops the start
with the file and the last good sequence (never a traceback, never a silent loss);
``run --recover`` starts from it; an unfinished last line is reported; an intent today's
checks refuse is quarantined while the rest is installed."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from netagent.agent import replay as R
from netagent.cli.sandbox import Sandbox
from tests.support.daemon import Daemon
from tests.support.protocol import request
from tests.support.state import nft_forwards
from tests.support.statefiles import build, files, forward, journal_lines, line

pytestmark = pytest.mark.e2e


def drop_line(n: int) -> Callable[[Path], None]:
    def damage(state: Path) -> None:
        lines = journal_lines(state)
        (state / "journal.jsonl").write_bytes(b"".join(lines[:n] + lines[n + 1 :]))

    return damage


def gap(state: Path) -> None:
    """Seq 6 appended after seq 5 was lost with 4: the journal jumps 3 -> 6."""
    lines = journal_lines(state)
    entry = json.loads(lines[-1])
    (state / "journal.jsonl").write_bytes(b"".join(lines[:-2]) + R.entry_line(6, entry["changes"]))


def empty_journal(state: Path) -> None:
    (state / "journal.jsonl").write_bytes(b"")


def no_snapshot(state: Path) -> None:
    (state / "state.json").unlink()


def journal_dir(state: Path) -> None:
    (state / "journal.jsonl").unlink()
    (state / "journal.jsonl").mkdir()


def lock_dir(state: Path) -> None:
    (state / "lock").unlink(missing_ok=True)
    (state / "lock").mkdir()


#: damage -> (what the refusal says, the last good sequence it names or None)
DAMAGES: dict[str, tuple[Callable[[Path], None], str, int | None]] = {
    # the files: state.json at seq 1, journal: header (base 1), seqs 2..5
    "a deleted middle line": (drop_line(2), "seq 4 follows seq 2: seq 3 is missing", 2),
    "a sequence gap": (gap, "seq 6 follows seq 3: seqs 4-5 are missing", 3),
    "an emptied journal": (empty_journal, "journal.jsonl has no header and no line", 1),
    "a deleted state.json": (
        no_snapshot,
        "state.json is missing, and journal.jsonl continues from seq 1",
        0,
    ),
    "a journal that is a directory": (journal_dir, "journal.jsonl is a directory", 1),
    "a lock that is a directory": (lock_dir, "lock is a directory, not netagent's lock", None),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_damaged_state_stops_the_start_with_the_last_good_seq(
    sandbox: Sandbox, workdir: Path, damage: str
) -> None:
    d = Daemon(sandbox, workdir)
    build(d.state_dir, 5, compact_at=(1,))
    harm, says, last_good = DAMAGES[damage]
    harm(d.state_dir)
    before = files(d.state_dir)
    code, log = d.run_to_exit()
    print(f"{damage}: exit {code}: {log.strip().splitlines()[-1]}")
    assert code == 6, log
    assert "Traceback" not in log and "netagent ready" not in log
    assert says in log
    if last_good is not None:
        assert f"the last good sequence is {last_good};" in log
        assert "netagent run --recover" in log
    # nothing written, nothing reset (the lock is taken before the files are read)
    after = files(d.state_dir)
    assert {k: v for k, v in after.items() if k != "lock"} == {
        k: v for k, v in before.items() if k != "lock"
    }
    assert not Path(d.socket).exists()


def test_recover_starts_from_the_last_good_sequence(sandbox: Sandbox, workdir: Path) -> None:
    d = Daemon(sandbox, workdir, extra=["--recover"])
    build(d.state_dir, 5, compact_at=(1,))
    drop_line(2)(d.state_dir)  # seq 3 is gone: 1 (snapshot) and 2 are good
    damaged = files(d.state_dir)
    d.start()
    keys = {f["key"] for f in request(d.socket, "fwd.list")["result"]}
    assert keys == {forward(1).key, forward(2).key}
    assert set(nft_forwards(d)) == {
        ("tcp", 9001, "10.6.0.2:80"),
        ("tcp", 9002, "10.6.0.3:80"),
    }
    [note] = d.status()["state_notes"]
    assert "started from seq 2" in note
    [aside] = d.state_dir.glob("aside-*")
    assert str(aside) in note
    assert (aside / "journal.jsonl").read_bytes() == damaged["journal.jsonl"]
    assert "started from the last good state; the damaged files are set aside" in d.event_names(
        since_start=True
    )
    # a change after the recovery, then a plain start: nothing is damaged any more
    d.ok("forward", "9010", "10.6.0.50:80")
    d.stop()
    d.extra = []
    d.start()
    keys = {f["key"] for f in request(d.socket, "fwd.list")["result"]}
    assert keys == {forward(1).key, forward(2).key, "fwd/tcp/9010"}
    assert d.status()["state_notes"] == []


def test_recover_leaves_what_the_lost_lines_made_as_orphans(
    sandbox: Sandbox, workdir: Path
) -> None:
    """The namespaces the lines after the hole made carry netagent's mark, and the
    recovered state does not hold them: shown as orphans, left in place (they may be in
    use), removed only by ``purge --orphans``."""
    d = Daemon(sandbox, workdir)
    d.start()
    for name in ("a", "b", "c"):
        d.ok("ns", "add", name)
    assert d.stop() == 0
    drop_line(2)(d.state_dir)  # the header, seq 1 (a), [seq 2 (b) gone], seq 3 (c)
    assert d.run_to_exit()[0] == 6
    d.extra = ["--recover"]
    d.start()
    assert [i["key"] for i in d.ctl_json("show")["intents"]] == ["ns/a"]
    orphans = {o["describe"] for o in d.ctl_json("show")["orphans"]}
    assert orphans == {"namespace b (marked ns/b)", "namespace c (marked ns/c)"}
    assert netns(d) == {"a", "b", "c"}
    d.ok("purge", "--yes", "--orphans")
    assert netns(d) == {"a"}


def netns(d: Daemon) -> set[str]:
    return {line.split()[0] for line in d.sh("ip", "netns", "list").stdout.splitlines()}


def test_an_unfinished_last_line_is_reported_and_not_carried_out(
    sandbox: Sandbox, workdir: Path
) -> None:
    """A whole line with a valid checksum but no newline: the write had not finished, so
    it was never fsynced nor answered. The daemon starts without it and says so."""
    d = Daemon(sandbox, workdir)
    build(d.state_dir, 2)
    unfinished = line(3, forward(3).key, forward(3).to_dict())[:-1]
    with open(d.state_dir / "journal.jsonl", "ab") as f:
        f.write(unfinished)
    d.start()
    keys = {f["key"] for f in request(d.socket, "fwd.list")["result"]}
    assert keys == {forward(1).key, forward(2).key}
    [note] = d.status()["state_notes"]
    assert "a whole entry, seq 3, checksum valid" in note and "never acknowledged" in note
    [kept] = d.state_dir.glob("aside-*/journal-tail")
    assert kept.read_bytes() == unfinished
    [warning] = [
        e for e in d.log_events(since_start=True) if e.get("event", "").startswith("the journal's")
    ]
    assert warning["level"] == "warning" and warning["entry_seq"] == 3
    assert "NOTE" in d.ok("status")


# ---- quarantine on load ---------------------------------------------------------------
SCOPED = {
    "kind": "forward",
    "proto": "tcp",
    "host_port": 8082,
    "dest_ip": "fe80::1%eth0",
    "dest_port": 80,
}
BROADCAST = {
    "kind": "forward",
    "proto": "tcp",
    "host_port": 8083,
    "dest_ip": "255.255.255.255",
    "dest_port": 80,
}
GOOD = {
    "kind": "forward",
    "proto": "tcp",
    "host_port": 8081,
    "dest_ip": "10.6.0.2",
    "dest_port": 80,
}


def test_refused_intents_are_quarantined_and_the_rest_installed(
    sandbox: Sandbox, workdir: Path
) -> None:
    """Forwards an older netagent journaled (valid checksums) to ``[fe80::1%eth0]:80``
    and 255.255.255.255: the start goes on, the good forward is installed, the two are
    reported, kept, and dropped only by ``ctl forget``."""
    d = Daemon(sandbox, workdir)
    d.state_dir.mkdir(mode=0o700)
    (d.state_dir / "journal.jsonl").write_bytes(
        R.header_line(0)
        + line(1, "fwd/tcp/8082/ipv6", SCOPED)
        + line(2, "fwd/tcp/8081", GOOD)
        + line(3, "fwd/tcp/8083", BROADCAST)
        + line(4, "ns/red", {"kind": "ns", "name": "red"})
    )
    d.start()
    assert set(nft_forwards(d)) == {("tcp", 8081, "10.6.0.2:80")}
    assert "red" in d.sh("ip", "netns", "list").stdout
    show = d.ctl_json("show")
    assert [q["key"] for q in show["quarantined"]] == ["fwd/tcp/8082/ipv6", "fwd/tcp/8083"]
    assert show["quarantined"][0]["intent"] == SCOPED
    assert all(i["in_place"] for i in show["intents"]), show["intents"]
    status = d.status()
    assert "scope" in status["quarantined"]["fwd/tcp/8082/ipv6"]
    assert status["summary"].endswith("2 quarantined")
    assert "!!  quarantined: fwd/tcp/8083:" in d.ok("show")
    assert "QUARANTINED fwd/tcp/8083" in d.ok("status")

    out = d.ok("forget", "fwd/tcp/8083")
    assert "forgotten: quarantined forward fwd/tcp/8083" in out
    assert d.ctl("forget", "fwd/tcp/8083").returncode == 3  # not found
    d.restart()
    assert [q["key"] for q in d.ctl_json("show")["quarantined"]] == ["fwd/tcp/8082/ipv6"]
    assert set(nft_forwards(d)) == {("tcp", 8081, "10.6.0.2:80")}
