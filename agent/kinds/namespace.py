"""Kind ``ns``: a named network namespace netagent makes (``ip netns add red``).

It is marked as netagent's by the alias of its loopback (``netagent:ns/red``). Because the
mark can only be set once the namespace exists, a claim file is written (and fsynced)
before it is created and removed once it is marked: a crash in between leaves the
namespace known as netagent's, never taken for someone else's. A namespace that exists
and carries neither is someone else's, and is never taken over.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import anyio

from ..errors import NameTaken, NotFound
from ..ops import NsAdd, NsDel
from ..schema import Request
from ..values import check_name
from .base import Actions, Context, Kind, want

if TYPE_CHECKING:
    from ..state import DesiredState


@dataclass(frozen=True)
class Namespace:
    kind: ClassVar[str] = "ns"
    name: str

    def __post_init__(self) -> None:
        check_name(self.name, "namespace name")

    @property
    def key(self) -> str:
        return ns_key(self.name)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": self.name}

    def describe(self) -> str:
        return f"namespace {self.name}"


def ns_key(name: str) -> str:
    return f"ns/{name}"


class Claims:
    """A file per namespace being created, written before ``ip netns add``."""

    def __init__(self, directory: Path | None) -> None:
        self.dir = directory

    def _path(self, name: str) -> Path | None:
        return None if self.dir is None else self.dir / f"ns-{name}"

    def claim(self, name: str) -> None:
        path = self._path(name)
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def claimed(self, name: str) -> bool:
        """A claim is a regular file: a link planted there claims nothing (``exists()``
        would follow it and call someone else's namespace netagent's)."""
        path = self._path(name)
        if path is None:
            return False
        try:
            return stat.S_ISREG(path.lstat().st_mode)
        except FileNotFoundError:
            return False

    def release(self, name: str) -> None:
        path = self._path(name)
        if path is not None:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


def foreign(name: str) -> NameTaken:
    return NameTaken(
        f"namespace {name} exists and was not made by netagent; netagent will not take it "
        "over: plug it as it is (no `ns add` needed), or pick another name"
    )


class NamespaceKind(Kind[Namespace]):
    name = "ns"
    key_prefix = "ns"
    order = 0
    plural = "namespaces"
    at_once = True

    def from_dict(self, d: Mapping[str, Any]) -> Namespace:
        return Namespace(want(d, "name"))

    def key_of(self, d: Mapping[str, Any]) -> str | None:
        return ns_key(str(d["name"]))

    def namespaces(self, intent: Namespace) -> tuple[str, ...]:
        return (intent.name,)

    # ---- requests -------------------------------------------------------------------
    def add(self, state: DesiredState, req: Request) -> Namespace:
        assert isinstance(req, NsAdd)
        return Namespace(req.name)

    def delete(self, state: DesiredState, req: Request) -> list[str]:
        assert isinstance(req, NsDel)
        key = ns_key(req.name)
        if key not in state:
            raise NotFound(
                f"namespace {req.name} is not managed by netagent; `ns list` shows those that are"
            )
        return [key]

    def rows(self, ctx: Context) -> list[dict[str, Any]]:
        managed = {n.name for n in ctx.state.of_kind(self.name) if isinstance(n, Namespace)}
        present = set(ctx.net.ns_names())
        return [
            {"name": n, "managed": n in managed, "present": n in present}
            for n in sorted(managed | present)
        ]

    # ---- the kernel -----------------------------------------------------------------
    def must_look(self, ctx: Context, intent: Namespace) -> bool:
        return ctx.net.ns_exists(intent.name)

    async def check_free(self, ctx: Context, intent: Namespace) -> None:
        if ctx.net.ns_exists(intent.name) and not await self.owned(ctx, intent.name):
            raise foreign(intent.name)

    async def owned(self, ctx: Context, name: str) -> bool:
        """Does the namespace of this name exist and is it netagent's?"""
        if not ctx.net.ns_exists(name):
            return False
        if ctx.claims.claimed(name):
            return True
        lo = await ctx.net.link(name, "lo")
        return lo is not None and lo.owner_key == ns_key(name)

    async def _ensure(self, ctx: Context, ns: Namespace, acts: Actions) -> list[str]:
        net = ctx.net
        created = False
        if not net.ns_exists(ns.name):
            if not acts.add(f"create namespace {ns.name}"):
                acts.add(f"set lo up in {ns.name}")
                return acts.done
            await net.forget(ns.name)
            # the claim is on disk before the namespace exists (two fsyncs: not on the loop)
            await anyio.to_thread.run_sync(ctx.claims.claim, ns.name)
            try:
                await net.ns_add(ns.name)
            except FileExistsError:
                # someone made one of this name between our look and our create: it is
                # theirs, and the claim must not make it ours
                ctx.claims.release(ns.name)
                raise foreign(ns.name) from None
            except BaseException:
                ctx.claims.release(ns.name)
                raise
            created = True
        lo = await net.link(ns.name, "lo")
        if lo is None:
            return acts.done
        mark = lo.owner_key != ns.key
        if mark and not created and not ctx.claims.claimed(ns.name):
            raise foreign(ns.name)
        marked = mark and acts.add(f"mark {ns.name} as netagent's")
        up = not lo.up and acts.add(f"set lo up in {ns.name}")
        if marked or up:  # one request for both (a new namespace needs both)
            alias = f"netagent:{ns.key}" if marked else None
            await net.set_link(ns.name, lo.index, alias=alias, up=True if up else None)
            if marked:
                ctx.claims.release(ns.name)
        return acts.done

    async def ensure(self, ctx: Context, intent: Namespace, old: Namespace | None) -> list[str]:
        return await self._ensure(ctx, intent, Actions())

    async def inspect(self, ctx: Context, intent: Namespace) -> list[str]:
        return await self._ensure(ctx, intent, Actions(dry_run=True))

    async def remove(self, ctx: Context, intent: Namespace) -> list[str]:
        if not ctx.net.ns_exists(intent.name):
            await ctx.net.forget(intent.name)
            return []
        if not await self.owned(ctx, intent.name):
            await ctx.net.forget(intent.name)
            return [f"left namespace {intent.name} in place: netagent did not make it"]
        await ctx.net.forget(intent.name)
        await ctx.net.ns_del(intent.name)
        ctx.claims.release(intent.name)
        return [f"deleted namespace {intent.name}"]
