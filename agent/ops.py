"""Every op of the socket protocol: its arguments, its CLI form and its help, declared once.

One name per concept across the CLI, the op and the intent kind: ``ns``, ``bridge``,
``plug``, ``wire``, ``attach`` (rules that attach interfaces to a bridge) and ``forward``.
Ops are ``<kind>.add|del|list``; the CLI keeps the seed's verbs (``plug``, ``unplug``,
``forward``, ``forwards`` ...) as its words for them, and the older op names (``fwd.add``,
``rule.add`` ...) still work on the socket as aliases. ``apply`` documents are lists of
the same add requests, each naming its kind.

The daemon parses each request once into one of these typed values
(:meth:`Request.parse`); the CLI builds its commands from them. Standard library only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypedDict

from .schema import Request, Value, arg, flag, many, maybe, maybe_arg, opt

if TYPE_CHECKING:
    from .values import IPAddress, IPInterface, Proto

NAME: Value[str] = Value("name", "NAME")
CIDRS: Value[tuple[IPInterface, ...]] = Value("cidrs", "CIDR")
IP: Value[IPAddress] = Value("ip", "ADDR")
HOST_IP: Value[IPAddress] = Value("host_ip", "ADDR")
PORTS: Value[tuple[int, int]] = Value("ports", "PORT")
DESTINATION: Value[tuple[IPAddress, int, int]] = Value("destination", "IP:PORT")
PROTO: Value[Proto] = Value("proto", "PROTO")
PATTERN: Value[str] = Value("pattern", "PATTERN")
LIST: Value[list[object]] = Value("list", "LIST")
NETNS: Value[str] = Value("netns", "PATH")
PID: Value[int] = Value("pid", "PID")
TEXT: Value[str] = Value("text", "TEXT")
OBJECT: Value[dict[str, Any]] = Value("object", "OBJECT")
NUMBER: Value[float] = Value("number", "NUMBER")
#: the CLI's own values (never parsed by the daemon)
FORMAT: Value[str] = Value("word", "FORMAT")
OUTPUT: Value[str] = Value("path", "FILE")
GRAPH_FORMATS = ("dot", "svg", "png")


# ---- the daemon ---------------------------------------------------------------------
class Status(Request):
    """Is the daemon up, and what does it hold."""

    op = "status"
    cli = ("status",)


class Show(Request):
    """The desired topology, and whether each part is in place."""

    op = "show"
    cli = ("show",)
    # the CLI's own: the picture is drawn from show's answer, never by the daemon
    graph = flag(
        "--graph",
        "graph",
        "Draw the topology: host, bridges, namespaces, wires, forwards; what is not in "
        "place in red.",
        local=True,
    )
    format = maybe(
        FORMAT,
        "--format",
        "format",
        "dot (always), svg or png (through Graphviz's dot); implies --graph. "
        "Default: from --output's suffix, else dot.",
        choices=GRAPH_FORMATS,
        local=True,
    )
    output = maybe(
        OUTPUT,
        "--output",
        "output file",
        "Write the picture here instead of to standard output; implies --graph.",
        local=True,
    )


class Events(Request):
    """Stream what the agent sees and does, live (Ctrl-C to stop)."""

    op = "events"
    cli = ("events",)


class Apply(Request):
    """Apply a declarative file of intents in one pass; again changes nothing."""

    op = "apply"
    cli = ("apply",)
    mutating = True
    intents = arg(LIST, "intents")
    prune = flag("--prune", "prune", "Also remove what the file does not name.")


class Purge(Request):
    """Remove everything netagent made, and nothing else; forget the desired state."""

    op = "purge"
    cli = ("purge",)
    mutating = True
    orphans = flag(
        "--orphans",
        "orphans",
        "Remove only the orphans (marked as netagent's, desired by nothing); keep the rest.",
    )


# ---- namespaces ---------------------------------------------------------------------
class NsAdd(Request):
    """Create a network namespace (ip netns add)."""

    op = "ns.add"
    cli = ("ns", "add")
    mutating = True
    kind = "ns"
    verb = "add"
    name = arg(NAME, "namespace name")


class NsDel(Request):
    """Delete a namespace netagent made (refused while plugs or wires use it)."""

    op = "ns.del"
    kind = "ns"
    verb = "del"
    cli = ("ns", "del")
    mutating = True
    name = arg(NAME, "namespace name")


class NsList(Request):
    """Namespaces: netagent's and the others present."""

    op = "ns.list"
    kind = "ns"
    verb = "list"
    cli = ("ns", "list")


