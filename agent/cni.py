"""CNI calls from container runtimes (``plug --netns|--pid`` by hand: ``agent/foreign.py``).

The ``netagent`` CNI plugin (``netagent.cni``, a small standard-library program) turns
each call of a runtime (Podman, containerd, Kubernetes through containerd) into one
``cni`` request on the socket; this module carries it out, as an attachment
(``agent/kinds/attachment.py``) changed through ``Service.mutate`` like every other
intent: proposed, checked against the kernel, journaled, committed, realized by the
reconciler, answered after the pass.

* ADD: the network's bridge (made from the configuration when netagent has none of that
  name, then owned and repaired like any bridge of netagent's), a leased or requested
  address (part of the intent: durable, never given twice), a veth into ``CNI_NETNS``
  (checked by identity), and ``runtimeConfig.portMappings`` as forwards owned by the
  attachment, in the same maps as ``ctl forward``. The runtime repeating an ADD gets the
  same answer; an ADD that fails leaves nothing behind. Chained (no bridge, no subnet:
  after the reference ``bridge`` plugin), only the port mappings, for the address in
  ``prevResult``, which is passed on unchanged.
* DEL: removes exactly what the attachment added (its forwards, its veth, its lease);
  succeeds when it is gone already, when repeated, and without a namespace. A DEL the
  plugin queued on disk while the daemon was down is carried out by
  :func:`replay_queue` (at start, then every few seconds), unless the attachment was
  made again after it was queued.
* CHECK compares the kernel with the intent; STATUS says whether ADD can be served;
  GC removes every attachment of the network that ``cni.dev/valid-attachments`` does
  not list, with its lease and forwards, and nothing else.

Errors carry the CNI code the plugin reports (``details.cni_code``, see
``agent/cniconf.py``); netagent's own errors are mapped by the plugin.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import structlog

from . import cniconf as C
from . import ops
from .errors import (
    AddressInUse,
    BackendFailed,
    BadRequest,
    Conflict,
    InvalidAddress,
    NetagentError,
    NotFound,
)
from .keystatus import FAILING, IN_PLACE
from .kinds.attachment import (
    Attachment,
    attachment_key,
    namespace_problem,
)
from .kinds.bridge import Bridge, bridge_key
from .kinds.forward import Forward, ForwardKind
from .kinds.leases import free_address
from .kinds.plug import check_in_subnet
from .reconcile import FIREWALL
from .schema import Request
from .values import IPInterface, short_hash

if TYPE_CHECKING:
    from .api import Service
    from .state import DesiredState

log = structlog.get_logger("netagent.cni")

#: seconds between looks at the DEL queue
QUEUE_POLL = 2.0

Handler = Callable[[Any], Awaitable[Any]]


def handlers(service: Service) -> dict[type[Request], Handler]:
    """The ops this module serves (``Service._handlers``)."""

    async def cni(req: Request) -> Any:
        assert isinstance(req, ops.Cni)
        return await handle_cni(service, req)

    from .foreign import handle_plug, handle_unplug

    async def plug(req: Request) -> Any:
        assert isinstance(req, ops.PlugAdd)
        return await handle_plug(service, req)

    async def unplug(req: Request) -> Any:
        assert isinstance(req, ops.PlugDel)
        return await handle_unplug(service, req)

    return {ops.Cni: cni, ops.PlugAdd: plug, ops.PlugDel: unplug}


# ---- the CNI op ------------------------------------------------------------------------
async def handle_cni(service: Service, req: ops.Cni) -> dict[str, Any]:
    command = req.command.upper()
    if command == "VERSION":
        return {"result": {"cniVersion": "1.1.0", "supportedVersions": list(C.SUPPORTED)}}
    conf = C.parse_config(req.config)
    t0 = time.perf_counter()
    result: Any = None
    if command == "ADD":
        result = await cni_add(service, conf, req)
    elif command == "DEL":
        await cni_del(service, conf, req.container_id, req.ifname, req.queued_at)
    elif command == "CHECK":
        await cni_check(service, conf, req)
    elif command == "STATUS":
        cni_status(service, conf)
    elif command == "GC":
        result = await cni_gc(service, conf)
    else:
        raise C.cni_error(
            BadRequest,
            C.INVALID_ENVIRONMENT,
            f"CNI_COMMAND {req.command!r} is not one of ADD, DEL, CHECK, STATUS, GC, VERSION",
        )
    log.info(
        "cni",
        command=command,
        network=conf.name,
        container=req.container_id,
        ifname=req.ifname,
        duration_ms=round((time.perf_counter() - t0) * 1000, 2),
    )
    return {"result": result}


def _env(req: ops.Cni) -> tuple[str, str, str]:
    C.check_attachment_env(req.container_id, req.ifname, req.netns or "")
    assert req.container_id is not None and req.ifname is not None
    if not req.netns:
        raise C.cni_error(BadRequest, C.INVALID_ENVIRONMENT, "CNI_NETNS is required here")
    return req.container_id, req.ifname, req.netns


def _owned(s: DesiredState, key: str) -> list[Forward]:
    found = [s.get(k) for k in sorted(s.lookup("needs", key))]
    return [f for f in found if isinstance(f, Forward) and f.owner == key]


def remove_attachment(s: DesiredState, att: Attachment) -> None:
    """Its forwards first (they need it), then the attachment: its lease goes with it."""
    for fwd in _owned(s, att.key):
        s.forget(fwd.key)
    s.remove(att.key, att.describe())


def _forwards(att: Attachment, mappings: tuple[C.PortMapping, ...]) -> list[Forward]:
    out = []
    for m in mappings:
        made = [
            Forward(m.proto, m.host_port, a.ip, m.container_port, 1, m.host_ip, owner=att.key)
            for a in att.addresses
            if a.version in m.families
        ]
        if not made:
            raise C.bad_config(
                f"port mapping {m.host_port}/{m.proto}: the container has no IPv"
                f"{m.families[0]} address to forward it to"
            )
        out.extend(made)
    return out


def _put_forwards(s: DesiredState, fwds: list[Forward]) -> None:
    kind = s.kinds.get("forward")
    assert isinstance(kind, ForwardKind)
    for fwd in fwds:
        kind.check(s, fwd)
        s.put(fwd)


def _bridge_for(s: DesiredState, conf: C.NetConf) -> tuple[Bridge, tuple[IPInterface, ...]]:
    """The network's bridge, made or updated in the desired state, and the gateways the
    configuration leases from (all of the bridge's when it names no subnet)."""
    assert conf.bridge is not None
    gateways = tuple(sub.gateway for sub in conf.subnets)
    br = s.get(bridge_key(conf.bridge))
    if br is None:
        if not gateways:
            raise C.bad_config(
                f"bridge {conf.bridge} is not netagent's and the configuration gives no "
                "subnet to make it with: give subnet (and gateway)"
            )
        new = Bridge(conf.bridge, gateways, masquerade=conf.ip_masq)
        s.put(new)
        return new, gateways
    assert isinstance(br, Bridge)
    for gw in gateways:
        if gw not in br.addresses:
            have = ", ".join(map(str, br.addresses)) or "no address"
            raise C.cni_error(
                Conflict,
                C.INVALID_CONFIG,
                f"bridge {br.name} is netagent's with {have}, but network {conf.name} "
                f"says {gw}: make the configuration match the bridge, or use another bridge",
            )
    if conf.ip_masq and not br.masquerade:
        br = dataclasses.replace(br, masquerade=True)  # never turned off by an ADD
        s.put(br)
    if not gateways:
        if not br.addresses:
            raise C.bad_config(f"bridge {br.name} has no address: give subnet")
        gateways = br.addresses
    return br, gateways


def _addresses(
    s: DesiredState,
    br: Bridge,
    gateways: tuple[IPInterface, ...],
    wanted: tuple[str, ...],
    key: str,
) -> tuple[IPInterface, ...]:
    """The requested addresses (in the bridge's subnets; a version not asked for is
    leased), else the lowest free address of each subnet."""
    chosen: dict[int, IPInterface] = {}
    for text in wanted:
        ip_text, _, prefix = text.partition("/")
        try:
            ip = ipaddress.ip_address(ip_text)
        except ValueError:
            raise C.cni_error(
                InvalidAddress, C.INVALID_CONFIG, f"requested IP {text!r} is not an address"
            ) from None
        gw = next((g for g in gateways if g.version == ip.version), None)
        if gw is None:
            raise C.cni_error(
                InvalidAddress,
                C.INVALID_CONFIG,
                f"requested IP {text} has no IPv{ip.version} subnet on {br.name}",
            )
        if prefix and prefix != str(gw.network.prefixlen):
            raise C.cni_error(
                InvalidAddress,
                C.INVALID_CONFIG,
                f"requested IP {text}: {br.name}'s subnet is {gw.network}",
            )
        addr = ipaddress.ip_interface(f"{ip}/{gw.network.prefixlen}")
        try:
            check_in_subnet(addr, br)
        except InvalidAddress as exc:
            raise C.cni_error(InvalidAddress, C.INVALID_CONFIG, exc.message) from None
        if ip.version in chosen:
            raise C.bad_config(f"requested IPs give two IPv{ip.version} addresses")
        users = s.lookup("segment-ip", (br.key, ip)) - {key}
        if users:
            raise AddressInUse(
                f"requested IP {ip} is already used on {br.name} by {min(users)}",
                conflicts_with=min(users),
            )
        chosen[ip.version] = addr
    for gw in gateways:
        if gw.version not in chosen:
            chosen[gw.version] = free_address(s, br.key, gw)
    return tuple(chosen[v] for v in sorted(chosen))


def _replaceable(service: Service, existing: Attachment, network: str) -> bool:
    """An attachment of this key that can be replaced by a new ADD: the same network's,
    whose namespace is gone or replaced (its DEL was lost)."""
    return existing.network == network and (
        existing.bridge is None or namespace_problem(service.ctx.net, existing) is not None
    )


async def cni_add(service: Service, conf: C.NetConf, req: ops.Cni) -> dict[str, Any]:
    cid, ifname, netns = _env(req)
    net = service.ctx.net
    ident = net.ns_identity(netns)
    if ident is None:
        raise C.cni_error(
            NotFound, C.INVALID_ENVIRONMENT, f"CNI_NETNS {netns} is not a network namespace"
        )
    cni_args = C.parse_cni_args(req.args)
    key = attachment_key(cid, ifname)
    now = time.time()
    made: list[Attachment] = []

    def build(s: DesiredState, reuse: Attachment | None) -> Attachment:
        if conf.chained:
            if conf.prev_result is None:
                raise C.bad_config(
                    "no bridge and no subnet: chained, netagent comes after a plugin that "
                    "made the interface, but there is no prevResult"
                )
            addresses, host_bridge = C.prev_addresses(conf, netns)
            if conf.port_mappings and not addresses:
                raise C.bad_config("prevResult holds no address of the container to forward to")
            return Attachment(
                cid,
                ifname,
                netns,
                ident,
                conf.name,
                addresses=addresses,
                host_bridge=host_bridge,
                created=now,
            )
        br, gateways = _bridge_for(s, conf)
        wanted = C.requested_ips(conf, cni_args)
        if reuse is not None and not wanted and reuse.bridge == br.name:
            addresses = reuse.addresses  # the lease the repeated ADD holds
        else:
            addresses = _addresses(s, br, gateways, wanted, key)
        host = s.pick_name(None, f"veth{short_hash(key, 8)}", key + "#host", key)
        mac = C.requested_mac(conf, cni_args) or C.derived_mac(key)
        return Attachment(
            cid,
            ifname,
            netns,
            ident,
            conf.name,
            br.name,
            addresses,
            host,
            conf.mtu,
            mac,
            created=now,
        )

    def change(s: DesiredState) -> None:
        made.clear()
        existing = s.get(key)
        if existing is not None and not isinstance(existing, Attachment):
            raise Conflict(f"{key} is taken by {existing.describe()}")
        if existing is not None:
            again = build(s, existing)
            if again.same_place(existing) and set(_owned(s, key)) == set(
                _forwards(again, conf.port_mappings)
            ):
                made.append(existing)
                return  # the runtime repeating an ADD: nothing changes
            if not _replaceable(service, existing, conf.name):
                raise C.cni_error(
                    Conflict,
                    100,
                    f"container {cid} is attached as {ifname} already "
                    f"({existing.describe()}); the runtime must DEL it first",
                )
            remove_attachment(s, existing)
        att = build(s, None)
        s.put(att)
        _put_forwards(s, _forwards(att, conf.port_mappings))
        made.append(att)

    try:
        await service.mutate(change)
    except BackendFailed as exc:
        if "errors" in exc.details and made:
            await _undo(service, made[0])
        raise
    att = made[0]
    service.bus.publish("cni", f"ADD {key} ({conf.name}): {att.describe()}", key=key)
    if conf.chained:
        return C.chained_result(conf)
    br = service.state.get(bridge_key(att.bridge or ""))
    assert isinstance(br, Bridge) and att.host_ifname is not None
    # the host's MACs as the kernel announced them (the link cache), the container's as
    # netagent chose it: no lookups on the way back (each costs a netlink round trip)
    macs: dict[str, str | None] = {att.ifname: att.mac}
    for name in (br.name, att.host_ifname):
        cached = service.ctx.links.named(name)
        link = cached if cached is not None and cached.mac else await net.link(None, name)
        macs[name] = link.mac if link is not None else None
    return C.add_result(conf, att, br, macs)


async def _undo(service: Service, att: Attachment) -> None:
    """An ADD recorded but not realized (the kernel refused): leave nothing behind."""

    def change(s: DesiredState) -> None:
        current = s.get(att.key)
        if isinstance(current, Attachment) and current.created == att.created:
            remove_attachment(s, current)

    try:
        await service.mutate(change)
    except NetagentError as exc:
        log.warning("undoing a failed ADD failed; the reconciler keeps at it", error=exc.message)


async def cni_del(
    service: Service,
    conf: C.NetConf,
    container_id: str | None,
    ifname: str | None,
    queued_at: float | None = None,
) -> None:
    C.check_attachment_env(container_id, ifname)
    assert container_id is not None and ifname is not None
    key = attachment_key(container_id, ifname)

    def change(s: DesiredState) -> None:
        att = s.get(key)
        if not isinstance(att, Attachment) or att.network != conf.name:
            return  # gone already (or another network's): a DEL succeeds
        if queued_at is not None and att.created > queued_at:
            return  # queued for an older attachment of this key
        remove_attachment(s, att)

    try:
        reply = await service.mutate(change)
    except BackendFailed as exc:
        if "errors" not in exc.details:
            raise  # not recorded: the runtime tries again
        # recorded; what the kernel still holds is removed by the reconciler's retries
        log.warning("cni DEL recorded, not all removed yet", key=key, error=exc.message)
        return
    if reply.get("changed"):
        service.bus.publish("cni", f"DEL {key} ({conf.name})", key=key)


async def cni_check(service: Service, conf: C.NetConf, req: ops.Cni) -> None:
    cid, ifname, netns = _env(req)
    key = attachment_key(cid, ifname)
    att = service.state.get(key)
    if not isinstance(att, Attachment) or att.network != conf.name:
        raise C.cni_error(
            NotFound,
            C.UNKNOWN_CONTAINER,
            f"netagent holds no attachment {cid} {ifname} in network {conf.name}",
        )
    problems: list[str] = []
    if att.netns != netns:
        problems.append(f"it was made in {att.netns}, not {netns}")
    kind = service.kinds.of(att)
    problems += await kind.inspect(service.ctx, att)
    rec = service.reconciler
    for k in (key, *(f.key for f in _owned(service.state, key))):
        st = rec.status.get(k)
        if st is not None and st.state == FAILING:
            problems.append(f"{k}: {st.error}")
    if _owned(service.state, key):
        fw = rec.status.get(FIREWALL)
        if fw is None or fw.state != IN_PLACE:
            problems.append("the firewall (its port mappings) is not in place")
    if conf.prev_result is not None:
        expected, _bridge = C.prev_addresses(conf, netns)
        if set(expected) != set(att.addresses):
            problems.append(
                f"prevResult says {', '.join(map(str, expected)) or 'no address'}, "
                f"netagent holds {', '.join(map(str, att.addresses)) or 'none'}"
            )
    if problems:
        raise C.cni_error(
            BackendFailed,
            C.NOT_IN_PLACE,
            f"{key} is not as it was made: {'; '.join(problems)}",
        )


def cni_status(service: Service, conf: C.NetConf) -> None:
    rec = service.reconciler
    keys = [FIREWALL] + ([bridge_key(conf.bridge)] if conf.bridge else [])
    for k in keys:
        st = rec.status.get(k)
        if st is not None and st.state == FAILING:
            raise C.cni_error(
                BackendFailed, C.NOT_AVAILABLE, f"netagent cannot serve ADD: {k}: {st.error}"
            )


async def cni_gc(service: Service, conf: C.NetConf) -> dict[str, int]:
    raw = conf.raw.get("cni.dev/valid-attachments", conf.raw.get("cni.dev/attachments"))
    if raw is None:
        return {"removed": 0}  # no list: nothing can be told stale
    if not isinstance(raw, list):
        raise C.bad_config("cni.dev/valid-attachments must be a list")
    valid = set()
    for n, entry in enumerate(raw):
        if not isinstance(entry, Mapping) or not all(
            isinstance(entry.get(k), str) for k in ("containerID", "ifname")
        ):
            raise C.bad_config(f"cni.dev/valid-attachments[{n}] needs containerID and ifname")
        valid.add(attachment_key(entry["containerID"], entry["ifname"]))
    removed: list[str] = []

    def change(s: DesiredState) -> None:
        removed.clear()
        for key in sorted(s.lookup("att-network", conf.name)):
            att = s.get(key)
            if isinstance(att, Attachment) and key not in valid:
                remove_attachment(s, att)
                removed.append(key)

    try:
        await service.mutate(change)
    except BackendFailed as exc:
        if "errors" not in exc.details:
            raise
    if removed:
        service.bus.publish("cni", f"GC {conf.name}: removed {', '.join(removed)}")
    return {"removed": len(removed)}


# ---- the DEL queue ---------------------------------------------------------------------
async def replay_queue(service: Service, directory: Path) -> None:
    """Carry out the DELs the plugin queued while the daemon was down (or did not
    answer): at start, then every :data:`QUEUE_POLL` seconds, so a DEL queued in the
    moment the daemon came back waits no longer. Each is a CNI DEL with the time it
    was queued: an attachment made again after that is left alone."""
    from netagent.cni import queue

    while True:
        try:
            for path in queue.pending(str(directory)):
                await _replay_one(service, queue, path)
        except Exception:
            log.exception("replaying queued CNI DELs failed; trying again")
        await anyio.sleep(QUEUE_POLL)


async def _replay_one(service: Service, queue: Any, path: str) -> None:
    record = queue.load(path)
    if record is None:
        queue.reject(path, "not a queued DEL")
        return
    try:
        conf = C.parse_config(record["config"])
        await cni_del(
            service, conf, record.get("containerID"), record.get("ifname"), record["queued_at"]
        )
    except NetagentError as exc:
        if exc.details.get("cni_code") is not None:
            log.warning(
                "a queued CNI DEL is not valid; set aside", file=str(path), error=exc.message
            )
            queue.reject(path, exc.message)
        else:
            log.warning("a queued CNI DEL failed; tried again later", error=exc.message)
        return
    queue.done(path)
    log.info("queued CNI DEL carried out", file=path, container=record.get("containerID"))
