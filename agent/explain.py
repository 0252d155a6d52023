"""``netagent ctl explain PORT``: the path a packet to a host port takes, step by step,
as the kernel would take it.

From where it comes (outside, a namespace on a bridge, the host itself), through the
hook it meets first (prerouting, or output for the host's own), which netagent rule and
map element match (or why none does), and what else acts there (other tables at the
same hook, another tool's DNAT of the port); then the destination address, namespace
and interface, the forward hook (other tools' drops, netagent's accepts), what
postrouting does to the source, the route back, and a local process listening on the
port. Everything but ``--trace`` is worked out from the desired state and the last
reading of the host (``agent/hostcheck.py``, refreshed first); ``--trace`` sends one
real probe (``agent/nfttrace.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from . import fwtrace as T
from .doctor import tool_of

if TYPE_CHECKING:
    from .hostcheck import HostCheck
    from .kinds.forward import Forward
    from .state import DesiredState


def _forward(state: DesiredState, proto: str, port: int, host_ip: Any, family: int) -> Any:
    keys = state.lookup("port", (proto, port))
    found: list[Any] = [state.get(k) for k in keys]
    fwds = [f for f in found if f is not None and f.family == family]
    bound = [f for f in fwds if f.host_ip is not None and f.host_ip == host_ip]
    unbound = [f for f in fwds if f.host_ip is None]
    return (bound or unbound or [None])[0]


def _plug_of(state: DesiredState, ip: Any) -> Any:
    plugs: Sequence[Any] = state.of_kind("plug")
    for plug in plugs:
        if any(a.ip == ip for a in plug.addresses):
            return plug
    return None


def _bridge_of(state: DesiredState, ip: Any) -> Any:
    bridges: Sequence[Any] = state.of_kind("bridge")
    for br in bridges:
        if any(ip in a.network for a in br.addresses if a.version == ip.version):
            return br
    return None


def _element(fwd: Forward, port: int, backend: str) -> str:
    if backend == "nftables":
        from netagent.backends.nftables import forward_elems

        # the element the backend writes: one interval for a range that keeps its ports
        elems = forward_elems(fwd)
        name, key, value = elems[0] if fwd.same_ports else elems[port - fwd.host_port]
        return (
            f"netagent's rule `fib daddr type local ... dnat to ... map @{name}` matches "
            f"element {key} : {value} ({fwd.key})"
        )
    from netagent.backends.iptables.rules import WIDTHS, block, port_rules

    chains = [block(fwd.proto, port, w)[0] for w in WIDTHS]
    path = " -> ".join(["NETAGENT-PREROUTING", "NETAGENT-DNAT", *chains])
    dport = fwd.dest_port + (port - fwd.host_port)
    ip = f"[{fwd.dest_ip}]" if fwd.family == 6 else str(fwd.dest_ip)
    rule = f"--dport {port} -j DNAT --to-destination {ip}:{dport}"
    if fwd.same_ports:  # the rule the backend writes for this port's block of the range
        _lo, r = max((x for x in port_rules(fwd) if x[0] <= port), key=lambda x: x[0])
        rule = f"--dport {r[r.index('--dport') + 1]} -j DNAT --to-destination {r[-1]}"
    return f"netagent's chains {path}: rule `{rule}` ({fwd.key})"


def explain(
    state: DesiredState,
    checker: HostCheck,
    backend: str,
    proto: str,
    port: int,
    source: Any = None,
    host_ip: Any = None,
) -> dict[str, Any]:
    view = checker.view
    fw = view.firewall if view is not None else None
    up = view.uplink if view is not None else None
    steps: list[dict[str, str]] = []

    def step(where: str, what: str) -> None:
        steps.append({"where": where, "what": what})

    family = (host_ip or source).version if (host_ip or source) is not None else 4
    src_plug = _plug_of(state, source) if source is not None else None
    src_bridge = _bridge_of(state, source) if source is not None else None
    local = source is not None and source.is_loopback
    iif: str | None
    if local:
        origin, hook, iif = "the host itself", "output", "lo"
    elif src_plug is not None:
        origin = f"namespace {src_plug.ns} on bridge {src_plug.bridge} (from {source})"
        hook, iif = "prerouting", src_plug.bridge
    elif source is not None:
        origin, hook, iif = (
            f"outside ({source}, coming in on {up or 'the uplink'})",
            "prerouting",
            up,
        )
    else:
        origin, hook, iif = f"outside (coming in on {up or 'the uplink'})", "prerouting", up
    dest = host_ip or ("127.0.0.1" if local and family == 4 else "a host address")
    step("origin", f"{proto} to {dest}:{port} from {origin}")

    fwd = _forward(state, proto, port, host_ip, family)
    # the first hook: other tools' chains there, and netagent's own
    if fw is not None:
        for chain in fw.base(hook):
            if chain.family in (None, family) and chain.kind in ("nat", "filter", "route"):
                tool = tool_of(chain.table if chain.framework == "nftables" else chain.name, fw)
                by = f" ({tool})" if tool else ""
                step(hook, f"{chain.where}{by}, priority {chain.priority}, also sees it")
    if fwd is None:
        step(hook, f"no netagent forward for {port}/{proto}: the packet stays on the host")
        listening = [
            lst
            for lst in (view.listeners if view else [])
            if lst.proto == proto and lst.port == port
        ]
        if listening:
            owner = view.owners.get(listening[0].inode) if view else None
            name = f"{owner[1]} (pid {owner[0]})" if owner else "a local process"
            step("input", f"delivered to {name}, listening on {listening[0].address}:{port}")
        else:
            step("input", "nothing on the host listens there: refused (TCP) or dropped (UDP)")
        return {"steps": steps, "forward": None, "verdict": "not forwarded"}
    step(hook, _element(fwd, port, backend))
    for f in checker.of(fwd.key):
        if f.code == "dnat-conflict":
            step(hook, f"also: {f.what}")
    dport = fwd.dest_port + (port - fwd.host_port)
    plug = _plug_of(state, fwd.dest_ip)
    bridge = _bridge_of(state, fwd.dest_ip)
    if plug is not None:
        step(
            "destination",
            f"{fwd.dest_ip}:{dport} is namespace {plug.ns}, interface {plug.ifname}, plugged "
            f"into bridge {plug.bridge} by {plug.host_ifname}",
        )
    elif bridge is not None:
        step("destination", f"{fwd.dest_ip}:{dport} on bridge {bridge.name}'s segment")
    else:
        step("destination", f"{fwd.dest_ip}:{dport}: routed by the host's routing table")
    oif = bridge.name if bridge is not None else None
    verdict = "delivered"
    if not local and fw is not None:
        pkt = T.Packet(
            family,
            proto,
            dport,
            iif,
            oif,
            None if source is None else str(source),
            str(fwd.dest_ip),
            frozenset({"NEW", "DNAT"}),
        )
        for o in T.at_hook(fw, "forward", pkt):
            rule = f": `{o.rule.text}`" if o.rule is not None else ""
            how = "" if o.certain else " (not certain: a match was not understood)"
            where = o.where.where if o.rule is not None else f"the policy of {o.chain.where}"
            step("forward", f"{o.chain.where}: {o.verdict} by {where}{rule}{how}")
            if o.verdict in T.DROPS:
                verdict = "dropped"
    if local:
        step(
            "postrouting",
            "netagent's `localhost` rule masquerades 127.0.0.1 to the bridge's "
            f"address; route_localnet on {oif or 'the bridge'} lets it leave",
        )
    elif src_bridge is not None and bridge is not None and src_bridge.name == bridge.name:
        step(
            "postrouting",
            f"hairpin: netagent masquerades it to {bridge.name}'s address, so "
            "the reply comes back through the host",
        )
    else:
        step("postrouting", "the source address is kept")
    gateway = bridge.gateway(family) if bridge is not None else None
    if plug is not None and gateway is not None:
        back = (
            "the host, un-NATed, then to 127.0.0.1"
            if local
            else (f"the host (conntrack undoes the DNAT), then back to {source or 'the client'}")
        )
        step(
            "route back", f"{plug.ns}'s default route via {gateway.ip} on {plug.ifname}, to {back}"
        )
    elif plug is not None:
        step(
            "route back",
            f"{plug.bridge} has no IPv{family} address: {plug.ns} has no route "
            "back through the host; the reply is lost",
        )
        verdict = "no route back"
    for f in checker.of(fwd.key):
        if f.code == "listener":
            step("host", f"{f.what} (never sees this traffic: the DNAT comes first)")
        elif f.code != "dnat-conflict":
            step("doctor", f.line())
    return {"steps": steps, "forward": fwd.key, "verdict": verdict}
