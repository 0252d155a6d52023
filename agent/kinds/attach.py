"""Kind ``attach``: interfaces whose name matches a shell-style pattern go to a bridge.

One decision (:func:`decide`) says, for one interface, whether a rule takes it, and if
not, why: it is used both when a rule is ensured (every interface the link cache holds)
and for each interface the kernel announces (the reconciler's link hints), so the two
can never disagree. What is never taken: ``lo``, bridges, what netagent made itself, an
interface enslaved to another master, and the second end of a veth pair whose first end
is on the bridge already (both ends on one bridge make a loop: a broadcast storm).
"""

from __future__ import annotations

import errno
from collections.abc import Iterable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import anyio
import structlog

from netagent.backends.netlink import Link

from ..errors import Conflict, NotFound
from ..glob import check_pattern, glob_match, is_exact, patterns_overlap
from ..ops import AttachAdd, AttachDel
from ..schema import Request
from ..turns import Turns
from ..values import check_name
from .base import Context, Kind, want
from .bridge import bridge_key
from .plug import require_bridge

log = structlog.get_logger(__name__)

if TYPE_CHECKING:
    from ..linkcache import LinkCache
    from ..state import DesiredState


@dataclass(frozen=True)
class AttachRule:
    kind: ClassVar[str] = "attach"
    pattern: str
    bridge: str

    def __post_init__(self) -> None:
        check_pattern(self.pattern)
        check_name(self.bridge, "bridge name")

    @property
    def key(self) -> str:
        return attach_key(self.bridge, self.pattern)

    def matches(self, ifname: str) -> bool:
        return glob_match(self.pattern, ifname)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "pattern": self.pattern, "bridge": self.bridge}

    def describe(self) -> str:
        return f"interfaces matching {self.pattern!r} attach to {self.bridge}"


def attach_key(bridge: str, pattern: str) -> str:
    return f"rule/{bridge}/{pattern}"


@dataclass(frozen=True)
class Verdict:
    """What a rule does with one interface: attach it (``attach``), or leave it alone
    because of ``why`` (reported), or nothing at all (neither: not a candidate, or in
    place already)."""

    rule: AttachRule | None = None
    attach: bool = False
    why: str | None = None
    bridge_index: int | None = None
    #: the other master that holds the interface, when that is why
    master: str | None = None


NOTHING = Verdict()


def rule_for(rules: Iterable[AttachRule], ifname: str) -> AttachRule | None:
    for rule in rules:
        if rule.matches(ifname):
            return rule
    return None


def decide(
    rules: Iterable[AttachRule],
    link: Link,
    cache: LinkCache,
    joining: AbstractSet[int] = frozenset(),
) -> Verdict:
    """The one attach decision. ``joining``: interfaces being attached right now (the
    loop check must see them as on the bridge already)."""
    if link.name == "lo" or link.kind == "bridge" or link.netagents:
        return NOTHING  # a rule like '*' never takes lo, a bridge, or netagent's own
    rule = rule_for(rules, link.name)
    if rule is None:
        return NOTHING
    bridge = cache.named(rule.bridge)
    if bridge is None or bridge.index == link.index:
        return NOTHING  # the bridge is not there (yet): its repair attaches
    if link.master == bridge.index and link.up:
        return NOTHING
    if link.master not in (None, 0, bridge.index):
        other = cache.get(link.master)
        name = other.name if other else f"interface #{link.master}"
        return Verdict(
            rule,
            why=f"{link.name} matches {rule.pattern!r} but is already enslaved to "
            f"{name}; netagent does not take it",
            master=name,
        )
    if link.master == bridge.index:
        return Verdict(rule, attach=True, bridge_index=bridge.index)  # on it, but down
    if link.index in cache.addressed:
        # the host's uplink, a service address: taking it would cut the host off
        return Verdict(
            rule,
            why=f"{link.name} matches {rule.pattern!r} but carries addresses of the host; "
            "netagent does not take it",
        )
    if link.kind is None and not is_exact(rule.pattern):
        # no link kind: a physical NIC (or the like), taken only when named exactly
        return Verdict(
            rule,
            why=f"{link.name} matches {rule.pattern!r} but looks like a physical interface; "
            f"a rule that names it exactly (attach add {link.name} {rule.bridge}) takes it",
        )
    if link.peer is not None and link.peer != link.index:
        peer = cache.get(link.peer)
        if link.peer in joining or (peer is not None and peer.master == bridge.index):
            pname = peer.name if peer else f"#{link.peer}"
            return Verdict(
                rule,
                why=f"{link.name} matches {rule.pattern!r}, but its veth peer {pname} is on "
                f"{rule.bridge} already: both ends on one bridge would make a loop",
            )
        if peer is not None and peer.master not in (None, 0):
            other = cache.get(peer.master)
            if other is not None and other.kind == "bridge":
                return Verdict(
                    rule,
                    why=f"{link.name} matches {rule.pattern!r}, but its veth peer {peer.name} "
                    f"is on the bridge {other.name}: it would join {other.name} to "
                    f"{rule.bridge}",
                )
    return Verdict(rule, attach=True, bridge_index=bridge.index)


