"""The typer CLI: ``netagent run``, ``netagent ctl ...``, ``netagent demo``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from . import ctl as C
from .client import DEFAULT_SOCKET

app = typer.Typer(
    help="netagent: a host networking agent for namespaces, veth pairs, bridges and NAT.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
ctl = typer.Typer(
    help="Talk to the running daemon over its Unix socket.",
    no_args_is_help=True,
)
ns_app = typer.Typer(help="Network namespaces.", no_args_is_help=True)
bridge_app = typer.Typer(help="Linux bridges.", no_args_is_help=True)
attach_app = typer.Typer(
    help="Rules that attach matching interfaces to a bridge.", no_args_is_help=True
)
app.add_typer(ctl, name="ctl")
ctl.add_typer(ns_app, name="ns")
ctl.add_typer(bridge_app, name="bridge")
ctl.add_typer(attach_app, name="attach")

JsonOpt = Annotated[bool, typer.Option("--json", help="Print the reply as JSON.")]
NsOpt = Annotated[Optional[str], typer.Option("--ns", help="Look inside this namespace.")]  # noqa: UP045
ProtoOpt = Annotated[str, typer.Option("--proto", help="tcp or udp.")]


class Globals:
    socket: str | None = None
    json: bool = False


G = Globals()


def _do(op: str, args: dict[str, Any], as_json: bool = False) -> None:
    C.run_op(op, args, G.socket, as_json or G.json)


@ctl.callback()
def ctl_main(
    socket: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(
            "--socket",
            envvar="NETAGENT_SOCKET",
            help="The daemon's socket.",
            show_default=DEFAULT_SOCKET,
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    G.socket = socket
    G.json = as_json


# ---- ctl ----------------------------------------------------------------------------
@ctl.command("status")
def status(as_json: JsonOpt = False) -> None:
    """Is the daemon up, and what does it hold."""
    _do("status", {}, as_json)


@ctl.command("show")
def show(as_json: JsonOpt = False) -> None:
    """The desired topology, and whether each part is in place."""
    _do("show", {}, as_json)


@ns_app.command("add")
def ns_add(name: str, as_json: JsonOpt = False) -> None:
    """Create a network namespace (ip netns add)."""
    _do("ns.add", {"name": name}, as_json)


@ns_app.command("del")
def ns_del(name: str, as_json: JsonOpt = False) -> None:
    """Delete a namespace netagent made (refused while plugs or wires use it)."""
    _do("ns.del", {"name": name}, as_json)


@ns_app.command("list")
def ns_list(as_json: JsonOpt = False) -> None:
    """Namespaces: netagent's and the others present."""
    _do("ns.list", {}, as_json)


