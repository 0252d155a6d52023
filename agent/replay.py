"""The state files' format, read back: what they hold, and whether anything is missing.

Pure: bytes in, values out (``agent/store.py`` does the I/O). Every acknowledged change
has a sequence number, one more than the change before it, so what is missing shows as a
hole in the sequence: the snapshot holds everything up to its ``seq``, the journal's
header says from which seq its lines continue (``base``), and its lines follow one
another by one. Formats read: 1 (no journal header, snapshot without checksum) and 2
(written today). See ``docs/state.md``.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass, field
from typing import Any

import orjson

#: the format written; the formats read are 1 and this one
FORMAT = 2
#: raw change: (key, the intent's persisted form or None for a removal)
RawChange = tuple[str, dict[str, Any] | None]


def _canonical(value: Any) -> bytes:
    """Keys sorted, no spaces, ASCII (others as ``\\u`` escapes), numbers as Python
    writes them: what the checksums are over (``docs/state.md``)."""
    return json.dumps(value, separators=(",", ":"), sort_keys=True).encode()


def crc(value: Any) -> int:
    """A checksum over the canonical JSON of a value: a flipped bit in a key (which a
    removal carries alone) would otherwise load as a valid, different removal.

    orjson writes the same bytes ten times faster (a line of 10,000 forwards: 3 ms, not
    26) when they are ASCII and no float needs an exponent (``1e-05`` is ``0.00001``
    to orjson): the ASCII test is made here, and :func:`crc_ok` accepts either form's
    checksum, so a float of that kind reads back all the same."""
    try:
        fast = orjson.dumps(value, option=orjson.OPT_SORT_KEYS)
    except TypeError:  # what orjson refuses (an integer past 64 bits)
        fast = b""
    return zlib.crc32(fast if fast and fast.isascii() else _canonical(value))


def crc_ok(value: Any, expected: object) -> bool:
    return expected == crc(value) or expected == zlib.crc32(_canonical(value))


# ---- writing ------------------------------------------------------------------------
def entry_line(seq: int, changes: list[dict[str, Any]]) -> bytes:
    """One journal line (orjson: any JSON reads back; the checksum is what is exact)."""
    entry = {"seq": seq, "changes": changes, "crc": crc(changes)}
    try:
        return orjson.dumps(entry) + b"\n"
    except TypeError:
        return json.dumps(entry, separators=(",", ":")).encode() + b"\n"


def header_line(base: int) -> bytes:
    """The journal's first line: its lines continue from seq ``base`` (which a snapshot
    holds). A journal without it (emptied, or cut at the front) is told from one that
    never had a line."""
    head = {"journal": FORMAT, "base": base}
    return json.dumps({**head, "crc": crc(head)}, separators=(",", ":")).encode() + b"\n"


def snapshot_bytes(
    seq: int, intents: list[dict[str, Any]], quarantined: list[dict[str, Any]]
) -> bytes:
    body = {"seq": seq, "intents": intents, "quarantined": quarantined}
    return json.dumps({"format": FORMAT, "crc": crc(body), **body}).encode()


# ---- the snapshot -------------------------------------------------------------------
@dataclass
class Snapshot:
    seq: int
    format: int
    intents: list[Any]
    #: ``{"key", "intent", "reason", "seq"}``: intents kept aside (``agent/quarantine.py``)
    quarantined: list[dict[str, Any]] = field(default_factory=list)


EMPTY = Snapshot(0, FORMAT, [])


def parse_snapshot(data: bytes) -> Snapshot:
    """Raises ValueError saying what is wrong."""
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise ValueError(f"not a snapshot: {type(doc).__name__}")
    fmt = doc.get("format")
    if fmt not in (1, FORMAT):
        raise ValueError(f"unknown format {fmt!r} (this netagent reads 1 and {FORMAT})")
    seq, intents = doc.get("seq"), doc.get("intents")
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
        raise ValueError(f"seq {seq!r} is not a sequence number")
    if not isinstance(intents, list):
        raise ValueError("intents is not a list")
    quarantined = doc.get("quarantined", [])
    if fmt >= 2:
        if not isinstance(quarantined, list) or not all(
            isinstance(q, dict) and isinstance(q.get("key"), str) for q in quarantined
        ):
            raise ValueError("quarantined is not a list of entries with keys")
        if not crc_ok({"seq": seq, "intents": intents, "quarantined": quarantined}, doc.get("crc")):
            raise ValueError("checksum mismatch")
    return Snapshot(seq, fmt, intents, quarantined if fmt >= 2 else [])


# ---- the journal --------------------------------------------------------------------
@dataclass
class Entry:
    line: int
    seq: int
    changes: list[RawChange]


@dataclass
class Journal:
    #: the header's base seq; None for a journal without a header (format 1)
    base: int | None = None
    #: the lines that read, in file order, up to the first that does not
    entries: list[Entry] = field(default_factory=list)
    #: (line number, why) of the first line that does not read
    damage: tuple[int, str] | None = None
    #: bytes after the last newline: a write that never finished
    tail: bytes = b""
    #: the tail, when it is a whole entry with a valid checksum
    tail_entry: Entry | None = None

    @property
    def highest(self) -> int:
        seqs = [e.seq for e in self.entries]
        if self.tail_entry is not None:
            seqs.append(self.tail_entry.seq)
        return max([self.base or 0, *seqs])


def _entry(n: int, raw: bytes) -> Entry:
    """One journal line; raises ValueError / KeyError / TypeError."""
    entry = json.loads(raw)
    seq = entry["seq"]
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 1:
        raise ValueError(f"seq {seq!r} is not a sequence number")
    if not crc_ok(entry["changes"], entry["crc"]):
        raise ValueError("checksum mismatch")
    changes: list[RawChange] = []
    for c in entry["changes"]:
        key, d = c["key"], c["intent"]
        if not isinstance(key, str):
            raise TypeError("key is not a string")
        if d is not None and not isinstance(d, dict):
            raise TypeError("intent is not an object")
        changes.append((key, d))
    return Entry(n, seq, changes)


def _header(raw: bytes) -> int:
    head = json.loads(raw)
    version, base = head["journal"], head["base"]
    if version != FORMAT:
        raise ValueError(f"journal format {version!r} (this netagent reads 1 and {FORMAT})")
    if not isinstance(base, int) or isinstance(base, bool) or base < 0:
        raise ValueError(f"base {base!r} is not a sequence number")
    if not crc_ok({"journal": version, "base": base}, head["crc"]):
        raise ValueError("header checksum mismatch")
    return base


def parse_journal(data: bytes) -> Journal:
    lines = data.split(b"\n")
    journal = Journal(tail=lines.pop())
    for n, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            if n == 1 and raw.lstrip().startswith(b'{"journal"'):
                journal.base = _header(raw)
                continue
            journal.entries.append(_entry(n, raw))
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
            why = f"{type(exc).__name__} {exc}" if isinstance(exc, KeyError) else str(exc)
            journal.damage = (n, f"line {n}: {why}")
            return journal
    if journal.tail.strip():
        try:
            journal.tail_entry = _entry(len(lines) + 1, journal.tail)
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            journal.tail_entry = None
    return journal


# ---- what is missing ----------------------------------------------------------------
@dataclass
class Walk:
    """The journal lines to replay after a snapshot, and where the sequence breaks."""

    entries: list[Entry]
    #: every change up to this seq is in the snapshot or the entries
    last_good: int
    #: why the rest cannot be used (None: nothing is missing)
    damage: str | None = None


def _missing(first: int, last: int) -> str:
    return f"seq {first} is missing" if first == last else f"seqs {first}-{last} are missing"


def walk(snapshot_seq: int, journal: Journal) -> Walk:
    """Replay order, stopping at the first hole: a line out of order, a seq after the
    snapshot that no file holds, a journal that continues from a seq the snapshot does
    not reach. Seqs the snapshot holds may be absent from the journal (its lines up to
    a compaction are dropped); anything after it may not."""
    have = snapshot_seq
    out: list[Entry] = []
    prev = journal.base
    if prev is not None and prev > have:
        return Walk(
            out,
            have,
            f"its header says it continues from seq {prev}, but the snapshot holds only "
            f"up to seq {have}: {_missing(have + 1, prev)}",
        )
    for e in journal.entries:
        if prev is not None and e.seq <= prev:
            return Walk(out, have, f"line {e.line}: seq {e.seq} comes after seq {prev}")
        if prev is not None and e.seq > prev + 1 and e.seq - 1 > have:
            return Walk(
                out,
                have,
                f"line {e.line}: seq {e.seq} follows seq {prev}: "
                f"{_missing(max(prev, have) + 1, e.seq - 1)}",
            )
        prev = e.seq
        if e.seq <= have:
            continue  # the snapshot holds it (a compaction cut short)
        if e.seq > have + 1:
            return Walk(
                out,
                have,
                f"line {e.line}: the journal begins at seq {e.seq} and the snapshot holds "
                f"up to seq {have}: {_missing(have + 1, e.seq - 1)}",
            )
        out.append(e)
        have = e.seq
    if journal.damage is not None:
        return Walk(out, have, journal.damage[1])
    return Walk(out, have)
