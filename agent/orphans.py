"""Orphans: what carries netagent's mark in the kernel but no desired intent holds.

A crash between recording a removal and carrying it out (``kill -9`` in the middle of
``apply --prune`` or ``purge``) leaves objects marked as netagent's that the desired
state no longer knows: a bridge, veths, namespaces. They are netagent's (the mark says
so) and nothing else's, so they are reported by ``show`` and removed by ``purge``
(``purge --orphans`` removes only them); nothing without the mark is ever touched.

Marks: a link's alias ``netagent:<key>`` or its creation-time group (``NETAGENT_GROUP``,
set before the alias can be); a namespace's loopback alias ``netagent:ns/<name>`` or its
claim file (written before the namespace is created).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import anyio

from netagent.backends.netlink import NETAGENT_GROUP, Link, NsRef

if TYPE_CHECKING:
    from .kinds.base import Context


@dataclass(frozen=True)
class Orphan:
    what: str  # "namespace" | "link"
    ns: NsRef  # where it is (None: the host); for a namespace, None
    name: str
    key: str | None  # the intent its mark names, if any
    index: int = 0

    def describe(self) -> str:
        where = f"{self.ns}:" if self.ns else ""
        mark = f" (marked {self.key})" if self.key else " (netagent's creation mark)"
        return f"{self.what} {where}{self.name}{mark}"

    def to_wire(self) -> dict[str, object]:
        return {
            "what": self.what,
            "ns": self.ns,
            "name": self.name,
            "key": self.key,
            "describe": self.describe(),
        }


def _link_orphan(ctx: Context, ns: NsRef, link: Link, pending: set[str]) -> Orphan | None:
    if link.name == "lo":
        return None
    key = link.owner_key
    if key is not None:
        if key in ctx.state or key in pending:
            return None
        return Orphan("link", ns, link.name, key, link.index)
    # marked at creation, never named (a crash before the alias was set): an orphan
    # unless an intent wants this very name (its ensure adopts it)
    if link.group == NETAGENT_GROUP and ctx.state.name_owner(ns, link.name) is None:
        return Orphan("link", ns, link.name, None, link.index)
    return None


async def find(ctx: Context, pending: set[str], inside: bool = True) -> list[Orphan]:
    """Every orphan the host, the named namespaces and (``inside``) the links inside
    netagent's namespaces hold. ``pending``: keys whose removal is still to be carried
    out (not orphans: the reconciler is on them)."""
    found: list[Orphan] = []
    for link in await ctx.net.links(None):
        orphan = _link_orphan(ctx, None, link, pending)
        if orphan is not None:
            found.append(orphan)
    ours: list[str] = []
    for name in ctx.net.ns_names():
        key = f"ns/{name}"
        desired = key in ctx.state or key in pending
        # a runtime's namespace an attachment uses by its path is looked inside, not at
        by_path = ctx.state.has_indexed("ns", str(ctx.net.netns_dir / name))
        if desired or ctx.state.lookup("ns", name) or by_path:
            ours.append(name)
            continue
        lo = await ctx.net.link(name, "lo")
        if (lo is not None and lo.owner_key == key) or ctx.claims.claimed(name):
            found.append(Orphan("namespace", None, name, key))
            ours.append(name)
        else:
            await ctx.net.forget(name)  # a look keeps nothing open
    if inside:
        for name in ours:
            await anyio.sleep(0)  # many namespaces: let the loop turn between them
            try:
                links = await ctx.net.links(name)
            except (OSError, FileNotFoundError):
                continue
            for link in links:
                orphan = _link_orphan(ctx, name, link, pending)
                if orphan is not None:
                    found.append(orphan)
    return found


async def remove(ctx: Context, orphans: list[Orphan]) -> list[str]:
    """Remove orphans (links first, then namespaces). Each is looked at once more right
    before: what lost its mark or is wanted again meanwhile is left alone."""
    done = []
    for o in sorted(orphans, key=lambda o: o.what != "link"):
        if o.what == "link":
            if o.ns is not None and not ctx.net.ns_exists(o.ns):
                continue
            now = await ctx.net.link(o.ns, o.name)
            if now is None or now.index != o.index:
                continue
            if _link_orphan(ctx, o.ns, now, set()) is None:
                continue
            await ctx.net.del_link(o.ns, now.index)
            done.append(f"deleted orphan {o.describe()}")
        else:
            if o.key in ctx.state or not ctx.net.ns_exists(o.name):
                continue
            lo = await ctx.net.link(o.name, "lo")
            if not ((lo is not None and lo.owner_key == o.key) or ctx.claims.claimed(o.name)):
                continue
            await ctx.net.forget(o.name)
            await ctx.net.ns_del(o.name)
            ctx.claims.release(o.name)
            done.append(f"deleted orphan {o.describe()}")
    return done
