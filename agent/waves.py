"""Ensures at once: a *wave* of one kind's keys whose kernel work cannot meet.

A recreated bridge brings its ports back in one pass. Each port's ensure is a handful of
netlink round trips of ~1 ms, of which the loop's own work is a fifth: the rest is
waiting (the request goes to the sender thread, the kernel answers, the loop wakes).
Ten ports one after the other wait ten times; at once, their waits overlap (the repair
of a bridge with 10 ports, ``make bench repair``'s median: 103-108 ms before, 62-81
after; 56-59 with the host's links looked up on the raw socket too).

Only kinds that say so (``Kind.at_once``) go in waves, and only intents that share no
namespace and no interface name: two plugs of one namespace both look for its default
route and would both add it. The outcomes are recorded in the wave's order, so a pass
reads as it would one key after the other.
"""

from __future__ import annotations

import collections
from collections.abc import Hashable
from collections.abc import Set as AbstractSet
from typing import Any

import anyio

from .keystatus import attempt
from .kinds.base import Context, Intent, Kind
from .state import DesiredState

#: keys of one wave at most (each holds a socket request or two in flight)
WAVE = 16

#: (its actions, why it failed, whether it ran out of time), as ``attempt`` returns
Outcome = tuple[list[str] | None, str | None, bool]


def _claims(kind: Kind[Any], intent: Intent) -> set[Hashable]:
    return {("ns", ns) for ns in kind.namespaces(intent)} | set(kind.names(intent))


def take_wave(
    state: DesiredState,
    kind: Kind[Any],
    first: Intent,
    queue: collections.deque[str],
    done: set[str],
    skip: AbstractSet[str],
) -> list[tuple[str, Intent]]:
    """The keys at ``queue``'s front that may be ensured at once with ``first``, popped
    and added to ``done``: of its kind, not in ``skip``, and claiming no namespace or
    name another of the wave claims. It stops at the first key that may not, so the
    pass's order holds."""
    taken: list[tuple[str, Intent]] = []
    claimed = _claims(kind, first)
    while queue and len(taken) < WAVE - 1:
        key = queue[0]
        intent = state.get(key)
        if intent is None or key in done or key in skip or state.kinds.of(intent) is not kind:
            break
        claims = _claims(kind, intent)
        if claims & claimed:
            break
        claimed |= claims
        queue.popleft()
        done.add(key)
        taken.append((key, intent))
    return taken


async def ensure_wave(
    ctx: Context, kind: Kind[Any], wave: list[tuple[str, Intent, Intent | None]]
) -> list[Outcome]:
    """Each ``(key, intent, old)`` of ``wave`` ensured at once, each within its own time
    limit; the outcomes in the wave's order."""
    outcomes: dict[str, Outcome] = {}

    async def one(key: str, intent: Intent, old: Intent | None) -> None:
        outcomes[key] = await attempt(kind.ensure(ctx, intent, old), key)

    if len(wave) == 1:
        await one(*wave[0])
    else:
        async with anyio.create_task_group() as tg:
            for key, intent, old in wave:
                tg.start_soon(one, key, intent, old)
    return [outcomes[key] for key, _intent, _old in wave]
