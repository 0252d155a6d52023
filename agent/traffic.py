"""Packets and bytes per forward, plug and bridge, for ``forwards`` and ``show``.

Forwards: what the firewall backend's DNAT counted (``FirewallBackend.counters``: nft
counters in the map elements, iptables rule counters; the first packet of each
connection, since established flows skip NAT). Plugs: the host end of their veth;
bridges: the bridge device itself (what the host sent into or received from the
bridge: routed and NATed traffic, not frames bridged port to port). Both from one
interface dump (``Netlink.link_counters``).

Reads are shared: a ``show`` that comes while a read is under way waits for that read
and gets its answer, so sixty clients asking at once cost a few dumps, not sixty; a
later call reads again (counters a second old would be a lie to someone watching them).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import anyio
import structlog

if TYPE_CHECKING:
    from netagent.backends.firewall import Counts
    from netagent.backends.netlink import Netlink

    from .fwsync import FirewallSync
    from .state import DesiredState

log = structlog.get_logger("netagent.traffic")

#: seconds a read is answered again to later callers (0: only to those who waited)
FRESH = 0.0
T = TypeVar("T")


class Shared(Generic[T]):
    """One value read at most every ``fresh`` seconds; callers meanwhile share it, and
    callers during a read wait for that read."""

    def __init__(self, read: Callable[[], Awaitable[T]], fresh: float = FRESH) -> None:
        self.read = read
        self.fresh = fresh
        self.value: T | None = None
        self.at = 0.0
        self._reading: anyio.Event | None = None

    async def get(self) -> T | None:
        if self.fresh and self.value is not None and time.monotonic() - self.at < self.fresh:
            return self.value
        if self._reading is not None:
            await self._reading.wait()
            return self.value
        self._reading = anyio.Event()
        try:
            self.value = await self.read()
            self.at = time.monotonic()
        except Exception as exc:  # counters are a help: never fail show for them
            log.info("reading counters failed", error=str(exc))
            self.value = None
        finally:
            self._reading.set()
            self._reading = None
        return self.value


class Traffic:
    def __init__(self, state: DesiredState, firewall: FirewallSync, net: Netlink) -> None:
        self.state = state
        self._forwards: Shared[dict[str, Counts] | None] = Shared(self._read_forwards)
        self._links: Shared[dict[str, tuple[int, int, int, int]]] = Shared(net.link_counters)
        self.firewall = firewall

    async def _read_forwards(self) -> dict[str, Counts] | None:
        forwards: Any = list(self.state.of_kind("forward"))
        return await self.firewall.counters(forwards)

    async def forward_counts(self) -> dict[str, Counts]:
        return (await self._forwards.get()) or {}

    async def link_counts(self) -> dict[str, tuple[int, int, int, int]]:
        return (await self._links.get()) or {}

    async def rows(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """``forward.list`` rows with ``packets`` and ``bytes`` (None: not counted)."""
        counts = await self.forward_counts() if rows else {}
        for row in rows:
            c = counts.get(row["key"])
            row["packets"], row["bytes"] = c if c is not None else (None, None)
        return rows

    async def show(self, items: Iterable[dict[str, Any]]) -> None:
        """``show`` items of forwards, plugs and bridges get ``packets`` and ``bytes``
        (plugs and bridges also ``rx``/``tx``: [packets, bytes] each, seen from the
        namespace for a plug, from the host for a bridge)."""
        items = list(items)
        kinds = {i["kind"] for i in items}
        counts = await self.forward_counts() if "forward" in kinds else {}
        links = await self.link_counts() if kinds & {"plug", "bridge"} else {}
        for item in items:
            kind = item["kind"]
            if kind == "forward":
                c = counts.get(item["key"])
                item["packets"], item["bytes"] = c if c is not None else (None, None)
            elif kind in ("plug", "bridge"):
                intent = item["intent"]
                name = intent["host_ifname"] if kind == "plug" else intent["name"]
                stats = links.get(name)
                if stats is None:
                    item["packets"] = item["bytes"] = item["rx"] = item["tx"] = None
                    continue
                rxp, rxb, txp, txb = stats
                item["packets"], item["bytes"] = rxp + txp, rxb + txb
                if kind == "plug":  # the host end receives what the namespace sends
                    item["rx"], item["tx"] = [txp, txb], [rxp, rxb]
                else:
                    item["rx"], item["tx"] = [rxp, rxb], [txp, txb]
