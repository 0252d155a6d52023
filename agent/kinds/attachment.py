"""Kind ``attachment``: netagent's interface in a namespace that another tool made.

The namespace is a container runtime's (each CNI ADD through the ``netagent`` plugin is
one attachment, keyed by ``CNI_CONTAINERID`` and ``CNI_IFNAME``: ``agent/cni.py``) or a
person's (``ctl plug --netns PATH|--pid PID BRIDGE``). netagent adds a veth pair (the
inner end created directly in the namespace with the container's name, MAC, MTU, its
leased addresses and a default route via the bridge; the host end on a netagent bridge)
and never takes the namespace over: it is not created, marked or deleted by netagent.

A namespace is known by a path, and a path can come to name another namespace (a
container restarted, ``/proc/PID`` reused). So the intent holds the namespace's
identity (device and inode of the file, ``Netlink.ns_identity``) as it was when the
attachment was made, and nothing is ever done in a namespace of another identity: a
namespace that is gone or replaced is reported (the key fails with the reason), never
plugged again by name. While the namespace is the same, drift is repaired like a
plug's: the host end deleted, unenslaved or down comes back (with the inner end, since
the kernel deletes a veth's peer with it).

In CNI's chained mode (after the reference ``bridge`` plugin, in ``portmap``'s place)
an attachment has no interface of its own: it records the container's addresses from
``prevResult`` and owns the port mappings (forwards whose ``owner`` is its key).
"""

from __future__ import annotations

import re
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from netagent.backends.netlink import Link, alias_for

from ..errors import BadRequest, InvalidArgument, InvalidName, NotFound
from ..schema import Request
from ..values import IPInterface, check_families, check_name, parse_interfaces
from .base import Actions, Context, Kind, OwnedName, Placed, cached, want
from .bridge import Bridge, bridge_key
from .linkops import (
    BridgedPair,
    ensure_bridged_pair,
    gather,
    new_pair,
)

if TYPE_CHECKING:
    from netagent.backends.netlink import Netlink

    from ..linkcache import LinkCache
    from ..state import DesiredState

KEY_PREFIX = "att"
#: CNI's rule for container IDs (and network names): it also keeps them usable in a key
_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*\Z")
_MAC_RE = re.compile(r"[0-9a-f]{2}(?::[0-9a-f]{2}){5}\Z")
MAX_ID = 200


def attachment_key(container_id: str, ifname: str) -> str:
    return f"{KEY_PREFIX}/{container_id}/{ifname}"


def check_container_id(value: object, what: str = "container ID") -> str:
    if not isinstance(value, str) or not _ID_RE.match(value) or len(value) > MAX_ID:
        raise InvalidName(
            f"{what} {value!r} must start with a letter or digit, followed by letters, "
            f"digits, '_', '.' or '-' (at most {MAX_ID} characters)"
        )
    return value


def check_ifname(value: object, what: str = "interface name") -> str:
    """CNI's rules for ``CNI_IFNAME`` (not empty, not ``.``/``..``, under 16 characters,
    no ``/``, ``:`` or whitespace), and netagent's own: the name must be usable in keys
    and by the tools (``check_name``)."""
    name = check_name(value, what)
    if name == "lo":
        raise InvalidName(f"{what} lo is the namespace's loopback; pick another name")
    return name


def check_mac(value: object, what: str = "MAC address") -> str:
    mac = value.lower() if isinstance(value, str) else value
    if not isinstance(mac, str) or not _MAC_RE.match(mac):
        raise InvalidArgument(f"{what} {value!r} is not a MAC address like 02:42:ac:11:00:02")
    if int(mac[:2], 16) & 1:
        raise InvalidArgument(f"{what} {value!r} is a multicast address; give a unicast one")
    return mac


def check_mtu(value: object, what: str = "mtu") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 68 <= value <= 65535:
        raise InvalidArgument(f"{what} {value!r} must be a number from 68 to 65535")
    return value


def process_start(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks since boot, ``/proc/PID/stat`` field
    22), or None when there is no such process: a PID and its start time name one
    process, a PID alone may be reused."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    try:
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (IndexError, ValueError):
        return None


