"""Durable desired state: a snapshot plus an append-only journal.

A request is acknowledged only after its changes are in the journal and fsynced, so what
was acknowledged survives ``kill -9`` at any moment. Rewriting a 10,000-forward snapshot
for every change would cost milliseconds each; appending one line costs one fdatasync.

Files in the state dir (``docs/state.md`` has their format):

* ``state.json``: the snapshot, everything up to its ``seq``, with a checksum; written
  with temp file + fsync + rename + fsync of the directory;
* ``state.json.prev``: the snapshot before the current one, the last good copy;
* ``journal.jsonl``: a header (the seq its lines continue from), then one line per
  acknowledged request ``{"seq": n, "changes": [...], "crc": crc32}``, each seq one more
  than the one before;
* ``aside-<time>/``: what a start set aside (an unfinished last line, or with
  ``--recover`` the damaged files).

Loading replays the journal lines after the snapshot's seq. Anything missing shows as a
hole in the sequence (a deleted line, a gap, an emptied journal, a snapshot that is gone
while the journal continues past it) and stops the start with an error naming the file
and the last good sequence; ``netagent run --recover`` starts from that sequence instead
and keeps the damaged files aside. An unfinished last line (no newline: the write never
finished, so it was never fsynced nor answered) is not carried out; it is set aside and
reported. An intent today's checks refuse is quarantined (``agent/quarantine.py``), not
damage. Every file is opened relative to the checked state dir, never through a link
(``agent/paths.py``).
"""

from __future__ import annotations

import contextlib
import os
import stat
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from .errors import StateCorrupt
from .paths import TrustedDir
from .quarantine import Quarantine, Quarantined, admit
from .replay import (
    EMPTY,
    Entry,
    Journal,
    Snapshot,
    entry_line,
    header_line,
    parse_journal,
    parse_snapshot,
    snapshot_bytes,
    walk,
)

if TYPE_CHECKING:
    from .kinds import Registry
    from .kinds.base import Intent
    from .state import Change

log = structlog.get_logger("netagent.store")

SNAPSHOT, PREV, JOURNAL = "state.json", "state.json.prev", "journal.jsonl"
COMPACT_EVERY = 2000  # journal lines
FILE = "state file"


@dataclass
class Damage:
    name: str  # the file, in the state dir
    why: str
    #: every change up to this seq is in the last good copy (and the journal before it)
    last_good: int
    #: the file that holds the last good state (None: nothing before it)
    good: str | None


def _encode_changes(changes: Iterable[Change]) -> list[dict[str, Any]]:
    return [{"key": c.key, "intent": None if c.new is None else c.new.to_dict()} for c in changes]


