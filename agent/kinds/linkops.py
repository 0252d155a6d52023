"""Steps several kinds share: addresses, default routes, the ownership of an interface."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any

import anyio

from netagent.backends.netlink import RTPROT_NETAGENT, Link, Netlink, NsRef, alias_for

from ..errors import NameTaken
from ..values import IPInterface
from .base import Actions


def refuse_foreign(link: Link, key: str, where: str, hint: str = "remove it first") -> None:
    """Never take over, change or delete an interface netagent did not make for ``key``
    (the same error on the request path and on the repair path)."""
    if not link.belongs_to(key):
        owner = link.owner_key or "not made by netagent"
        raise NameTaken(
            f"{where} exists and is not {key}'s ({owner}); netagent leaves it alone: {hint}"
        )


async def ensure_mark(net: Netlink, ns: NsRef, link: Link, key: str, acts: Actions) -> None:
    if link.alias != alias_for(key) and acts.add(f"mark {link.name}"):
        await net.set_link(ns, link.index, alias=alias_for(key))


async def ensure_addresses(
    net: Netlink,
    ns: NsRef,
    link: Link,
    want: tuple[IPInterface, ...],
    where: str,
    acts: Actions,
) -> None:
    have = await net.addresses(ns, link.index)
    for addr in want:
        if addr not in have and acts.add(f"add {addr} to {where}"):
            await net.add_address(ns, link.index, addr)


async def remove_addresses(
    net: Netlink,
    ns: NsRef,
    link: Link,
    gone: tuple[IPInterface, ...],
    where: str,
    acts: Actions,
) -> None:
    if not gone:
        return
    have = await net.addresses(ns, link.index)
    for addr in gone:
        if addr in have and acts.add(f"remove {addr} from {where}"):
            await net.del_address(ns, link.index, addr)


async def ensure_default_route(
    net: Netlink, ns: NsRef, link: Link, gw: IPInterface, where: str, acts: Actions
) -> None:
    """One default route per IP version: a namespace plugged into two bridges routes
    through the first; a route someone else set stays theirs. netagent's own route
    through this interface follows the bridge's gateway when that changes."""
    routes = await net.default_routes(ns, gw.version)
    if not routes:
        if acts.add(f"route default via {gw.ip} in {where}"):
            await net.add_default_route(ns, link.index, gw.ip)
        return
    for route in routes:
        ours = route.proto == RTPROT_NETAGENT and route.oif == link.index
        if ours and route.gateway != str(gw.ip):
            if acts.add(f"move the default route in {where} to {gw.ip}"):
                await net.replace_default_route(ns, link.index, gw.ip)
            return


async def gather(*aws: Awaitable[Any]) -> None:
    """Independent netlink requests at once (each has its own sequence number)."""
    async with anyio.create_task_group() as tg:
        for aw in aws:
            tg.start_soon(_wait, aw)


async def _wait(aw: Awaitable[Any]) -> None:
    await aw


async def ensure_up(net: Netlink, ns: NsRef, link: Link, where: str, acts: Actions) -> None:
    if not link.up and acts.add(f"set {where} up"):
        await net.set_link(ns, link.index, up=True)


async def ensure_lo_up(net: Netlink, ns: str, acts: Actions) -> None:
    lo = await net.link(ns, "lo")
    if lo is not None and not lo.up and acts.add(f"set lo up in {ns}"):
        await net.set_link(ns, lo.index, up=True)