# ---- bridges ------------------------------------------------------------------------
class BridgeAdd(Request):
    """Create a bridge, up, optionally with a gateway address."""

    op = "bridge.add"
    cli = ("bridge", "add")
    mutating = True
    kind = "bridge"
    verb = "add"
    kind_aliases = ("br",)
    name = arg(NAME, "bridge name")
    addresses = many(
        CIDRS,
        "--address",
        "bridge address",
        "Gateway address in CIDR form (repeat for IPv4 + IPv6).",
        aliases=("address",),
    )
    masquerade = flag("--masquerade", "masquerade", "NAT the bridge's subnet going out.")


class BridgeDel(Request):
    """Delete a bridge (refused while plugs or attach rules use it)."""

    op = "bridge.del"
    kind = "bridge"
    verb = "del"
    cli = ("bridge", "del")
    mutating = True
    name = arg(NAME, "bridge name")


class BridgeList(Request):
    """Bridges and what is plugged into them."""

    op = "bridge.list"
    kind = "bridge"
    verb = "list"
    cli = ("bridge", "list")


# ---- plugs --------------------------------------------------------------------------
_FOREIGN_HELP = (
    "A namespace another tool made, by path (/proc/PID/ns/net, /run/netns/NAME), "
    "instead of NS; netagent adds its veth and never takes the namespace."
)
_PID_HELP = "The namespace of this process, instead of NS (noticed when the process is gone)."


class PlugAdd(Request):
    """Plug a namespace into a bridge (veth pair, address, default route via the bridge):
    NS BRIDGE, or --netns PATH BRIDGE / --pid PID BRIDGE for another tool's namespace."""

    op = "plug.add"
    cli = ("plug",)
    mutating = True
    kind = "plug"
    verb = "add"
    ns = maybe_arg(
        NAME, "namespace name", ("netns", "pid"), "A namespace under /run/netns.", metavar="NS"
    )
    bridge = arg(NAME, "bridge name", metavar="BRIDGE")
    netns = maybe(NETNS, "--netns", "--netns", _FOREIGN_HELP)
    pid = maybe(PID, "--pid", "--pid", _PID_HELP)
    addresses = many(
        CIDRS,
        "--address",
        "plug address",
        "The namespace end's address in CIDR form (repeat for IPv4 + IPv6); leased from "
        "the bridge's subnet when left out.",
        aliases=("address",),
    )
    ifname = maybe(
        NAME, "--ifname", "interface name", "Name of the interface inside the namespace."
    )


class PlugDel(Request):
    """Remove a namespace's veth from a bridge (NS BRIDGE, or --netns PATH / --pid PID
    BRIDGE); another tool's namespace stays."""

    op = "plug.del"
    kind = "plug"
    verb = "del"
    cli = ("unplug",)
    mutating = True
    ns = maybe_arg(
        NAME, "namespace name", ("netns", "pid"), "A namespace under /run/netns.", metavar="NS"
    )
    bridge = arg(NAME, "bridge name", metavar="BRIDGE")
    netns = maybe(NETNS, "--netns", "--netns", "The namespace it was plugged by path.")
    pid = maybe(PID, "--pid", "--pid", "The process whose namespace it was plugged.")


# ---- wires --------------------------------------------------------------------------
class WireAdd(Request):
    """Link two namespaces directly with a veth pair (the seed's first step)."""

    op = "wire.add"
    cli = ("wire",)
    mutating = True
    kind = "wire"
    verb = "add"
    ns_a = arg(NAME, "namespace name", metavar="NS_A")
    addresses_a = arg(CIDRS, "address", metavar="CIDR_A")
    ns_b = arg(NAME, "namespace name", metavar="NS_B")
    addresses_b = arg(CIDRS, "address", metavar="CIDR_B")


class WireDel(Request):
    """Remove the direct link between two namespaces."""

    op = "wire.del"
    kind = "wire"
    verb = "del"
    cli = ("unwire",)
    mutating = True
    ns_a = arg(NAME, "namespace name", metavar="NS_A")
    ns_b = arg(NAME, "namespace name", metavar="NS_B")


