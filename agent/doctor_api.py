"""The API's side of the doctor: the ``doctor`` and ``explain`` ops, and what ``show``,
``status`` and ``forward`` say about other tools (from the findings ``HostCheck``
keeps; ``show`` never reads the host itself)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from . import ops
from .errors import InvalidPort
from .explain import explain
from .findings import Finding
from .keystatus import IN_PLACE

if TYPE_CHECKING:
    from .api import Service
    from .hostcheck import HostCheck
    from .schema import Request

BLOCKED = "blocked"


async def doctor(service: Service, req: Request) -> dict[str, Any]:
    """Read the host now and check it (what the cache holds is refreshed with it)."""
    checker = service.checker
    if checker is None:
        extra = cluster_findings(service)
        return {
            "findings": [f.to_wire() for f in extra],
            "problems": sum(1 for f in extra if f.severity == "problem"),
            "notes": 0,
            "checked": ["cluster"] if service.cluster is not None else [],
        }
    await checker.refresh(read=True)
    found = [*checker.findings, *cluster_findings(service)]
    view = checker.view
    return {
        "findings": [f.to_wire() for f in found],
        "problems": sum(1 for f in found if f.severity == "problem"),
        "notes": sum(1 for f in found if f.severity == "note"),
        "checked": [*checker.checked, *(["cluster"] if service.cluster is not None else [])],
        "read_ms": view.ms if view is not None else None,
        "firewall": service.firewall.name,
    }


def cluster_findings(service: Service) -> list[Finding]:
    """The cluster's part of the doctor: etcd out of reach (the data plane stays as it
    is, but no peer is added, changed or removed meanwhile), and peers whose route,
    neighbour or FDB entry is not in place."""
    cluster = service.cluster
    if cluster is None:
        return []
    st = cluster.status()
    out: list[Finding] = []
    if st["etcd"] != "reachable":
        endpoints = ",".join(st["endpoints"])
        out.append(
            Finding(
                "etcd-unreachable",
                "problem",
                f"etcd is {st['etcd']} ({st['error'] or 'no answer yet'}): the peers stay as "
                "they are, none is added, changed or removed until it answers",
                who=f"etcd at {endpoints}",
                fix=f"ETCDCTL_API=3 etcdctl --endpoints={endpoints} endpoint health",
            )
        )
    for peer in cluster.peers():
        if not peer["in_place"]:
            out.append(
                Finding(
                    "peer-not-in-place",
                    "problem",
                    f"peer {peer['host'] or '?'} {peer['subnet']} at {peer['underlay']}: "
                    f"{peer.get('error') or peer['state']}",
                    fix="`netagent ctl peers` and `netagent ctl show`",
                )
            )
    return out


async def explain_op(service: Service, req: Request) -> dict[str, Any]:
    assert isinstance(req, ops.Explain)
    port, count = req.port
    if count != 1:
        raise InvalidPort("explain takes one port, e.g. 8080")
    checker = service.checker
    if checker is None:
        return {"steps": [], "forward": None, "verdict": "unknown"}
    await checker.refresh(read=True)
    out = explain(
        service.state, checker, service.firewall.name, req.proto, port, req.source, req.host_ip
    )
    if req.trace:
        out["trace"] = await _trace(service, req, port)
    return out


async def _trace(service: Service, req: Any, port: int) -> list[str]:
    from netagent.backends.libnft import LibNftables

    from .explain import _plug_of
    from .nfttrace import trace

    try:
        lib = LibNftables()
    except OSError:
        return ["in-process libnftables is missing (Debian package libnftables1): no trace"]
    state = service.state
    source, host_ip = req.source, req.host_ip
    ns_path = None
    plug = _plug_of(state, source) if source is not None else None
    if plug is not None:
        ns_path = plug.ns if plug.ns.startswith("/") else str(service.ctx.net.netns_dir / plug.ns)
    if host_ip is not None:
        dest = str(host_ip)
    elif plug is not None:
        bridge: Any = state.get(f"br/{plug.bridge}")
        gw = bridge.gateway(source.version) if bridge is not None else None
        dest = str(gw.ip) if gw is not None else "127.0.0.1"
    else:
        dest = "::1" if source is not None and source.version == 6 else "127.0.0.1"
    lines = await trace(lib.run, req.proto, dest, port, ns_path)
    where = f"namespace {plug.ns}" if plug is not None else "the host"
    return [f"probe: {req.proto} from {where} to {dest}:{port}", *lines]


def annotate(checker: HostCheck | None, item: dict[str, Any]) -> None:
    """A ``show`` item: findings that block it make it not in place, with the reason
    and the doctor's line; others are its warnings."""
    if checker is None:
        return
    found = checker.of(item["key"])
    if not found:
        return
    blocking = [f for f in found if f.blocks]
    if blocking:
        if item["state"] == IN_PLACE:
            item["state"] = BLOCKED
        item["in_place"] = False
        item["missing"].extend(f.what for f in blocking)
        item["doctor"] = [f.line() for f in blocking]
    warnings = [f.line() for f in found if not f.blocks]
    if warnings:
        item["warnings"] = warnings


async def forward_warnings(service: Service, req: Request) -> list[str]:
    if service.checker is None or not isinstance(req, ops.ForwardAdd):
        return []
    from .kinds.forward import forward_from

    try:
        return await service.checker.forward_warnings(forward_from(req))
    except (OSError, TimeoutError):
        return []