class StateStore:
    """The files. Its methods block (fsync): the daemon calls them from a worker thread,
    one at a time (under the API's commit lock)."""

    def __init__(self, directory: Path, kinds: Registry) -> None:
        self.dir = directory
        self.kinds = kinds
        self.snapshot = directory / SNAPSHOT
        self.prev = directory / PREV
        self.journal = directory / JOURNAL
        self.seq = 0
        #: intents today's checks refuse, kept aside (shown, snapshotted, ``forget``)
        self.quarantine = Quarantine()
        #: what the last load set aside or recovered, in words (``status`` shows them)
        self.notes: list[str] = []
        #: the last load started from the last good sequence of damaged files
        self.recovered = False
        self._journal_lines = 0
        #: a mirrored change was committed but its journal line not written: the next
        #: write is followed by a whole snapshot (``Service.mutate``)
        self.behind = False
        self._fd: int | None = None
        self._d: TrustedDir | None = None

    def _dir(self) -> TrustedDir:
        if self._d is None:
            if not os.path.lexists(self.dir):
                self.dir.mkdir(parents=True, mode=0o700)
            self._d = TrustedDir(self.dir, "state directory")
        return self._d

    # ---- loading --------------------------------------------------------------------
    def _read(self, name: str) -> bytes | Damage | None:
        """A state file's bytes; None when absent; Damage when it is a directory.
        A link or a file someone else may write raises UntrustedPath."""
        d = self._dir()
        st = d.lstat(name)
        if st is None:
            return None
        if stat.S_ISDIR(st.st_mode):
            return Damage(name, f"{name} is a directory, not a file", 0, None)
        d.check(name, FILE)
        return d.read(name, FILE)

    @staticmethod
    def _snapshot(raw: bytes | Damage | None) -> Snapshot | str | None:
        """The snapshot, None when absent, or why it does not read."""
        if isinstance(raw, Damage):
            return raw.why
        if raw is None:
            return None
        try:
            return parse_snapshot(raw)
        except ValueError as exc:
            return str(exc)

    def load(self, recover: bool = False) -> list[tuple[str, Intent | None]]:
        """Everything persisted, as (key, intent) pairs. Raises StateCorrupt when
        something acknowledged is missing or damaged (then nothing is written); with
        ``recover``, starts from the last good sequence instead and keeps the damaged
        files aside."""
        self.notes = []
        self.recovered = False
        snap = self._snapshot(self._read(SNAPSHOT))
        prev = self._snapshot(self._read(PREV))
        raw_journal = self._read(JOURNAL)
        journal = parse_journal(raw_journal) if isinstance(raw_journal, bytes) else Journal()
        damage = self._damage(snap, prev, raw_journal, journal)
        good_prev = prev if isinstance(prev, Snapshot) else None
        if damage is None:
            assert not isinstance(snap, str)
            base = snap or EMPTY
        elif damage.name == JOURNAL:
            assert isinstance(snap, Snapshot) or snap is None
            base = snap or EMPTY
        else:
            base = good_prev or EMPTY
        steps = walk(base.seq, journal) if damage is None or damage.name == JOURNAL else None
        entries = steps.entries if steps is not None else []
        live, held, stopped = self._replay(base, entries)
        if stopped is not None and damage is None:
            entry, why = stopped
            damage = self._journal_damage(snap, f"line {entry.line}: {why}", entry.seq - 1)
        if damage is not None and not recover:
            raise self._refuse(damage)
        self.quarantine.replace(held)
        self._journal_lines = len(entries)
        if damage is not None:
            highest = max(
                [journal.highest, *(s.seq for s in (snap, prev) if isinstance(s, Snapshot))]
            )
            self._recover(damage, live, highest)
        else:
            self.seq = entries[-1].seq if entries else base.seq
            if journal.tail.strip():
                assert isinstance(raw_journal, bytes)
                self._set_tail_aside(journal, len(raw_journal))
            old_snapshot = isinstance(snap, Snapshot) and snap.format < 2
            if old_snapshot or (raw_journal is not None and journal.base is None):
                self.compact([i.to_dict() for i in self._ordered(live)])  # to today's format
                log.info("state files written in today's format", seq=self.seq)
            elif raw_journal is None:
                self._new_journal(self.seq)  # a new state dir
        if held:
            log.warning(
                "intents kept aside: today's checks refuse them (show lists them; "
                "`netagent ctl forget KEY` drops one)",
                quarantined={q.key: q.reason for q in held.values()},
            )
        return [(i.key, i) for i in self._ordered(live)]

    def _ordered(self, live: dict[str, Intent]) -> list[Intent]:
        return sorted(live.values(), key=self.kinds.sort_key)

    def _damage(
        self,
        snap: Snapshot | str | None,
        prev: Snapshot | str | None,
        raw_journal: bytes | Damage | None,
        journal: Journal,
    ) -> Damage | None:
        """What is missing or damaged, first the snapshot, then the journal."""
        prev_seq = prev.seq if isinstance(prev, Snapshot) else 0
        good_prev = PREV if isinstance(prev, Snapshot) else None
        if isinstance(snap, str):
            return Damage(SNAPSHOT, snap, prev_seq, good_prev)
        if snap is None:
            first = journal.entries[0].seq if journal.entries else None
            if prev is not None:
                return Damage(
                    SNAPSHOT, f"{SNAPSHOT} is missing, but {PREV} is there", prev_seq, good_prev
                )
            if journal.base:
                return Damage(
                    SNAPSHOT,
                    f"{SNAPSHOT} is missing, and {JOURNAL} continues from seq {journal.base}",
                    0,
                    None,
                )
            if journal.base is None and first is not None and first > 1:
                return Damage(
                    SNAPSHOT,
                    f"{SNAPSHOT} is missing, and {JOURNAL} begins at seq {first}",
                    0,
                    None,
                )
        if isinstance(raw_journal, Damage):
            return self._journal_damage(snap, raw_journal.why, snap.seq if snap else 0)
        if raw_journal is None:
            if snap is None:
                return None  # a new state dir
            return self._journal_damage(
                snap, f"{JOURNAL} is missing; the changes after seq {snap.seq} are gone", snap.seq
            )
        if journal.base is None and not journal.entries and journal.damage is None:
            if snap is None or snap.format >= 2:
                return self._journal_damage(
                    snap,
                    f"{JOURNAL} has no header and no line: it was emptied, as a "
                    "journal always begins with its header",
                    snap.seq if snap else 0,
                )
            return None  # format 1: a compaction empties the journal
        steps = walk(snap.seq if snap else 0, journal)
        if steps.damage is not None:
            return self._journal_damage(snap, steps.damage, steps.last_good)
        return None

    @staticmethod
    def _journal_damage(snap: Snapshot | str | None, why: str, last_good: int) -> Damage:
        return Damage(JOURNAL, why, last_good, SNAPSHOT if isinstance(snap, Snapshot) else None)

    def _replay(
        self, base: Snapshot, entries: list[Entry]
    ) -> tuple[dict[str, Intent], dict[str, Quarantined], tuple[Entry, str] | None]:
        """The intents, the quarantined ones, and the entry where replay had to stop (a
        key that does not match its intent: damage)."""
        live: dict[str, Intent] = {}
        held: dict[str, Quarantined] = {}
        for q in base.quarantined:  # kept aside before: tried again
            key = q["key"]
            try:
                intent, again = admit(self.kinds, q.get("intent"), key, int(q.get("seq", 0)))
            except (ValueError, TypeError):  # its key no longer matches: keep it as it was
                intent = None
                again = Quarantined(key, q.get("intent") or {}, str(q.get("reason", "?")), 0)
            if intent is not None:
                live[key] = intent
            elif again is not None:
                held[key] = again
        for d in base.intents:
            intent, refused = admit(self.kinds, d, None, base.seq)
            if intent is not None:
                live[intent.key] = intent
                held.pop(intent.key, None)
            elif refused is not None:
                held[refused.key] = refused
        for entry in entries:
            for key, d in entry.changes:
                if d is None:
                    live.pop(key, None)
                    held.pop(key, None)
                    continue
                try:
                    intent, refused = admit(self.kinds, d, key, entry.seq)
                except ValueError as exc:
                    return live, held, (entry, str(exc))
                if intent is not None:
                    live[key] = intent
                    held.pop(key, None)
                elif refused is not None:
                    live.pop(key, None)
                    held[key] = refused
        return live, held, None

    def _refuse(self, damage: Damage) -> StateCorrupt:
        path = self.dir / damage.name
        good = (
            f"the last good copy is {self.dir / damage.good}"
            if damage.good
            else "there is no earlier copy"
        )
        what = (
            f"state file {path}: {damage.why}"
            if damage.why.startswith(damage.name)  # missing, empty, a directory
            else f"state file {path} is damaged ({damage.why})"
        )
        start = f"seq {damage.last_good}" + (" (an empty state)" if not damage.last_good else "")
        return StateCorrupt(
            f"{what}; the last good sequence is {damage.last_good}; {good}; nothing was "
            f"changed. `netagent run --recover` starts from {start} and keeps the "
            f"damaged files aside in {self.dir}/aside-<time>/; or keep a copy of "
            f"{damage.name}, repair it, and start again (docs/state.md)",
            file=str(path),
            last_good_seq=damage.last_good,
            last_good=str(self.dir / damage.good) if damage.good else None,
        )

    # ---- setting aside --------------------------------------------------------------
    def _aside_dir(self) -> str:
        d = self._dir()
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        for n in range(100):
            name = f"aside-{stamp}" + (f"-{n}" if n else "")
            try:
                os.mkdir(name, 0o700, dir_fd=d.fd)
            except FileExistsError:
                continue
            return name
        raise StateCorrupt(f"cannot make a directory to set files aside in {self.dir}")

    def _set_tail_aside(self, journal: Journal, size: int) -> None:
        """An unfinished last line was never acknowledged (it had no newline, so the
        write never finished: no fsync, no answer). It is not carried out, and not
        dropped without a word: kept in a file, logged, shown by ``status``."""
        d = self._dir()
        aside = self._aside_dir()
        d.write_new(f"{aside}/journal-tail", journal.tail, FILE)
        fd = d.open(JOURNAL, os.O_WRONLY, FILE)
        try:
            os.ftruncate(fd, size - len(journal.tail))
            os.fsync(fd)
        finally:
            os.close(fd)
        d.fsync()
        e = journal.tail_entry
        what = (
            f"a whole entry, seq {e.seq}, checksum valid, changing "
            f"{', '.join(k for k, _ in e.changes[:5])}"
            if e is not None
            else f"{len(journal.tail)} bytes of an unfinished line"
        )
        kept = self.dir / aside / "journal-tail"
        self.notes.append(
            f"{self.journal} ended in a line without its newline ({what}): never "
            f"acknowledged, not carried out; kept in {kept}"
        )
        log.warning(
            "the journal's last line was never finished: not carried out, set aside",
            journal=str(self.journal),
            kept=str(kept),
            entry_seq=e.seq if e is not None else None,
            keys=[k for k, _ in e.changes] if e is not None else None,
            size=len(journal.tail),
        )

    def _recover(self, damage: Damage, live: dict[str, Intent], highest: int) -> None:
        """``--recover``: move every state file aside as it is, then write the state
        of the last good sequence as a new snapshot. Seqs continue after the highest
        any file named, so no seq ever means two changes."""
        d = self._dir()
        aside = self._aside_dir()
        for name in (SNAPSHOT, PREV, JOURNAL):
            if d.lstat(name) is not None:
                os.rename(name, f"{aside}/{name}", src_dir_fd=d.fd, dst_dir_fd=d.fd)
        d.fsync()
        self.seq = highest
        self.recovered = True
        intents = [i.to_dict() for i in self._ordered(live)]
        d.write_atomic(SNAPSHOT, self._snapshot_doc(intents), FILE)
        self._new_journal(self.seq)
        lost = (
            f"the changes after seq {damage.last_good} (up to seq {highest}) are not loaded"
            if highest > damage.last_good
            else f"changes after seq {damage.last_good}, if there were any, are lost"
        )
        note = (
            f"recovered from damaged state ({damage.name}: {damage.why}): started from seq "
            f"{damage.last_good} ({damage.good or 'nothing earlier'}); {lost}; the damaged "
            f"files are kept in {self.dir / aside}"
        )
        self.notes.append(note)
        log.warning(
            "started from the last good state; the damaged files are set aside",
            file=str(self.dir / damage.name),
            damage=damage.why,
            last_good_seq=damage.last_good,
            highest_seq=highest,
            aside=str(self.dir / aside),
            intents=len(live),
        )

    # ---- writing --------------------------------------------------------------------
    def _snapshot_doc(self, intents: list[dict[str, Any]]) -> bytes:
        quarantined = [q.to_dict() for q in self.quarantine.entries()]
        return snapshot_bytes(self.seq, intents, quarantined)

    def _new_journal(self, base: int) -> None:
        """A journal of no lines that continues from ``base``, put in place whole."""
        self._dir().write_atomic(JOURNAL, header_line(base), FILE)
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._journal_lines = 0

    def _journal_fd(self) -> int:
        if self._fd is None:
            try:
                self._fd = self._dir().open(JOURNAL, os.O_WRONLY | os.O_APPEND, FILE)
            except FileNotFoundError:
                # removed while running: a new one, whose header (after the snapshot's
                # seq) makes the next start notice what went with it
                self._new_journal(self.seq)
                self._fd = self._dir().open(JOURNAL, os.O_WRONLY | os.O_APPEND, FILE)
        return self._fd

    def append(self, changes: list[Change], sync: bool = True) -> None:
        """Make changes durable: :meth:`write`, then :meth:`sync` (without ``sync``,
        the line is in the kernel's page cache only)."""
        self.write(changes)
        if sync:
            self.sync()

    def write(self, changes: list[Change]) -> None:
        """The changes' journal line, written (into the page cache: a crash of the
        daemon keeps it, a crash of the host may not until :meth:`sync`). A line that
        cannot be written whole (disk full, I/O error) is taken back, so later lines do
        not follow a broken one, and OSError raised; the caller undoes the change in
        memory."""
        if not changes:
            return
        line = entry_line(self.seq + 1, _encode_changes(changes))
        fd = self._journal_fd()
        end = os.lseek(fd, 0, os.SEEK_END)
        try:
            view = memoryview(line)
            while view:
                n = os.write(fd, view)
                view = view[n:]
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, end)
            raise
        self.seq += 1
        self._journal_lines += 1
        superseded = self.quarantine.settle({c.key for c in changes})
        if superseded:
            log.info("quarantined intents superseded", keys=[q.key for q in superseded])

    def sync(self) -> None:
        """Every line written so far on disk (fdatasync; blocking: the caller's thread).
        OSError when the disk refuses: the lines may not survive a crash of the host."""
        fd = self._fd
        if fd is not None:
            os.fdatasync(fd)

    def needs_compaction(self) -> bool:
        """The journal is long, or behind the state (a mirrored change it missed)."""
        return self.behind or self._journal_lines >= COMPACT_EVERY

    def compact(self, intents: list[dict[str, Any]]) -> None:
        """Write a new snapshot of the whole state (the quarantined intents with it),
        keep the old one as the last good copy, then start a new journal after it. A
        crash between any two steps loses nothing: the old journal's lines carry seqs,
        and those the snapshot holds are skipped."""
        d = self._dir()
        doc = self._snapshot_doc(intents)
        if d.lstat(SNAPSHOT) is not None:
            tmp = PREV + ".tmp"
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp, dir_fd=d.fd)
            os.link(SNAPSHOT, tmp, src_dir_fd=d.fd, dst_dir_fd=d.fd, follow_symlinks=False)
            d.replace(tmp, PREV)
        d.write_atomic(SNAPSHOT, doc, FILE)
        self._new_journal(self.seq)
        self.behind = False

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._d is not None:
            self._d.close()
            self._d = None