def _left_alone(ctx: Context, link: Link, verdict: Verdict) -> None:
    """Reported, not an action: nothing changed (an event only when the verdict is new:
    a periodic pass over the same interfaces is no news)."""
    assert verdict.rule is not None and verdict.why is not None
    seen = (verdict.rule.key, False, verdict.why)
    if ctx.links.verdicts.get(link.index) == seen:
        return
    ctx.links.verdicts[link.index] = seen
    extra = {"master": verdict.master} if verdict.master else {}
    ctx.bus.publish(
        "left-alone", verdict.why, ifname=link.name, bridge=verdict.rule.bridge, **extra
    )


async def attach_links(
    ctx: Context, links: Iterable[Link], rules: list[AttachRule] | None = None
) -> list[str]:
    """Decide for each link and attach those a rule takes, pipelined: the requests go out
    together and are awaited together (a burst of 1,000 interfaces must not wait for
    one ACK before sending the next). Returns what was done."""
    if rules is None:
        rules = [r for r in ctx.state.of_kind("attach") if isinstance(r, AttachRule)]
    if not rules:
        return []
    turns = Turns()
    done: list[str] = []
    candidates = []
    for link in links:
        if turns.due():
            await anyio.sleep(0)  # a rule ensured over thousands of links: let others run
        verdict = decide(rules, link, ctx.links)
        if verdict.attach:
            candidates.append(link)
        elif verdict.why is not None:
            _left_alone(ctx, link, verdict)
    if not candidates:
        return done
    # the cache may be older than the kernel (an event queued before someone gave the
    # interface to another bridge, or before our own attach): decide on what the kernel
    # says right now, so netagent never takes what was taken meanwhile. Handling the
    # events queued so far tells it; asking for each link is the fallback (those
    # lookups wait for the kernel's lock behind every `ip` of a burst: netagent then
    # attached 1,000 veths at ~40% of the pace they appeared)
    fresh: list[Link | None]
    if await ctx.links.catch_up():
        fresh = [ctx.links.get(lk.index) for lk in candidates]
    else:
        fresh = await ctx.net.host_links([lk.index for lk in candidates])
        for now in fresh:
            if now is not None:
                ctx.links.update(now)
    joining: set[int] = set()
    todo: list[tuple[Link, Verdict]] = []
    for now in fresh:
        if turns.due():
            await anyio.sleep(0)
        if now is None:
            continue  # gone meanwhile
        verdict = decide(rules, now, ctx.links, joining)
        if verdict.why is not None:
            _left_alone(ctx, now, verdict)
        elif verdict.attach:
            joining.add(now.index)
            todo.append((now, verdict))
    if not todo:
        return done
    pairs = [(lk.index, v.bridge_index or 0) for lk, v in todo]
    try:
        results = await ctx.net.enslave(pairs)
    except OSError as lost:  # the whole batch went unanswered (a time limit)
        results = [lost] * len(pairs)
    for (link, verdict), exc in zip(todo, results, strict=True):
        if turns.due():
            await anyio.sleep(0)
        assert verdict.rule is not None
        if exc is not None and exc.errno == errno.ENODEV:
            # gone between the kernel's answer and the attach (a tap that lived for
            # milliseconds): nothing failed, there is nothing left to attach
            ctx.links.remove(link.index)
            log.debug("gone before it could be attached", ifname=link.name)
            continue
        if exc is not None:  # the bridge refused it (full at 1,023 ports, a loop, ...)
            ctx.bus.publish(
                "attach-failed",
                f"{link.name} could not be attached to {verdict.rule.bridge}: "
                f"{exc.strerror or exc}",
                ifname=link.name,
                bridge=verdict.rule.bridge,
            )
            done.append(f"could not attach {link.name}: {exc.strerror or exc}")
            continue
        ctx.links.verdicts[link.index] = (verdict.rule.key, True, None)
        ctx.bus.publish(
            "attached",
            f"{link.name} attached to {verdict.rule.bridge} (rule {verdict.rule.pattern!r})",
            ifname=link.name,
            bridge=verdict.rule.bridge,
            rule=verdict.rule.key,
        )
        done.append(f"attached {link.name} to {verdict.rule.bridge}")
    return done


