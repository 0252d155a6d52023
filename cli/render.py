"""How ``netagent ctl`` shows an answer: one renderer per op, tables, change lists.

Loaded only once a reply has arrived; standard library only, and nothing it imports that
the interpreter has not loaded already (``docs/cli.md``).
"""

from __future__ import annotations

import sys

#: not typing.TYPE_CHECKING: importing typing costs ~1-3 ms (mypy reads this name alike)
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any


def _table(rows: list[list[str]], header: list[str]) -> None:
    if not rows:
        return
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def render(op: str, result: Any) -> None:
    if isinstance(result, dict) and "changed" in result:
        _render_change(result)
        return
    fn = _RENDERERS.get(op)
    if fn is not None:
        fn(result)
    else:
        import json

        print(json.dumps(result, indent=2, sort_keys=True))


def _render_change(result: dict[str, Any]) -> None:
    if not result["changed"]:
        print("nothing changed: already as asked")
        return
    changes = result.get("changes", [])
    for change in changes:
        print(f"{change['action']}: {change['what']}")
    more = result.get("changes_total", len(changes)) - len(changes)
    if more > 0:
        print(f"... and {more} more changes")
    for key, actions in sorted((result.get("actions") or {}).items()):
        for a in actions:
            print(f"  {key}: {a}")
    for key, err in sorted((result.get("errors") or {}).items()):
        print(f"  {key}: FAILED: {err}")
    for warning in result.get("warnings") or ():
        print(f"netagent: warning: {warning}", file=sys.stderr)


def _status(r: dict[str, Any]) -> None:
    print(f"netagent {r['version']} (pid {r['pid']}), up {r['uptime_s']}s")
    print(f"socket    {r['socket']}")
    print(f"state     {r['state_dir']}")
    print(f"firewall  {r['firewall']}")
    print(f"desired   {r['summary']}")
    lp = r.get("last_pass") or {}
    if lp:
        print(
            f"last pass {lp.get('trigger')}: {lp.get('changed')} changes, "
            f"{lp.get('errors')} errors, {lp.get('ms')} ms"
        )
    cl = r.get("cluster")
    if cl:
        etcd = f"etcd {cl['etcd'].upper() if cl['etcd'] == 'unreachable' else cl['etcd']}"
        held = f"subnet {cl['subnet']}" if cl.get("subnet") else "no subnet yet"
        print(
            f"cluster   {etcd}, {held} on {cl['bridge']}, "
            f"{cl['peers_in_place']}/{cl['peers']} peers in place"
        )
        if cl.get("error"):
            print(f"          {cl['error']}")
    for key, err in sorted((r.get("failing") or {}).items()):
        print(f"FAILING   {key}: {err}")
    for key, why in sorted((r.get("stale") or {}).items()):
        print(f"STALE     {key}: {why}")
    for key, why in sorted((r.get("quarantined") or {}).items()):
        print(f"QUARANTINED {key}: {why} (`netagent ctl forget {key}` drops it)")
    for note in r.get("state_notes") or []:
        print(f"NOTE      {note}")
    _findings(r.get("findings"))


def _findings(f: dict[str, Any] | None) -> None:
    if not f or f.get("checked") is None:
        return
    print(f"doctor    {f['problems']} problems, {f['notes']} notes (`netagent ctl doctor`)")
    for line in f.get("lines") or ():
        print(f"          {line}")


def _ns_list(rows: list[dict[str, Any]]) -> None:
    if not rows:
        print("no namespaces")
    _table(
        [
            [
                r["name"],
                "netagent" if r["managed"] else "external",
                "present" if r["present"] else "MISSING",
            ]
            for r in rows
        ],
        ["NAME", "OWNER", "STATE"],
    )


def _bridge_list(rows: list[dict[str, Any]]) -> None:
    if not rows:
        print("no bridges")
    _table(
        [
            [
                r["name"],
                ",".join(r["addresses"]) or "-",
                "yes" if r["masquerade"] else "no",
                ",".join(r["plugs"]) or "-",
            ]
            for r in rows
        ],
        ["NAME", "ADDRESS", "MASQUERADE", "PLUGGED"],
    )


def _count(value: object) -> str:
    """A counter, short: 1234567 -> 1.2M; None (not counted) -> -."""
    if not isinstance(value, int):
        return "-"
    for unit, size in (("G", 10**9), ("M", 10**6), ("k", 10**3)):
        if value >= size:
            return f"{value / size:.1f}{unit}"
    return str(value)


def _forwards(rows: list[dict[str, Any]]) -> None:
    if not rows:
        print("no forwards")
    _table(
        [
            [
                r["proto"],
                r.get("host_ip") or "*",
                r["host_ports"],
                r["destination"],
                _count(r.get("packets")),
                _count(r.get("bytes")),
                r.get("owner") or "-",
            ]
            for r in rows
        ],
        ["PROTO", "HOST IP", "HOST PORT", "DESTINATION", "PACKETS", "BYTES", "OWNER"],
    )