@bridge_app.command("add")
def bridge_add(
    name: str,
    address: Annotated[
        Optional[list[str]],  # noqa: UP045
        typer.Option("--address", help="Gateway address in CIDR form (repeat for IPv4 + IPv6)."),
    ] = None,
    masquerade: Annotated[
        bool, typer.Option("--masquerade", help="NAT the bridge's subnet going out.")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Create a bridge, up, optionally with a gateway address."""
    _do("bridge.add", {"name": name, "addresses": address or [], "masquerade": masquerade}, as_json)


@bridge_app.command("del")
def bridge_del(name: str, as_json: JsonOpt = False) -> None:
    """Delete a bridge (refused while plugs or attach rules use it)."""
    _do("bridge.del", {"name": name}, as_json)


@bridge_app.command("list")
def bridge_list(as_json: JsonOpt = False) -> None:
    """Bridges and what is plugged into them."""
    _do("bridge.list", {}, as_json)


@ctl.command("plug")
def plug(
    ns: str,
    bridge: str,
    address: Annotated[
        list[str],
        typer.Option("--address", help="The namespace end's address in CIDR form (repeatable)."),
    ],
    ifname: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option("--ifname", help="Name of the interface inside the namespace."),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Plug a namespace into a bridge (veth pair, address, default route via the bridge)."""
    args: dict[str, Any] = {"ns": ns, "bridge": bridge, "addresses": address}
    if ifname:
        args["ifname"] = ifname
    _do("plug.add", args, as_json)


@ctl.command("unplug")
def unplug(ns: str, bridge: str, as_json: JsonOpt = False) -> None:
    """Remove a namespace's veth from a bridge."""
    _do("plug.del", {"ns": ns, "bridge": bridge}, as_json)


@ctl.command("wire")
def wire(ns_a: str, cidr_a: str, ns_b: str, cidr_b: str, as_json: JsonOpt = False) -> None:
    """Link two namespaces directly with a veth pair (the seed's first step)."""
    _do(
        "wire.add",
        {"ns_a": ns_a, "addresses_a": [cidr_a], "ns_b": ns_b, "addresses_b": [cidr_b]},
        as_json,
    )


@ctl.command("unwire")
def unwire(ns_a: str, ns_b: str, as_json: JsonOpt = False) -> None:
    """Remove the direct link between two namespaces."""
    _do("wire.del", {"ns_a": ns_a, "ns_b": ns_b}, as_json)


@ctl.command("forward")
def forward(
    host_port: Annotated[str, typer.Argument(help="Host port or range, e.g. 80 or 8000-8009.")],
    destination: Annotated[str, typer.Argument(help="IP:PORT, IP:FIRST-LAST or [IPv6]:PORT.")],
    proto: ProtoOpt = "tcp",
    host_ip: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option("--host-ip", help="Only traffic addressed to this host address."),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Forward a host port (from outside and from the host itself) to a destination."""
    args: dict[str, Any] = {"host_ports": host_port, "destination": destination, "proto": proto}
    if host_ip:
        args["host_ip"] = host_ip
    _do("fwd.add", args, as_json)


@ctl.command("unforward")
def unforward(
    host_port: Annotated[str, typer.Argument(help="Host port or range as it was forwarded.")],
    proto: ProtoOpt = "tcp",
    host_ip: Annotated[Optional[str], typer.Option("--host-ip")] = None,  # noqa: UP045
    as_json: JsonOpt = False,
) -> None:
    """Stop forwarding a host port (and drop its tracked connections)."""
    args: dict[str, Any] = {"host_ports": host_port, "proto": proto}
    if host_ip:
        args["host_ip"] = host_ip
    _do("fwd.del", args, as_json)


@ctl.command("forwards")
def forwards(as_json: JsonOpt = False) -> None:
    """List the port forwards."""
    _do("fwd.list", {}, as_json)


@ctl.command("links")
def links(ns: NsOpt = None, as_json: JsonOpt = False) -> None:
    """Interfaces the kernel has (like ip link / ip addr)."""
    _do("links", {"ns": ns} if ns else {}, as_json)


@ctl.command("neigh")
def neigh(ns: NsOpt = None, as_json: JsonOpt = False) -> None:
    """The neighbour (ARP/NDP) table (like arp)."""
    _do("neigh", {"ns": ns} if ns else {}, as_json)


@ctl.command("routes")
def routes(ns: NsOpt = None, as_json: JsonOpt = False) -> None:
    """The main routing table (like route / ip route)."""
    _do("routes", {"ns": ns} if ns else {}, as_json)


@attach_app.command("add")
def attach_add(pattern: str, bridge: str, as_json: JsonOpt = False) -> None:
    """Attach interfaces matching a shell-style PATTERN to BRIDGE as they appear."""
    _do("rule.add", {"pattern": pattern, "bridge": bridge}, as_json)


@attach_app.command("del")
def attach_del(pattern: str, bridge: str, as_json: JsonOpt = False) -> None:
    """Remove an attach rule (attached interfaces stay where they are)."""
    _do("rule.del", {"pattern": pattern, "bridge": bridge}, as_json)


@attach_app.command("list")
def attach_list(as_json: JsonOpt = False) -> None:
    """List the attach rules."""
    _do("rule.list", {}, as_json)


@ctl.command("events")
def events(as_json: JsonOpt = False) -> None:
    """Stream what the agent sees and does, live (Ctrl-C to stop)."""
    C.stream_events(G.socket, as_json or G.json)


@ctl.command("apply")
def apply(
    file: Annotated[
        Path, typer.Argument(help='JSON document: {"intents": [...]}, or - for stdin.')
    ],
    prune: Annotated[
        bool, typer.Option("--prune", help="Also remove what the file does not name.")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Apply a declarative file of intents in one pass; again changes nothing."""
    C.apply_file(str(file), prune, G.socket, as_json or G.json)


@ctl.command("purge")
def purge(
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Remove everything netagent made, and nothing else; forget the desired state."""
    if not yes and not typer.confirm("Remove everything netagent made?"):
        raise typer.Exit(1)
    _do("purge", {}, as_json)


# ---- run ----------------------------------------------------------------------------
@app.command("run")
def run(
    socket: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(
            "--socket", help="Socket to listen on.", show_default="/run/netagent/netagent.sock"
        ),
    ] = None,
    state_dir: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(
            "--state-dir", help="Where desired state is kept.", show_default="/var/lib/netagent"
        ),
    ] = None,
    firewall: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option("--firewall", help="nftables, iptables or auto.", show_default="nftables"),
    ] = None,
    config: Annotated[Optional[Path], typer.Option("--config", help="TOML config file.")] = None,  # noqa: UP045
    log_format: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option("--log-format", help="auto, console or json.", show_default="auto"),
    ] = None,
    socket_group: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(
            "--socket-group",
            help="Group whose members may change things (the socket's group).",
            show_default="netagent",
        ),
    ] = None,
    readonly_group: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option("--readonly-group", help="Group whose members may only look."),
    ] = None,
    client_timeout: Annotated[
        Optional[float],  # noqa: UP045
        typer.Option(
            "--client-timeout",
            help="Seconds a client may take to send a request or read a reply.",
            show_default="10",
        ),
    ] = None,
) -> None:
    """Run the daemon in the foreground (systemd runs it this way too)."""
    import anyio

    from netagent.agent import logs
    from netagent.agent.config import Config
    from netagent.agent.daemon import run_daemon
    from netagent.agent.errors import NetagentError

    try:
        cfg = Config.load(
            str(config) if config else None,
            {
                "socket": socket,
                "state_dir": state_dir,
                "firewall": firewall,
                "log_format": log_format,
                "socket_group": socket_group,
                "readonly_group": readonly_group,
                "client_timeout": client_timeout,
            },
        )
    except NetagentError as exc:
        C.fail(exc.message, 2)
    logs.configure(cfg.log_format)
    try:
        anyio.run(run_daemon, cfg, backend="asyncio")
    except NetagentError as exc:
        C.fail(exc.message, exc.exit_status)
    except KeyboardInterrupt:
        pass


@app.command("demo")
def demo(
    keep_logs: Annotated[
        bool, typer.Option("--show-log", help="Print the daemon's log at the end.")
    ] = False,
) -> None:
    """The seed's walk through the real daemon and CLI, in a throwaway sandbox (root)."""
    from . import demo as D

    raise typer.Exit(D.main(show_log=keep_logs))