# ---- forwards -----------------------------------------------------------------------
_PROTO_HELP = "tcp or udp."


class ForwardAdd(Request):
    """Forward a host port (from outside and from the host itself) to a destination."""

    op = "forward.add"
    aliases = ("fwd.add",)
    cli = ("forward",)
    mutating = True
    kind = "forward"
    verb = "add"
    kind_aliases = ("fwd",)
    host_ports = arg(
        PORTS, "host port", "Host port or range, e.g. 80 or 8000-8009.", metavar="HOST_PORT"
    )
    destination = arg(
        DESTINATION, "destination", "IP:PORT, IP:FIRST-LAST or [IPv6]:PORT.", metavar="DEST"
    )
    proto = opt(PROTO, "--proto", "protocol", "tcp", _PROTO_HELP)
    host_ip = maybe(
        HOST_IP, "--host-ip", "--host-ip", "Only traffic addressed to this host address."
    )


class ForwardDel(Request):
    """Stop forwarding a host port (and drop its tracked connections)."""

    op = "forward.del"
    kind = "forward"
    verb = "del"
    aliases = ("fwd.del",)
    cli = ("unforward",)
    mutating = True
    host_ports = arg(PORTS, "host port", "Host port or range as it was forwarded.", "HOST_PORT")
    proto = opt(PROTO, "--proto", "protocol", "tcp", _PROTO_HELP)
    host_ip = maybe(HOST_IP, "--host-ip", "--host-ip", "The host address it was bound to.")


class ForwardList(Request):
    """List the port forwards."""

    op = "forward.list"
    kind = "forward"
    verb = "list"
    aliases = ("fwd.list",)
    cli = ("forwards",)


# ---- attach rules -------------------------------------------------------------------
class AttachAdd(Request):
    """Attach interfaces matching a shell-style PATTERN to BRIDGE as they appear."""

    op = "attach.add"
    aliases = ("rule.add",)
    cli = ("attach", "add")
    mutating = True
    kind = "attach"
    verb = "add"
    kind_aliases = ("rule",)
    pattern = arg(PATTERN, "pattern")
    bridge = arg(NAME, "bridge name", metavar="BRIDGE")


class AttachDel(Request):
    """Remove an attach rule (attached interfaces stay where they are)."""

    op = "attach.del"
    kind = "attach"
    verb = "del"
    aliases = ("rule.del",)
    cli = ("attach", "del")
    mutating = True
    pattern = arg(PATTERN, "pattern")
    bridge = arg(NAME, "bridge name", metavar="BRIDGE")


class AttachList(Request):
    """List the attach rules."""

    op = "attach.list"
    kind = "attach"
    verb = "list"
    aliases = ("rule.list",)
    cli = ("attach", "list")


# ---- what the kernel has ------------------------------------------------------------
_NS_HELP = "Look inside this namespace."


class Links(Request):
    """Interfaces the kernel has (like ip link / ip addr)."""

    op = "links"
    cli = ("links",)
    ns = maybe(NAME, "--ns", "namespace name", _NS_HELP)


class Neigh(Request):
    """The neighbour (ARP/NDP) table (like arp)."""

    op = "neigh"
    cli = ("neigh",)
    ns = maybe(NAME, "--ns", "namespace name", _NS_HELP)


class Routes(Request):
    """The main routing table (like route / ip route)."""

    op = "routes"
    cli = ("routes",)
    ns = maybe(NAME, "--ns", "namespace name", _NS_HELP)


# ---- the state's own requests (``agent/quarantine.py``) -----------------------------
KEY: Value[str] = Value("text", "KEY")


class Forget(Request):
    """Drop a quarantined intent (one today's checks refuse) for good."""

    op = "forget"
    cli = ("forget",)
    mutating = True
    key = arg(KEY, "key", "The quarantined intent's key, as `show` lists it.", "KEY")


# ---- container runtimes (CNI) and other tools' namespaces ---------------------------
class AttachmentList(Request):
    """Interfaces netagent put into other tools' namespaces (CNI, plug --netns/--pid)."""

    op = "attachment.list"
    kind = "attachment"
    verb = "list"
    cli = ("attachments",)