@dataclass(frozen=True)
class Attachment:
    kind: ClassVar[str] = "attachment"
    container_id: str
    ifname: str
    #: the namespace's path as the runtime (or person) named it
    netns: str
    #: (device, inode) of that namespace when the attachment was made
    netns_id: tuple[int, int] | None = None
    #: the CNI network's name ("" for a person's plug)
    network: str = ""
    #: the netagent bridge; None in CNI's chained mode (no interface of netagent's)
    bridge: str | None = None
    addresses: tuple[IPInterface, ...] = ()
    host_ifname: str | None = None
    mtu: int | None = None
    #: the inner end's MAC address (chosen when it was made: a repaired pair keeps it)
    mac: str | None = None
    #: a ``--pid`` plug: the process and its start time
    pid: int | None = None
    pid_start: int | None = None
    #: chained mode: the host interface that routes to the container (the other
    #: plugin's bridge): hairpin NAT and 127.0.0.1 forwards need it
    host_bridge: str | None = None
    #: when it was made (time.time()): a DEL queued before that is for an older one
    created: float = 0.0

    def __post_init__(self) -> None:
        check_container_id(self.container_id)
        check_ifname(self.ifname)
        if not isinstance(self.netns, str) or not self.netns.startswith("/"):
            raise InvalidArgument(f"namespace path {self.netns!r} must be absolute")
        if self.netns_id is not None and (
            not isinstance(self.netns_id, tuple)
            or len(self.netns_id) != 2
            or not all(isinstance(n, int) for n in self.netns_id)
        ):
            raise InvalidArgument("a namespace identity is (device, inode)")
        if self.network:
            check_container_id(self.network, "network name")
        check_families(self.addresses, f"attachment {self.key} address")
        if (self.bridge is None) != (self.host_ifname is None):
            raise InvalidArgument("an attachment has a bridge and a host interface, or neither")
        if self.bridge is not None:
            check_name(self.bridge, "bridge name")
            check_name(self.host_ifname, "interface name")
            if not self.addresses:
                raise InvalidArgument(f"attachment {self.key} needs an address")
        if self.mtu is not None:
            check_mtu(self.mtu)
        if self.mac is not None:
            check_mac(self.mac)
        if self.host_bridge is not None:
            check_name(self.host_bridge, "bridge name")
        if (self.pid is None) != (self.pid_start is None):
            raise InvalidArgument("a --pid attachment records the process and its start")

    @cached
    def key(self) -> str:
        return attachment_key(self.container_id, self.ifname)

    @property
    def chained(self) -> bool:
        return self.bridge is None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "kind": self.kind,
            "container_id": self.container_id,
            "ifname": self.ifname,
            "netns": self.netns,
            "netns_id": list(self.netns_id) if self.netns_id is not None else None,
            "network": self.network,
            "bridge": self.bridge,
            "addresses": [str(a) for a in self.addresses],
            "host_ifname": self.host_ifname,
            "created": self.created,
        }
        for name in ("mtu", "mac", "pid", "pid_start", "host_bridge"):
            value = getattr(self, name)
            if value is not None:
                d[name] = value
        return d

    def describe(self) -> str:
        if self.pid is not None:
            who = f"process {self.pid}'s namespace {self.netns}"
        elif self.network:
            who = f"container {self.container_id} in {self.netns} (network {self.network})"
        else:
            who = f"namespace {self.netns}"
        addrs = ", ".join(map(str, self.addresses)) or "no address"
        if self.bridge is None:
            return f"{who}: {self.ifname} at {addrs}, its port mappings (chained)"
        return f"{who}: {self.ifname} at {addrs} on {self.bridge} via {self.host_ifname}"

    def same_place(self, other: Attachment) -> bool:
        """The same attachment, whenever it was made (an ADD the runtime repeats)."""
        return self.to_dict() | {"created": 0} == other.to_dict() | {"created": 0}


def namespace_problem(net: Netlink, att: Attachment) -> str | None:
    """Why the attachment's namespace is not the one it was made in (None: it is)."""
    if att.pid is not None:
        start = process_start(att.pid)
        if start != att.pid_start:
            return (
                f"process {att.pid} is gone (its namespace is no longer reachable by "
                f"{att.netns}); `unplug --pid {att.pid} {att.bridge}` releases its address"
            )
    ident = net.ns_identity(att.netns)
    if ident is None:
        return (
            f"namespace {att.netns} is gone (the container exited?); netagent does not "
            "make it again: the runtime's DEL (or `unplug`) releases its address"
        )
    if att.netns_id is not None and ident != att.netns_id:
        return (
            f"{att.netns} names another namespace now (the one plugged was replaced); "
            "netagent never plugs a namespace again by its name"
        )
    return None


