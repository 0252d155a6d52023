"""Steps several kinds share: addresses, default routes, the ownership of an interface."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio

from netagent.backends.netlink import RTPROT_NETAGENT, Link, Netlink, NsRef, alias_for

from ..errors import BackendFailed, NameTaken, NotFound
from ..values import IPInterface
from .base import Actions

if TYPE_CHECKING:
    from .bridge import Bridge


def refuse_foreign(link: Link, key: str, where: str, hint: str = "remove it first") -> None:
    """Never take over, change or delete an interface netagent did not make for ``key``
    (the same error on the request path and on the repair path)."""
    if not link.belongs_to(key):
        owner = link.owner_key or "not made by netagent"
        raise NameTaken(
            f"{where} exists and is not {key}'s ({owner}); netagent leaves it alone: {hint}"
        )


async def remove_owned_link(net: Netlink, name: str, key: str, what: str) -> list[str]:
    """Delete the host interface ``name`` if netagent made it for ``key``; one that
    someone else made under that name is left as it is, and said so."""
    link = await net.link(None, name)
    if link is None:
        return []
    if not link.belongs_to(key):
        return [f"left {name} in place: netagent did not make it"]
    await net.del_link(None, link.index)
    return [f"deleted {what}"]


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


async def new_pair(net: Netlink, host_ifname: str, ns: str, ifname: str) -> tuple[int, int]:
    """The host and inner indexes of a veth pair just made, both from the host end (the
    kernel gives its peer's index in the namespace, IFLA_LINK): one lookup on the host's
    raw socket, none in the namespace unless the kernel does not say it."""
    host = await net.link(None, host_ifname)
    inner = None if host is None else host.far_peer
    if host is not None and inner is None:
        found = await net.link(ns, ifname)
        inner = None if found is None else found.index
    if host is None or inner is None:
        raise BackendFailed(f"veth {host_ifname} vanished right after creation")
    return host.index, inner


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


@dataclass(frozen=True)
class BridgedPair:
    """A veth pair from a bridge into a namespace, as a plug and a CNI attachment both
    have it: ``host_ifname`` on ``bridge`` in the host, ``ifname`` in ``ns`` (a name
    under /run/netns, or a path), with ``addresses`` and a default route per IP version
    via the bridge's gateway."""

    key: str
    ns: str
    ifname: str
    host_ifname: str
    bridge: Bridge
    addresses: tuple[IPInterface, ...]
    #: what to do when another's interface holds the host name, and the inner one
    host_hint: str = "remove it first"
    inner_hint: str = "remove it first"
    #: bring the namespace's ``lo`` up too (a namespace of netagent's or named by people)
    lo_up: bool = False


async def ensure_bridged_pair(
    net: Netlink, pair: BridgedPair, acts: Actions, create: Callable[[int], Awaitable[None]]
) -> list[str]:
    """Observe the pair and make it as wanted: a half pair (or a pair not joining the two)
    is rebuilt whole; none is made by ``create(bridge_index)`` (the fresh path, which
    knows everything about the new pair); an existing one is marked, enslaved, set up,
    addressed and routed. Another's interface of either name is never touched."""
    inner_where = f"{pair.ns}:{pair.ifname}"
    # the daemon lives in the host namespace: an index lookup is one cheap ioctl; full
    # link info is read only when the pair exists and has to be checked
    bridge_index = net.host_index(pair.bridge.name)
    host = None
    if net.host_index(pair.host_ifname) is not None:
        host = await net.link(None, pair.host_ifname)
    inner = await net.link(pair.ns, pair.ifname)
    if bridge_index is None:
        if acts.dry_run:
            acts.add(f"create veth {pair.host_ifname} <-> {inner_where}")
            return acts.done
        raise NotFound(f"bridge {pair.bridge.name} does not exist")
    if host is not None:
        refuse_foreign(host, pair.key, pair.host_ifname, pair.host_hint)
    if inner is not None:
        refuse_foreign(inner, pair.key, inner_where, pair.inner_hint)
    broken = (host is None) != (inner is None) or (
        host is not None and inner is not None and host.link_netnsid is None
    )
    if broken:
        if host is not None and acts.add(f"delete stray {pair.host_ifname}"):
            await net.del_link(None, host.index)
        if inner is not None and acts.add(f"delete stray {inner_where}"):
            await net.del_link(pair.ns, inner.index)
        host = inner = None
    if host is None:
        if not acts.add(f"create veth {pair.host_ifname} <-> {inner_where}"):
            acts.add(f"address {inner_where}")
            return acts.done
        await create(bridge_index)
        return acts.done
    assert inner is not None
    await ensure_mark(net, None, host, pair.key, acts)
    await ensure_mark(net, pair.ns, inner, pair.key, acts)
    if host.master != bridge_index and acts.add(
        f"enslave {pair.host_ifname} to {pair.bridge.name}"
    ):
        await net.set_link(None, host.index, master=bridge_index)
    if net.port_ipv6(pair.host_ifname) and acts.add(f"turn IPv6 off on {pair.host_ifname}"):
        await net.port_ipv6_off(pair.host_ifname)  # a port carries frames only (PORT_IPV6)
    await ensure_up(net, None, host, pair.host_ifname, acts)
    await ensure_addresses(net, pair.ns, inner, pair.addresses, inner_where, acts)
    await ensure_up(net, pair.ns, inner, inner_where, acts)
    if pair.lo_up:
        await ensure_lo_up(net, pair.ns, acts)
    for addr in pair.addresses:
        gw = pair.bridge.gateway(addr.version)
        if gw is not None:
            await ensure_default_route(net, pair.ns, inner, gw, pair.ns, acts)
    return acts.done
