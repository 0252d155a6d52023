"""Intents kept aside on load: recorded by an older netagent, refused by today's checks.

Values were made stricter over time (a forward to ``[fe80::1%eth0]:80`` or to
255.255.255.255 was once accepted). Such an intent, in a journal line whose checksum is
valid or in a snapshot, is not damage: it was acknowledged. It must neither stop the
start nor be lost, so it is *quarantined*: the rest loads and is installed, and it is
kept aside with the reason, holding nothing (no name, port or address is reserved for
it, nothing is installed for it, and its kernel objects, if any, are not removed as
orphans), reported by ``show`` and ``status``, written into every snapshot, and retried
at each start (a later version may accept it again). ``netagent ctl forget KEY`` drops
it for good, journaled like any change; a new intent with the same key replaces it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog

from . import ops
from .errors import NotFound
from .replay import crc

if TYPE_CHECKING:
    from .api import Service
    from .kinds import Registry
    from .kinds.base import Intent
    from .schema import Request

log = structlog.get_logger("netagent.quarantine")


@dataclass(frozen=True)
class Quarantined:
    key: str
    #: the persisted form, exactly as it was recorded
    intent: Mapping[str, Any]
    reason: str
    #: the journal seq that recorded it (0: it came from a snapshot without one)
    seq: int

    @property
    def kind(self) -> str:
        kind = self.intent.get("kind")
        return kind if isinstance(kind, str) else "?"

    def to_dict(self) -> dict[str, Any]:
        """As the snapshot keeps it."""
        return {
            "key": self.key,
            "intent": dict(self.intent),
            "reason": self.reason,
            "seq": self.seq,
        }

    def to_wire(self) -> dict[str, Any]:
        return {**self.to_dict(), "kind": self.kind}


class Quarantine:
    """The quarantined intents by key. Replaced, never changed in place, so the event
    loop (``show``, the orphan search) can read it while the store's worker thread
    updates it."""

    def __init__(self) -> None:
        self._by_key: dict[str, Quarantined] = {}

    def __contains__(self, key: object) -> bool:
        return key in self._by_key

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._by_key))

    def __len__(self) -> int:
        return len(self._by_key)

    def get(self, key: str) -> Quarantined | None:
        return self._by_key.get(key)

    def entries(self) -> list[Quarantined]:
        return sorted(self._by_key.values(), key=lambda q: q.key)

    def replace(self, entries: Mapping[str, Quarantined]) -> None:
        self._by_key = dict(entries)

    def settle(self, keys: set[str]) -> list[Quarantined]:
        """A recorded change of these keys (a removal, ``forget``, or a new intent)
        supersedes what was quarantined under them; returns what it dropped."""
        dropped = [q for k in keys if (q := self._by_key.get(k)) is not None]
        if dropped:
            self._by_key = {k: q for k, q in self._by_key.items() if k not in keys}
        return dropped


def admit(
    kinds: Registry, d: Any, key: str | None, seq: int
) -> tuple[Intent | None, Quarantined | None]:
    """An intent from its persisted form, or why today's checks refuse it. ``key``: the
    key it was recorded under (a journal line names it); None when unknown (a format-1
    snapshot): then its kind works it out, or a stable stand-in is made. Anything the
    intent's parser raises quarantines it: the record itself read fine (checksum)."""
    try:
        intent = kinds.from_dict(d)
    except Exception as exc:  # any refusal of a recorded value: quarantine, never a crash
        reason = getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}"
        return None, Quarantined(key or stand_in_key(kinds, d), _as_mapping(d), reason, seq)
    if key is not None and intent.key != key:
        raise ValueError(f"key {key!r} does not match its intent ({intent.key})")
    return intent, None


def _as_mapping(d: Any) -> Mapping[str, Any]:
    return d if isinstance(d, Mapping) else {"value": d}


def stand_in_key(kinds: Registry, d: Any) -> str:
    """The key of a refused intent that was stored without one."""
    if isinstance(d, Mapping):
        name = d.get("kind")
        kind = kinds.get(name) if isinstance(name, str) else None
        if kind is not None:
            try:
                key = kind.key_of(d)
            except Exception:  # best effort on a value its kind refuses
                key = None
            if key:
                return key
            return f"{kind.key_prefix}/quarantined-{crc(d):08x}"
    return f"unknown/quarantined-{crc(d):08x}"


# ---- the requests ---------------------------------------------------------------------
async def forget(service: Service, req: Request) -> dict[str, Any]:
    """``forget KEY``: drop a quarantined intent for good (journaled as its removal)."""
    from .state import Change

    assert isinstance(req, ops.Forget)
    store = service.store
    async with service._commit:
        held = store.quarantine.get(req.key)
        if held is None:
            if req.key in service.state:
                raise NotFound(
                    f"{req.key} is not quarantined: it is desired and valid; remove it "
                    "with its kind's del command"
                )
            listed = ", ".join(q.key for q in store.quarantine.entries()[:5]) or "none"
            raise NotFound(f"{req.key} is not quarantined (quarantined: {listed})")
        await service._persist([Change(req.key, None, None)])
    log.info("quarantined intent forgotten", key=req.key, reason=held.reason)
    return {
        "changed": True,
        "changes": [
            {"key": held.key, "action": "forgotten", "what": f"quarantined {held.kind} {held.key}"}
        ],
        "changes_total": 1,
    }


def report(service: Service) -> list[dict[str, Any]]:
    return [q.to_wire() for q in service.store.quarantine.entries()]