def chained_bridges(state: DesiredState) -> tuple[Bridge, ...]:
    """The other plugins' bridges behind chained attachments, as the firewall needs them:
    a namespace reaching a port mapping through the host's address is DNATed back onto
    its own bridge, and needs the same hairpin NAT as on netagent's bridges."""
    found: dict[str, dict[int, IPInterface]] = {}
    # asked on every pass that syncs the firewall: the index names the few chained ones
    keys = sorted(
        k for name in state.indexed("att-chained") for k in state.lookup("att-chained", name)
    )
    for key in keys:
        att = state.get(key)
        if isinstance(att, Attachment) and att.bridge is None and att.host_bridge:
            per = found.setdefault(att.host_bridge, {})
            for addr in att.addresses:
                if addr.network.prefixlen < addr.max_prefixlen:
                    per.setdefault(addr.version, addr)
    return tuple(
        Bridge(name, tuple(per[v] for v in sorted(per)))
        for name, per in sorted(found.items())
        if per
    )


class AttachmentKind(Kind[Attachment]):
    name = "attachment"
    key_prefix = KEY_PREFIX
    order = 4
    at_once = True
    #: its pass syncs the firewall: a chained attachment's bridge needs hairpin NAT (the
    #: sync is a full one only when the bridges it needs changed; see agent/fwsync.py)
    firewall = True
    plural = "attachments"
    rename_hint = " (CNI_IFNAME, or --ifname)"

    def from_dict(self, d: Mapping[str, Any]) -> Attachment:
        ident = d.get("netns_id")
        return Attachment(
            container_id=want(d, "container_id"),
            ifname=want(d, "ifname"),
            netns=want(d, "netns"),
            netns_id=None if ident is None else (int(ident[0]), int(ident[1])),
            network=d.get("network", ""),
            bridge=d.get("bridge"),
            addresses=parse_interfaces(d.get("addresses", ()), "attachment address"),
            host_ifname=d.get("host_ifname"),
            mtu=d.get("mtu"),
            mac=d.get("mac"),
            pid=d.get("pid"),
            pid_start=d.get("pid_start"),
            host_bridge=d.get("host_bridge"),
            created=float(d.get("created", 0.0)),
        )

    def label(self, intent: Attachment) -> str:
        return intent.container_id if intent.network else intent.netns

    def needs(self, intent: Attachment) -> tuple[str, ...]:
        return (bridge_key(intent.bridge),) if intent.bridge is not None else ()

    def names(self, intent: Attachment) -> tuple[OwnedName, ...]:
        if intent.host_ifname is None:
            return ()
        return ((None, intent.host_ifname), (intent.netns, intent.ifname))

    def addresses(self, intent: Attachment) -> tuple[Placed, ...]:
        if intent.bridge is None:
            return ()  # chained: another plugin's addresses, on its bridge
        return tuple((intent.netns, bridge_key(intent.bridge), a) for a in intent.addresses)

    def namespaces(self, intent: Attachment) -> tuple[str, ...]:
        return () if intent.bridge is None else (intent.netns,)

    def index(self, intent: Attachment) -> Iterable[tuple[str, Hashable]]:
        out: list[tuple[str, Hashable]] = [("att-netns", intent.netns)]
        if intent.network:
            out.append(("att-network", intent.network))
        if intent.bridge is None and intent.host_bridge:
            out.append(("att-chained", intent.host_bridge))
        return out

    def drifted(self, intent: Attachment, link: Link, links: LinkCache) -> bool:
        if intent.bridge is None or link.name != intent.host_ifname:
            return False
        bridge = links.named(intent.bridge)
        return not link.up or bridge is None or link.master != bridge.index

    def prunable(self, intent: Attachment) -> bool:
        return False

    def unmet(self, state: DesiredState, intent: Attachment) -> list[str]:
        if intent.bridge is not None and bridge_key(intent.bridge) not in state:
            return [f"bridge {intent.bridge}"]
        return []

    # ---- requests: attachments are made by agent/cni.py (CNI, plug --netns/--pid) ----
    def add(self, state: DesiredState, req: Request) -> Attachment:
        raise BadRequest(
            "attachments are made by a container runtime through CNI, or with "
            "`plug --netns PATH|--pid PID BRIDGE`"
        )

    def delete(self, state: DesiredState, req: Request) -> list[str]:
        raise BadRequest("attachments are removed by CNI DEL, or with `unplug --netns|--pid`")

    def rows(self, ctx: Context) -> list[dict[str, Any]]:
        atts = [a for a in ctx.state.of_kind(self.name) if isinstance(a, Attachment)]
        atts.sort(key=lambda a: (a.network, a.key))
        owned: dict[str, list[str]] = {}
        for fwd in ctx.state.of_kind("forward"):
            owner = getattr(fwd, "owner", None)
            if owner is not None:
                owned.setdefault(owner, []).append(fwd.key)
        return [
            {**a.to_dict(), "key": a.key, "forwards": sorted(owned.get(a.key, []))} for a in atts
        ]

    # ---- the kernel -----------------------------------------------------------------
    async def _ensure(self, ctx: Context, att: Attachment, acts: Actions) -> list[str]:
        if att.bridge is None or att.host_ifname is None:
            return self._ensure_chained(ctx, att, acts)
        net = ctx.net
        problem = namespace_problem(net, att)
        if problem is not None:
            if acts.dry_run:
                acts.add(problem)
                return acts.done
            raise NotFound(problem)
        br = ctx.state.get(bridge_key(att.bridge))
        if not isinstance(br, Bridge):
            raise NotFound(f"bridge {att.bridge} is not desired")
        assert att.host_ifname is not None
        pair = BridgedPair(
            att.key,
            att.netns,
            att.ifname,
            att.host_ifname,
            br,
            att.addresses,
            inner_hint="remove it, or use another CNI_IFNAME",
        )
        return await ensure_bridged_pair(
            net, pair, acts, lambda index: self._create(ctx, att, br, index, acts)
        )

    async def _create(
        self, ctx: Context, att: Attachment, br: Bridge, bridge_index: int, acts: Actions
    ) -> None:
        """The fresh path (every container start): the pair is made with the inner end
        directly in the namespace, checked to be the one of the recorded identity."""
        assert att.host_ifname is not None
        net = ctx.net
        where = f"{att.netns}:{att.ifname}"
        try:
            await net.add_veth(
                att.host_ifname,
                None,
                att.ifname,
                att.netns,
                master=bridge_index,
                up=True,
                peer_mac=att.mac,
                mtu=att.mtu,
                peer_ns_id=att.netns_id,
            )
        except FileNotFoundError:
            raise NotFound(
                f"{att.netns} is gone or names another namespace now; not plugged"
            ) from None
        host_index, inner = await new_pair(net, att.host_ifname, att.netns, att.ifname)
        await gather(
            net.set_link(None, host_index, alias=alias_for(att.key)),
            net.set_link(att.netns, inner, alias=alias_for(att.key), up=True),
        )
        acts.add(f"mark {att.host_ifname} and {where}, set {where} up")
        for addr in att.addresses:
            acts.add(f"add {addr} to {where}")
            await net.add_address(att.netns, inner, addr)
        for addr in att.addresses:
            gw = br.gateway(addr.version)
            if gw is None:
                continue
            if await net.add_default_route(att.netns, inner, gw.ip):
                acts.add(f"route default via {gw.ip} in {att.netns}")
            else:
                acts.add(f"kept the default route already in {att.netns}")

    def _ensure_chained(self, ctx: Context, att: Attachment, acts: Actions) -> list[str]:
        """Chained: 127.0.0.1 reaches a forward to the container only when the host
        interface routing to it (the other plugin's bridge) has ``route_localnet``, as
        CNI's ``portmap`` sets it."""
        br = att.host_bridge
        if br is None or not any(a.version == 4 for a in att.addresses):
            return acts.done
        if ctx.net.host_index(br) is None:
            return acts.done
        path = f"net/ipv4/conf/{br}/route_localnet"
        if ctx.net.sysctl(path) != "1" and acts.add(f"set {path.replace('/', '.')}=1"):
            ctx.net.set_sysctl(path, "1")
        return acts.done

    async def ensure(self, ctx: Context, intent: Attachment, old: Attachment | None) -> list[str]:
        return await self._ensure(ctx, intent, Actions())

    async def inspect(self, ctx: Context, intent: Attachment) -> list[str]:
        return await self._ensure(ctx, intent, Actions(dry_run=True))

    async def remove(self, ctx: Context, intent: Attachment) -> list[str]:
        """The host end (the kernel takes the inner end with it), or the inner end alone
        while the namespace is the same one; never anything else in the namespace."""
        if intent.host_ifname is None:
            return []
        net = ctx.net
        done = []
        if net.host_index(intent.host_ifname) is not None:
            host = await net.link(None, intent.host_ifname)
            if host is not None and host.belongs_to(intent.key):
                await net.del_link(None, host.index)
                done.append(f"deleted veth {intent.host_ifname}")
        if namespace_problem(net, intent) is None:
            inner = await net.link(intent.netns, intent.ifname)
            if inner is not None and inner.belongs_to(intent.key):
                await net.del_link(intent.netns, inner.index)
                done.append(f"deleted {intent.netns}:{intent.ifname}")
        return done

    async def released(self, ctx: Context, intent: Attachment) -> None:
        if intent.bridge is not None and not ctx.state.lookup("ns", intent.netns):
            await ctx.net.forget(intent.netns)