class Cni(Request):
    """One CNI call, as the ``netagent`` CNI plugin forwards it (``netagent.cni``):
    ``CNI_COMMAND`` and the other ``CNI_*`` variables, the network configuration from
    stdin, and for a DEL carried out from the queue, when it was queued."""

    op = "cni"
    mutating = True
    command = arg(TEXT, "CNI_COMMAND")
    container_id = maybe(TEXT, "--container-id", "CNI_CONTAINERID")
    netns = maybe(TEXT, "--netns", "CNI_NETNS")
    ifname = maybe(TEXT, "--ifname", "CNI_IFNAME")
    args = maybe(TEXT, "--args", "CNI_ARGS")
    config = arg(OBJECT, "network configuration")
    queued_at = maybe(NUMBER, "--queued-at", "queued_at")


CNI_REQUESTS: tuple[type[Request], ...] = (AttachmentList, Cni)

# ---- the host around netagent: doctor, explain ---------------------------------------
SOURCE: Value[IPAddress] = Value("host_ip", "ADDR")


class Doctor(Request):
    """Check the host for what breaks netagent's bridges or forwards (exit 1 if any)."""

    op = "doctor"
    cli = ("doctor",)


class Explain(Request):
    """The path a packet to a host port takes, step by step, as the kernel would."""

    op = "explain"
    cli = ("explain",)
    port = arg(PORTS, "host port", "The host port the packet is sent to.", metavar="PORT")
    proto = opt(PROTO, "--proto", "protocol", "tcp", _PROTO_HELP)
    source = maybe(
        SOURCE,
        "--from",
        "--from",
        "Where it comes from: an outside address, a namespace's, or 127.0.0.1 (the host).",
    )
    host_ip = maybe(HOST_IP, "--host-ip", "--host-ip", "The host address it is sent to.")
    trace = flag(
        "--trace",
        "trace",
        "Send one real probe along the path with nftables tracing and list the rules it hit.",
    )


REQUESTS: tuple[type[Request], ...] = (
    Status,
    Show,
    NsAdd,
    NsDel,
    NsList,
    BridgeAdd,
    BridgeDel,
    BridgeList,
    PlugAdd,
    PlugDel,
    WireAdd,
    WireDel,
    ForwardAdd,
    ForwardDel,
    ForwardList,
    AttachAdd,
    AttachDel,
    AttachList,
    Links,
    Neigh,
    Routes,
    Events,
    Apply,
    Purge,
    Forget,
    *CNI_REQUESTS,
    Doctor,
    Explain,
)


# ---- the cluster (``agent/cluster.py``) ----------------------------------------------
class Peers(Request):
    """The cluster's other hosts: subnet, underlay, lease, and whether their routes and
    FDB entries are in place."""

    op = "peers"
    cli = ("peers",)


REQUESTS += (Peers,)

#: op name or alias -> request class
BY_OP: dict[str, type[Request]] = {name: r for r in REQUESTS for name in (r.op, *r.aliases)}
#: intent kind or alias -> the request that adds one (an ``apply`` document's entries)
BY_KIND: dict[str, type[Request]] = {
    name: r for r in REQUESTS if r.kind and r.verb == "add" for name in (r.kind, *r.kind_aliases)
}
#: CLI words -> request class
BY_CLI: dict[tuple[str, ...], type[Request]] = {r.cli: r for r in REQUESTS if r.cli}


# ---- replies ------------------------------------------------------------------------
class ChangeWire(TypedDict):
    key: str
    action: str
    what: str


class ChangeReply(TypedDict, total=False):
    changed: bool
    changes: list[ChangeWire]
    changes_total: int
    actions: dict[str, list[str]]
    errors: dict[str, str]


class ShowItem(TypedDict):
    key: str
    kind: str
    describe: str
    in_place: bool
    state: str
    missing: list[str]
    error: str | None
    intent: dict[str, Any]


class ShowFirewall(TypedDict):
    backend: str
    in_place: bool
    pending: list[str]
    error: str | None


class ShowReply(TypedDict):
    intents: list[ShowItem]
    firewall: ShowFirewall
    orphans: list[dict[str, Any]]
    quarantined: list[dict[str, Any]]
