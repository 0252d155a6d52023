"""Other tools' namespaces plugged by people: ``plug --netns PATH|--pid PID BRIDGE``
and ``unplug`` of the same (``ctl plug NS BRIDGE`` stays the ``plug`` kind's).

The same attachment kind as a container runtime's (``agent/kinds/attachment.py``), made
by hand: the namespace's identity is recorded (and, for ``--pid``, the process's start
time), the address is leased when none is given, the interface is the first free
``ethN`` when ``--ifname`` is left out, and netagent never takes the namespace:
``unplug`` removes only the veth.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from . import cniconf as C
from . import ops
from .cni import remove_attachment
from .errors import BadRequest, Conflict, InvalidAddress, NotFound
from .kinds.attachment import Attachment, attachment_key, process_start
from .kinds.leases import free_address
from .kinds.plug import check_in_subnet, require_bridge
from .values import short_hash

if TYPE_CHECKING:
    from .api import Service
    from .state import DesiredState

#: interface names tried for a person's plug without --ifname
FREE_IFNAMES = tuple(f"eth{n}" for n in range(16))


def _foreign(req: ops.PlugAdd | ops.PlugDel) -> tuple[str, int | None] | None:
    """(path, pid) when the request names another tool's namespace, else None."""
    given = [x for x in (req.ns, req.netns, req.pid) if x is not None]
    if len(given) != 1:
        raise BadRequest("give one of NS, --netns PATH or --pid PID, and BRIDGE")
    if req.pid is not None:
        return f"/proc/{req.pid}/ns/net", req.pid
    if req.netns is not None:
        return req.netns, None
    return None


async def _free_ifname(service: Service, path: str) -> str:
    taken = {lk.name for lk in await service.ctx.net.links(path)}
    for name in FREE_IFNAMES:
        if name not in taken and service.state.name_owner(path, name) is None:
            return name
    raise NotFound(f"no free name eth0-eth15 in {path}: give --ifname")


async def handle_plug(service: Service, req: ops.PlugAdd) -> Any:
    from .api import kind_change

    where = _foreign(req)
    if where is None:
        return await service.mutate(kind_change(service.kinds, req))
    path, pid = where
    net = service.ctx.net
    start = process_start(pid) if pid is not None else None
    ident = net.ns_identity(path)
    if (pid is not None and start is None) or ident is None:
        what = f"process {pid}" if pid is not None else f"namespace at {path}"
        raise NotFound(f"there is no {what}")
    existing = [
        a
        for k in sorted(service.state.lookup("att-netns", path))
        if isinstance(a := service.state.get(k), Attachment) and a.bridge == req.bridge
    ]
    ifname = req.ifname or (existing[0].ifname if existing else await _free_ifname(service, path))
    cid = f"pid-{pid}" if pid is not None else f"netns-{short_hash(path, 12)}"
    key = attachment_key(cid, ifname)

    def change(s: DesiredState) -> None:
        br = require_bridge(s, req.bridge)
        for addr in req.addresses:
            check_in_subnet(addr, br)
        old = s.get(key)
        if old is not None and not isinstance(old, Attachment):
            raise Conflict(f"{key} is taken by {old.describe()}")
        addresses = req.addresses or (
            old.addresses if old is not None and old.bridge == br.name else ()
        )
        if not addresses:
            addresses = tuple(free_address(s, br.key, gw) for gw in br.addresses)
            if not br.addresses:
                raise InvalidAddress(
                    f"bridge {br.name} has no address, so there is no subnet to lease "
                    "from; give --address"
                )
        host = s.pick_name(None, f"veth{short_hash(key, 8)}", key + "#host", key)
        att = Attachment(
            cid,
            ifname,
            path,
            ident,
            "",
            br.name,
            addresses,
            host,
            None,
            C.derived_mac(key),
            pid,
            start,
            created=time.time(),
        )
        if old is not None:
            if att.same_place(old):
                return
            raise Conflict(
                f"{path} is plugged into {old.bridge} already ({old.describe()}); "
                f"`unplug` it first to change it"
            )
        s.put(att)

    return await service.mutate(change)


async def handle_unplug(service: Service, req: ops.PlugDel) -> Any:
    from .api import kind_change

    where = _foreign(req)
    if where is None:
        return await service.mutate(kind_change(service.kinds, req))
    path, _pid = where

    def change(s: DesiredState) -> None:
        found = [
            a
            for k in sorted(s.lookup("att-netns", path))
            if isinstance(a := s.get(k), Attachment) and a.bridge == req.bridge
        ]
        if not found:
            raise NotFound(f"{path} is not plugged into {req.bridge}; `attachments` lists what is")
        for att in found:
            remove_attachment(s, att)

    return await service.mutate(change)
