"""The typer CLI: ``netagent run``, ``netagent ctl ...``, ``netagent demo``.

The ``ctl`` commands are built from the request declarations in ``agent/ops.py`` (the
same ones the daemon parses and the fast path in ``entry.py`` reads), so each command's
arguments and help are declared once. typer is here for ``--help``, completion and the
error messages of a command line that is not right; a right one never loads it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from netagent.agent import ops
from netagent.agent.schema import Field, Request

from . import ctl as C
from .client import DEFAULT_SOCKET
from .cni_cmd import cni_app

app = typer.Typer(
    help="netagent: a host networking agent for namespaces, veth pairs, bridges and NAT.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
ctl = typer.Typer(help="Talk to the running daemon over its Unix socket.", no_args_is_help=True)
app.add_typer(ctl, name="ctl")
app.add_typer(cni_app, name="cni")
GROUPS = {
    "ns": "Network namespaces.",
    "bridge": "Linux bridges.",
    "attach": "Rules that attach matching interfaces to a bridge.",
}
_groups: dict[str, typer.Typer] = {}
for _name, _help in GROUPS.items():
    _groups[_name] = typer.Typer(help=_help, no_args_is_help=True)
    ctl.add_typer(_groups[_name], name=_name)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print the reply as JSON.")]


class Globals:
    socket: str | None = None
    json: bool = False


G = Globals()


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


# ---- ctl commands from the request declarations --------------------------------------
def _parameter(f: Field[Any], loose: bool = False) -> inspect.Parameter:
    """``loose``: the request has positionals that may be left out; click fills
    positionals from the left, so all are optional here and the command shifts them."""
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    if f.flag is None:
        if loose:
            ann: Any = Annotated[
                Optional[str],  # noqa: UP045
                typer.Argument(help=f.help, metavar=f.metavar, show_default=False),
            ]
            return inspect.Parameter(f.name, kind, annotation=ann, default=None)
        ann = Annotated[str, typer.Argument(help=f.help, metavar=f.metavar)]
        return inspect.Parameter(f.name, kind, annotation=ann)
    if f.is_flag:
        ann = Annotated[bool, typer.Option(f.flag, help=f.help)]
        return inspect.Parameter(f.name, kind, annotation=ann, default=False)
    if f.many:
        ann = Annotated[list[str], typer.Option(f.flag, help=f.help, metavar=f.metavar)]
        if f.required:
            return inspect.Parameter(f.name, kind, annotation=ann)
        ann = Annotated[
            Optional[list[str]],  # noqa: UP045
            typer.Option(f.flag, help=f.help, metavar=f.metavar),
        ]
        return inspect.Parameter(f.name, kind, annotation=ann, default=None)
    shown = None if f.default is None else str(f.default)
    # a value with choices is an enum to typer: it shows, completes and checks them
    typ: Any = str if f.choices is None else StrEnum(f.name, {c: c for c in f.choices})
    ann = Annotated[
        Optional[typ],  # noqa: UP045
        typer.Option(
            f.flag,
            help=f.help,
            metavar=None if f.choices else f.metavar,  # typer shows the choices then
            show_default=shown or False,
        ),
    ]
    return inspect.Parameter(f.name, kind, annotation=ann, default=None)


def _command(req: type[Request]) -> Callable[..., None]:
    positional = [f for f in req.fields if f.flag is None]
    loose = any(not f.required for f in positional)
    params = [_parameter(f, loose) for f in (*req.fields, *req.local_fields)]
    local_names = {f.name for f in req.local_fields}
    params.append(
        inspect.Parameter(
            "as_json",
            inspect.Parameter.KEYWORD_ONLY,
            annotation=JsonOpt,
            default=False,
        )
    )

    def command(**values: Any) -> None:
        as_json = values.pop("as_json")
        given = [values[f.name] for f in positional if values[f.name] is not None]
        required = [f for f in positional if f.required]
        if loose and len(given) < len(positional):
            # ``plug --netns PATH BRIDGE``: the words are the required positionals
            left_out = [f for f in positional if not f.required]
            if len(given) != len(required) or not all(
                any(values.get(name) is not None for name in f.instead) for f in left_out
            ):
                names = " ".join(f.metavar for f in positional)
                instead = " or ".join(
                    f"--{n} with {' '.join(r.metavar for r in required)}"
                    for f in left_out
                    for n in f.instead
                )
                raise typer.BadParameter(f"give {names}, or {instead}")
            for f in positional:
                values[f.name] = None
            for f, word in zip(required, given, strict=True):
                values[f.name] = word
        # what the fast path sends for the same line: only what was given
        args = {
            k: v.value if isinstance(v, StrEnum) else v
            for k, v in values.items()
            if v is not None and v is not False and v != []
        }
        local = {k: args.pop(k) for k in list(args) if k in local_names}
        if local:
            C.run_op(req.op, args, G.socket, as_json or G.json, local)
        else:
            C.run_op(req.op, args, G.socket, as_json or G.json)

    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in params}
    command.__doc__ = req.__doc__
    command.__name__ = "_".join(req.cli)
    return command


for _req in ops.REQUESTS:
    if not _req.cli or _req in (ops.Apply, ops.Purge, ops.Events):
        continue
    _where = _groups[_req.cli[0]] if len(_req.cli) == 2 else ctl
    # a docstring wrapped over lines is one paragraph of help, not lines of it
    _help = " ".join((_req.__doc__ or "").split())
    _where.command(_req.cli[-1], help=_help)(_command(_req))


# ---- ctl commands whose command line differs from their request ----------------------
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
    orphans: Annotated[bool, typer.Option("--orphans", help=ops.Purge.orphans.help)] = False,
    as_json: JsonOpt = False,
) -> None:
    """Remove everything netagent made, and nothing else; forget the desired state."""
    what = "netagent's orphans" if orphans else "everything netagent made"
    if not yes and not typer.confirm(f"Remove {what}?"):
        raise typer.Exit(1)
    C.run_op("purge", {"orphans": True} if orphans else {}, G.socket, as_json or G.json)


# ---- run ----------------------------------------------------------------------------
def _cluster(flag: str, help: str, metavar: str, default: str | None = None) -> Any:
    """A ``run`` option of the cluster's, shown in a panel of its own."""
    return typer.Option(
        flag, help=help, metavar=metavar, show_default=default or False, rich_help_panel="Cluster"
    )


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
    metrics: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(
            "--metrics",
            metavar="ADDR:PORT",
            help="Serve Prometheus metrics at http://ADDR:PORT/metrics, e.g. "
            "127.0.0.1:9464 (off by default).",
        ),
    ] = None,
    recover: Annotated[
        bool,
        typer.Option(
            "--recover",
            help="If the state files are damaged, start from the last good sequence and "
            "keep the damaged files aside in the state dir (see docs/state.md).",
        ),
    ] = False,
    cluster_endpoints: Annotated[
        Optional[str],  # noqa: UP045
        _cluster("--cluster-endpoints", "etcd URLs, comma-separated: join the cluster.", "URL"),
    ] = None,
    cluster_cidr: Annotated[
        Optional[str],  # noqa: UP045
        _cluster("--cluster-cidr", "The cluster's range.", "CIDR", "10.244.0.0/16"),
    ] = None,
    cluster_subnet_len: Annotated[
        Optional[int],  # noqa: UP045
        _cluster("--cluster-subnet-len", "Prefix length of each host's subnet.", "N", "24"),
    ] = None,
    underlay: Annotated[
        Optional[str],  # noqa: UP045
        _cluster(
            "--underlay",
            "This host's address on the underlay (default: the default route's interface's).",
            "ADDR",
        ),
    ] = None,
    cluster_vni: Annotated[
        Optional[int],  # noqa: UP045
        _cluster("--cluster-vni", "The VXLAN network identifier.", "VNI", "1"),
    ] = None,
    cluster_port: Annotated[
        Optional[int],  # noqa: UP045
        _cluster("--cluster-port", "The VXLAN UDP port.", "PORT", "4789"),
    ] = None,
    cluster_lease_ttl: Annotated[
        Optional[int],  # noqa: UP045
        _cluster(
            "--cluster-lease-ttl",
            "Seconds a host's lease outlives its last keep-alive.",
            "SECONDS",
            "30",
        ),
    ] = None,
    cluster_bridge: Annotated[
        Optional[str],  # noqa: UP045
        _cluster(
            "--cluster-bridge", "The bridge that gets the host's subnet.", "NAME", "netagent0"
        ),
    ] = None,
    cluster_prefix: Annotated[
        Optional[str],  # noqa: UP045
        _cluster("--cluster-prefix", "Where in etcd.", "KEY", "/netagent/network"),
    ] = None,
    cluster_ca: Annotated[
        Optional[str],  # noqa: UP045
        _cluster("--cluster-ca", "CA certificate (PEM) for https endpoints.", "FILE"),
    ] = None,
    cluster_cert: Annotated[
        Optional[str],  # noqa: UP045
        _cluster("--cluster-cert", "Client certificate (PEM) for etcd.", "FILE"),
    ] = None,
    cluster_key: Annotated[
        Optional[str],  # noqa: UP045
        _cluster("--cluster-key", "Client key (PEM) for etcd.", "FILE"),
    ] = None,
    cluster_tls_name: Annotated[
        Optional[str],  # noqa: UP045
        _cluster(
            "--cluster-tls-name",
            "Server name in etcd's certificates (default: the first endpoint's host).",
            "NAME",
        ),
    ] = None,
    cluster_host: Annotated[
        Optional[str],  # noqa: UP045
        _cluster("--cluster-host", "This host's name in the cluster (default: hostname).", "NAME"),
    ] = None,
) -> None:
    """Run the daemon in the foreground (systemd runs it this way too)."""
    import anyio

    from netagent.agent import logs
    from netagent.agent.config import Config
    from netagent.agent.errors import NetagentError
    from netagent.agent.main import run_daemon

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
                "metrics": metrics,
                "cluster_endpoints": cluster_endpoints,
                "cluster_cidr": cluster_cidr,
                "cluster_subnet_len": cluster_subnet_len,
                "underlay": underlay,
                "cluster_vni": cluster_vni,
                "cluster_port": cluster_port,
                "cluster_lease_ttl": cluster_lease_ttl,
                "cluster_bridge": cluster_bridge,
                "cluster_prefix": cluster_prefix,
                "cluster_ca": cluster_ca,
                "cluster_cert": cluster_cert,
                "cluster_key": cluster_key,
                "cluster_tls_name": cluster_tls_name,
                "cluster_host": cluster_host,
            },
        )
    except NetagentError as exc:
        C.fail(exc.message, 2)
    logs.configure(cfg.log_format)
    try:
        anyio.run(run_daemon, cfg, recover, backend="asyncio")
    except NetagentError as exc:
        C.fail(exc.message, exc.exit_status)
    except KeyboardInterrupt:
        pass


@app.command("demo")
def demo(
    keep_logs: Annotated[
        bool, typer.Option("--show-log", help="Print the daemon's log at the end.")
    ] = False,
    picture: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option(
            "--picture",
            help="Save the picture of the seed's topology here (PNG, SVG or DOT by suffix).",
            show_default="netagent-demo-topology.png in the temporary directory",
        ),
    ] = None,
) -> None:
    """The seed's walk through the real daemon and CLI, in a throwaway sandbox (root);
    saves a picture of the topology it built and says where."""
    from . import demo as D

    raise typer.Exit(D.main(show_log=keep_logs, picture=picture))
