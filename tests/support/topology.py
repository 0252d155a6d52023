"""The seed's topology built through the real CLI, the outside client, and reading back
what the daemon holds."""

from __future__ import annotations

from typing import Any

from netagent.cli.sandbox import CLIENT_ADDR, CLIENT_HOST, outside_client_steps

from .daemon import Daemon

__all__ = ["BACKENDS", "CLIENT_ADDR", "CLIENT_HOST", "add_client", "build_seed", "desired", "show"]

#: the firewall backends every forwarding test runs against
BACKENDS = ["nftables", "iptables"]


def build_seed(d: Daemon, forward: bool = True) -> None:
    """red and blue plugged into v-net-0 (192.168.15.0/24, gateway .5), and host port 80
    forwarded to blue."""
    d.ok("ns", "add", "red")
    d.ok("ns", "add", "blue")
    d.ok("bridge", "add", "v-net-0", "--address", "192.168.15.5/24")
    d.ok("plug", "red", "v-net-0", "--address", "192.168.15.1/24")
    d.ok("plug", "blue", "v-net-0", "--address", "192.168.15.2/24")
    if forward:
        d.ok("forward", "80", "192.168.15.2:80")


def add_client(d: Daemon) -> None:
    """The outside world: a namespace ``client`` wired to the host by hand (not
    netagent's), the host at CLIENT_HOST."""
    for argv in outside_client_steps():
        d.sh(*argv)


def show(d: Daemon) -> dict[str, Any]:
    result: dict[str, Any] = d.ctl_json("show")
    return result


def desired(d: Daemon) -> list[dict[str, Any]]:
    return [i["intent"] for i in show(d)["intents"]]