class AttachKind(Kind[AttachRule]):
    name = "attach"
    aliases = ("rule",)
    key_prefix = "rule"
    order = 2
    plural = "attach rules"

    def from_dict(self, d: Mapping[str, Any]) -> AttachRule:
        return AttachRule(pattern=want(d, "pattern"), bridge=want(d, "bridge"))

    def key_of(self, d: Mapping[str, Any]) -> str | None:
        return attach_key(str(d["bridge"]), str(d["pattern"]))

    def needs(self, intent: AttachRule) -> tuple[str, ...]:
        return (bridge_key(intent.bridge),)

    def unmet(self, state: DesiredState, intent: AttachRule) -> list[str]:
        return [] if bridge_key(intent.bridge) in state else [f"bridge {intent.bridge}"]

    def add(self, state: DesiredState, req: Request) -> AttachRule:
        assert isinstance(req, AttachAdd)
        rule = AttachRule(req.pattern, req.bridge)
        require_bridge(state, req.bridge)
        for other in state.of_kind(self.name):
            assert isinstance(other, AttachRule)
            if other.bridge != rule.bridge and patterns_overlap(rule.pattern, other.pattern):
                raise Conflict(
                    f"pattern {rule.pattern!r} can match the same interfaces as "
                    f"{other.pattern!r}, which attaches to {other.bridge}; make the patterns "
                    "disjoint",
                    conflicts_with=other.key,
                )
        return rule

    def delete(self, state: DesiredState, req: Request) -> list[str]:
        assert isinstance(req, AttachDel)
        key = attach_key(req.bridge, req.pattern)
        if key not in state:
            raise NotFound(
                f"there is no rule {req.pattern!r} for {req.bridge}; `attach list` shows them"
            )
        return [key]

    def details(self, ctx: Context, intent: AttachRule) -> dict[str, Any]:
        """What the rule attached, and what it left alone and why (``show``)."""
        attached, left = [], []
        for index, (key, took, why) in sorted(ctx.links.verdicts.items()):
            link = ctx.links.get(index)
            if key != intent.key or link is None:
                continue
            if took and link.master is not None:
                attached.append(link.name)
            elif not took:
                left.append({"ifname": link.name, "why": why})
        return {"attached": attached, "left_alone": left}

    async def ensure(self, ctx: Context, intent: AttachRule, old: AttachRule | None) -> list[str]:
        """Attach what exists already and matches (a new rule, a start, a repair)."""
        return await attach_links(ctx, ctx.links, [intent])
