"""What the doctor's checks read and give (``agent/doctor.py`` holds the checks): a
finding, the desired state flattened for them, and :class:`ForwardMemo`, the cache of
each forward's checks that ``agent/hostcheck.py`` keeps beside them (the checks stay pure;
the cache is tested on its own)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .hostview import HostView

PROBLEM, NOTE = "problem", "note"


@dataclass(frozen=True)
class Finding:
    code: str
    severity: str
    what: str
    who: str | None = None
    fix: str | None = None
    #: the intents it concerns
    keys: tuple[str, ...] = ()
    #: those intents are not in place because of it
    blocks: bool = False

    def line(self) -> str:
        text = f"{self.severity}: {self.what}"
        if self.who:
            text += f" (by {self.who})"
        if self.fix:
            text += f"; fix: {self.fix}"
        return text

    def to_wire(self) -> dict[str, Any]:
        return {
            "code": self.code,
            "severity": self.severity,
            "what": self.what,
            "who": self.who,
            "fix": self.fix,
            "keys": list(self.keys),
            "blocks": self.blocks,
            "line": self.line(),
        }


@dataclass
class Desired:
    """What the checks need of the desired state, flattened."""

    #: bridge name -> (key, IPv4 networks, IPv6 networks, keys of its plugs)
    bridges: dict[str, tuple[str, list[Any], list[Any], list[str]]] = field(default_factory=dict)
    #: (key, proto, family, host ports, destination address, destination port)
    forwards: list[tuple[str, str, int, range, Any, int]] = field(default_factory=list)
    #: bridge name -> how many ports it has now
    ports: dict[str, int] = field(default_factory=dict)


Fwd = tuple[str, str, int, range, Any, int]
#: what one forward's checks found: findings, and the DROP policies its accepts pass
PerForward = tuple[list[Finding], set[str]]


class ForwardMemo:
    """The per-forward checks' results, kept while the snapshot and the bridges' networks
    they were computed against stay the same: with 10,000 forwards, checking them all
    again after each request would cost ~100 ms; a new forward costs its own checks.
    Kept by forward key and check, with the forward's fields to see that it is the same
    (the intent's own objects: compared by identity first, never hashed)."""

    def __init__(self) -> None:
        self._against: tuple[int, tuple[Any, ...]] | None = None
        self._results: dict[tuple[str, str], tuple[Fwd, PerForward]] = {}
        self._desired: Desired | None = None

    def begin(self, view: HostView, desired: Desired) -> None:
        nets = tuple((n, tuple(b[1]), tuple(b[2])) for n, b in sorted(desired.bridges.items()))
        against = (id(view), nets)
        if against != self._against:
            self._against, self._results = against, {}
        self._desired = desired

    def get(self, check: str, fwd: Fwd, compute: Any) -> PerForward:
        key = (check, fwd[0])
        got = self._results.get(key)
        if got is not None and got[0] == fwd:
            return got[1]
        result: PerForward = compute()
        self._results[key] = (fwd, result)
        return result

    def end(self) -> None:
        """Forget the results of forwards no longer desired."""
        d = self._desired
        if d is not None and len(self._results) > 3 * len(d.forwards):
            keys = {f[0] for f in d.forwards}
            self._results = {k: v for k, v in self._results.items() if k[1] in keys}
        self._desired = None


def desired_of(state: Any, ports: dict[str, int]) -> Desired:
    """The checks' view of the desired state (bridges, their plugs, forwards)."""
    d = Desired(ports=ports)
    for br in state.of_kind("bridge"):
        v4 = [a.network for a in br.addresses if a.version == 4]
        v6 = [a.network for a in br.addresses if a.version == 6]
        # the keys alone, unsorted by realize order (a bridge with 1,000 attachments)
        plugs = sorted(
            k
            for k in state.lookup("needs", br.key)
            if (u := state.intents.get(k)) is not None and u.kind == "plug"
        )
        d.bridges[br.name] = (br.key, v4, v6, plugs)
    for f in state.of_kind("forward"):
        d.forwards.append((f.key, f.proto, f.family, f.host_ports, f.dest_ip, f.dest_port))
    return d