def _attachments(rows: list[dict[str, Any]]) -> None:
    if not rows:
        print("no attachments")
    _table(
        [
            [
                r["container_id"],
                r["ifname"],
                r["netns"],
                r["network"] or "-",
                r["bridge"] or "(chained)",
                ",".join(r["addresses"]) or "-",
                str(len(r.get("forwards") or [])),
            ]
            for r in rows
        ],
        ["CONTAINER", "IFNAME", "NETNS", "NETWORK", "BRIDGE", "ADDRESSES", "PORTS"],
    )


def _rules(rows: list[dict[str, Any]]) -> None:
    if not rows:
        print("no attach rules")
    _table([[r["pattern"], r["bridge"]] for r in rows], ["PATTERN", "BRIDGE"])


def _links(rows: list[dict[str, Any]]) -> None:
    _table(
        [
            [
                str(r["index"]),
                r["name"],
                r["kind"] or "-",
                r["state"],
                r["master"] or "-",
                " ".join(r["addresses"]) or "-",
                r["owner"] or "-",
            ]
            for r in rows
        ],
        ["#", "NAME", "KIND", "STATE", "MASTER", "ADDRESSES", "NETAGENT"],
    )


def _neigh(rows: list[dict[str, Any]]) -> None:
    if not rows:
        print("no neighbours")
    _table(
        [[r["address"], r["lladdr"] or "(incomplete)", r["dev"], r["state"]] for r in rows],
        ["ADDRESS", "HWADDRESS", "IFACE", "STATE"],
    )


def _routes(rows: list[dict[str, Any]]) -> None:
    if not rows:
        print("no routes")
    _table(
        [
            [r["destination"], r["gateway"] or "-", r["dev"] or "-", r["source"] or "-"]
            for r in rows
        ],
        ["DESTINATION", "GATEWAY", "IFACE", "SOURCE"],
    )


def _peers(rows: list[dict[str, Any]]) -> None:
    if not rows:
        print("no peers")
    _table(
        [
            [
                r.get("host") or "-",
                r["subnet"],
                r.get("underlay") or "-",
                "-" if r.get("lease_age") is None else f"{r['lease_age']:.0f}s",
                "yes" if r["in_place"] else r.get("state", "no").upper(),
                r.get("error") or ("" if r.get("in_etcd", True) else "not in etcd (yet)"),
            ]
            for r in rows
        ],
        ["HOST", "SUBNET", "UNDERLAY", "LEASE AGE", "IN PLACE", "NOTE"],
    )


def _show(r: dict[str, Any]) -> None:
    if not r["intents"]:
        print("nothing desired yet")
    for item in r["intents"]:
        mark = "ok " if item["in_place"] else "!! "
        traffic = ""
        if item.get("packets") is not None:
            traffic = f"  [{_count(item['packets'])} pkts {_count(item.get('bytes'))}B]"
        print(f"{mark} {item['key']:<28} {item['describe']}{traffic}")
        for m in item["missing"]:
            print(f"      missing: {m}")
        if item.get("error"):
            print(f"      error: {item['error']}")
        for line in item.get("doctor") or ():
            print(f"      doctor: {line}")
        for line in item.get("warnings") or ():
            print(f"      warning: {line}")
        if item.get("attached"):
            print(f"      attached: {', '.join(item['attached'])}")
        for left in item.get("left_alone") or []:
            print(f"      left alone: {left['why']}")
    for o in r.get("orphans") or []:
        print(f"!!  orphan: {o['describe']} (`purge --orphans` removes it)")
    for q in r.get("quarantined") or []:
        print(f"!!  quarantined: {q['key']}: {q['reason']} (`forget {q['key']}` drops it)")
    fw = r["firewall"]
    state = "in place" if fw["in_place"] else "DRIFTED"
    print(f"firewall ({fw['backend']}): {state}")
    for p in fw["pending"][:20]:
        print(f"      pending: {p}")
    if fw.get("error"):
        print(f"      error: {fw['error']}")
    f = r.get("findings")
    if f and f.get("checked") is not None:
        print(f"doctor: {f['problems']} problems, {f['notes']} notes (`netagent ctl doctor`)")


def _doctor(r: dict[str, Any]) -> None:
    for f in r["findings"]:
        print(f["line"])
    if not r["problems"]:
        print("ok: nothing found that breaks netagent's bridges or forwards")
    print(
        f"{r['problems']} problems, {r['notes']} notes; checked: {', '.join(r['checked'])}"
        + (f" (read in {r['read_ms']} ms)" if r.get("read_ms") is not None else "")
    )


def _explain(r: dict[str, Any]) -> None:
    for n, s in enumerate(r["steps"], 1):
        print(f"{n:>2}. {s['where']:<12} {s['what']}")
    print(f"=> {r['verdict']}" + (f" ({r['forward']})" if r.get("forward") else ""))
    if r.get("trace"):
        print("trace:")
        for line in r["trace"]:
            print(f"    {line}")


_RENDERERS: dict[str, Callable[[Any], None]] = {
    "status": _status,
    "ns.list": _ns_list,
    "bridge.list": _bridge_list,
    "forward.list": _forwards,
    "attachment.list": _attachments,
    "attach.list": _rules,
    "links": _links,
    "neigh": _neigh,
    "routes": _routes,
    "show": _show,
    "peers": _peers,
    "doctor": _doctor,
    "explain": _explain,
}
