"""The vocabulary: netagent's intent values, for backends and third-party code.

Each kind declares its intent in its own module (``agent/kinds``); this module is the
small public surface that firewall backends (``docs/backends.md``) import.
"""

from __future__ import annotations

from .kinds.attach import AttachRule
from .kinds.base import Intent
from .kinds.bridge import Bridge
from .kinds.forward import Forward, forward_key, port_spec
from .kinds.namespace import Namespace
from .kinds.plug import Plug
from .kinds.wire import Wire
from .values import PROTOS, IPAddress, IPInterface, Proto

__all__ = [
    "PROTOS",
    "AttachRule",
    "Bridge",
    "Forward",
    "IPAddress",
    "IPInterface",
    "Intent",
    "Namespace",
    "Plug",
    "Proto",
    "Wire",
    "forward_key",
    "make_forward",
    "port_spec",
]


def make_forward(
    host_ports: object, destination: object, proto: object = "tcp", host_ip: object = None
) -> Forward:
    """A forward from user text, as ``forward 8000-8009 192.168.15.2:9000-9009`` says it
    (validated exactly like the request)."""
    from .kinds.forward import forward_from
    from .ops import ForwardAdd

    args: dict[str, object] = {"host_ports": host_ports, "destination": destination}
    args["proto"] = proto
    if host_ip is not None:
        args["host_ip"] = host_ip
    return forward_from(ForwardAdd.parse(args))
