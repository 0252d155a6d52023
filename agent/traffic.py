"""Packets and bytes per forward, plug and bridge, for ``forwards`` and ``show``.

Forwards: what the firewall backend's DNAT counted (``FirewallBackend.counters``: nft
counters in the map elements, iptables rule counters; the first packet of each
connection, since established flows skip NAT). Plugs: the host end of their veth;
bridges: the bridge device itself (what the host sent into or received from the
bridge: routed and NATed traffic, not frames bridged port to port). Both from one
interface dump (``Netlink.link_counters``).

Reads are shared, and cheap for ``show`` at any size: a value younger than
:data:`FRESH` seconds is answered again; one younger than :data:`MAX_AGE` is answered
while a read in the background replaces it; an older one (or none) is waited for.
Sixty clients asking at once cost one read, and a single ``show`` at 1,000 forwards and
600 plugs does not wait for a map dump and an interface dump (20-40 ms here) unless the
last was more than two seconds ago. Replies say when the counters were read
(``counters_at``).
"""

from __future__ import annotations

import asyncio
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

#: seconds a read is answered again as it is
FRESH = 1.0
#: seconds a read is answered while a new one is made in the background
MAX_AGE = 2.0
#: seconds one read may take
READ_TIMEOUT = 10.0
T = TypeVar("T")


class Shared(Generic[T]):
    """One value, read again when it is older than ``fresh`` seconds (see the module);
    callers during a read wait for that read."""

    def __init__(
        self, read: Callable[[], Awaitable[T]], fresh: float = FRESH, max_age: float = MAX_AGE
    ) -> None:
        self.read = read
        self.fresh = fresh
        self.max_age = max_age
        self.value: T | None = None
        self.at = 0.0
        self.read_at: float | None = None  # time.time() of the value
        self._reading: anyio.Event | None = None
        self._task: asyncio.Task[None] | None = None

    async def get(self) -> T | None:
        age = time.monotonic() - self.at
        if self.value is not None and age < self.fresh:
            return self.value
        if self.value is not None and age < self.max_age:
            if self._reading is None:
                self._task = asyncio.get_running_loop().create_task(self._refresh())
            return self.value
        if self._reading is None:
            await self._refresh()
        else:
            await self._reading.wait()
        return self.value

    async def _refresh(self) -> None:
        self._reading = anyio.Event()
        try:
            with anyio.fail_after(READ_TIMEOUT):
                self.value = await self.read()
            self.at = time.monotonic()
            self.read_at = time.time()
        except Exception as exc:  # counters are a help: never fail show for them
            log.info("reading counters failed", error=str(exc))
            self.value = None
        finally:
            self._reading.set()
            self._reading = None


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

    def read_at(self) -> float | None:
        """When the forwards' counters answered last were read (time.time())."""
        return self._forwards.read_at

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
