"""``netagent cni install``: netagent as a CNI plugin for container runtimes."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

cni_app = typer.Typer(help="netagent as a container runtime's CNI plugin.", no_args_is_help=True)


@cni_app.command("install")
def install(
    bin_dir: Annotated[
        str, typer.Option("--bin-dir", help="The runtime's CNI plugin directory.")
    ] = "/opt/cni/bin",
    conf_dir: Annotated[
        str, typer.Option("--conf-dir", help="The runtime's CNI configuration directory.")
    ] = "/etc/cni/net.d",
    network: Annotated[
        Optional[list[str]],  # noqa: UP045
        typer.Option(
            "--network",
            help="NAME or NAME=SUBNET (repeat for more): a configuration list per network, "
            "on bridge na-NAME; the i-th without a subnet gets 10.85.i.0/24.",
            show_default="netagent",
        ),
    ] = None,
    socket: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option("--socket", help="The daemon's socket, when not the default."),
    ] = None,
    queue_dir: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(
            "--queue-dir",
            help="Where DELs wait while the daemon is down (the daemon reads STATE_DIR/cni-queue).",
            show_default="/var/lib/netagent/cni-queue",
        ),
    ] = None,
    no_masquerade: Annotated[
        bool, typer.Option("--no-masquerade", help="Do not NAT the networks going out.")
    ] = False,
    force: Annotated[
        bool, typer.Option("--force", help="Replace configuration files that are not netagent's.")
    ] = False,
) -> None:
    """Put the plugin binary (named netagent) and a configuration list per network in place."""
    from netagent.cni.install import InstallError
    from netagent.cni.install import install as do_install

    try:
        done = do_install(bin_dir, conf_dir, network, socket, queue_dir, not no_masquerade, force)
    except (InstallError, OSError) as exc:
        typer.echo(f"netagent: {exc}", err=True)
        raise typer.Exit(4 if isinstance(exc, InstallError) else 6) from None
    for line in done:
        typer.echo(line)
