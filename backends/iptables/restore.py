"""Writing ``iptables-restore`` input: quoting, rule lines, files, and the payload a
batch carries to ``apply``.

Every change is one ``iptables-restore --noflush`` file per family: one transaction,
all of it or nothing (both flavours accept the ``-C``/``-D``/``-X`` lines used here).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from netagent.agent import intents as I

from ..firewall import FirewallSpec
from .effects import Effect
from .rules import Rule, Wanted
from .save import FamilyObserved, Observed

_BARE = re.compile(r"[A-Za-z0-9_.:/\[\]!,+=@%-]+")
#: a whole line of bare tokens and single spaces (the common case, checked at once)
_BARE_LINE = re.compile(r"[A-Za-z0-9_.:/\[\]!,+=@%-]+(?: [A-Za-z0-9_.:/\[\]!,+=@%-]+)*")


def quote(token: str) -> str:
    """A token for an iptables-restore line. Everything that reaches here comes from
    validated intents, but a quote, backslash or line break would let a value end the
    token or the line (and start a rule of its own), so those are refused outright."""
    if _BARE.fullmatch(token):
        return token
    if not token or any(c in token for c in '"\\\n\r\0'):
        raise ValueError(f"refusing to write {token!r} into an iptables-restore file")
    return f'"{token}"'


def render(rule: Rule) -> str:
    text = " ".join(rule)
    # no token holds a space and none is empty when there are exactly len-1 spaces
    if text.count(" ") == len(rule) - 1 and _BARE_LINE.fullmatch(text):
        return text
    return " ".join([quote(t) for t in rule])


def rule_line(op: str, chain: str, rule: Rule, position: int | None = None) -> str:
    """``-A CHAIN tokens...`` (or ``-I CHAIN 1 ...`` with a position)."""
    where = chain if position is None else f"{chain} {position}"
    return f"{op} {where} {render(rule)}"


def chain_lines(chain: str, rules: list[Rule]) -> list[str]:
    """``-A`` lines for a chain."""
    head = f"-A {chain} "
    return [head + render(rule) for rule in rules]


def restore_text(lines: Iterable[str], table: str = "nat") -> str:
    return "\n".join([f"*{table}", *lines, "COMMIT", ""])


class RestorePayload(dict[str, str]):
    """A batch's payload: family ("4", "6") -> restore file; no file when the plan found
    nothing to write. Besides the files, what they were planned from, which is what
    lets ``apply`` advance the observation cache without reading the table:

    ``effects``: what each file does (:class:`~.effects.Effect`).
    ``spec``: the desired state planned.
    ``basis``: a full plan: the observation it was planned against.
    ``wanted``: a full plan: the chains ``spec`` wants (built or taken from a hint).
    ``changes``: an update: the forwards (added, removed).
    """

    def __init__(
        self,
        spec: FirewallSpec,
        *,
        basis: Observed | None = None,
        wanted: Wanted | None = None,
        changes: tuple[list[I.Forward], list[I.Forward]] | None = None,
    ) -> None:
        super().__init__()
        self.effects: dict[int, Effect] = {}
        self.spec = spec
        self.basis = basis
        self.wanted = wanted
        self.changes = changes
        #: the IPv4 filter table's restore file (the VXLAN guard), and what that table
        #: holds of ours once it ran
        self.filter_text: str | None = None
        self.filter_after: FamilyObserved | None = None

    def files(self) -> list[tuple[int, str]]:
        """(family, restore file), IPv4 first."""
        return sorted((int(version), text) for version, text in self.items())
