"""What every ``netagent ctl`` command does: send one op, print the answer, exit.

Shared by the typer commands and the start-up fast path (``entry.py``), so both behave
exactly alike. Standard library only.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from typing import Any, NoReturn

from netagent.agent.errors import NetagentError

from .client import Client, Unreachable


def fail(message: str, status: int) -> NoReturn:
    print(f"netagent: {message}", file=sys.stderr)
    raise SystemExit(status)


def run_op(op: str, args: dict[str, Any], socket: str | None, as_json: bool) -> None:
    try:
        with Client(socket) as client:
            reply = client.raw(op, args)
    except Unreachable as exc:
        if as_json:
            print(
                json.dumps(
                    {"ok": False, "error": {"code": 0, "name": "unreachable", "message": str(exc)}}
                )
            )
        fail(str(exc), Unreachable.exit_status)
    except OSError as exc:
        fail(f"talking to the daemon failed: {exc}", Unreachable.exit_status)
    if as_json:
        print(json.dumps(reply, indent=2, sort_keys=True))
        if not reply.get("ok"):
            raise SystemExit(_exit_status(reply))
        _doctor_status(op, reply.get("result"))
        return
    if not reply.get("ok"):
        err = reply.get("error") or {}
        fail(
            f"{err.get('message', 'unknown error')} [{err.get('name')} {err.get('code')}]",
            _exit_status(reply),
        )
    render(op, reply.get("result"))
    _doctor_status(op, reply.get("result"))


def _doctor_status(op: str, result: Any) -> None:
    """``doctor`` exits 1 when it found a problem (0 only when nothing is wrong)."""
    if op == "doctor" and isinstance(result, dict) and result.get("problems"):
        raise SystemExit(1)


def _exit_status(reply: dict[str, Any]) -> int:
    from netagent.agent.errors import error_from_wire

    return error_from_wire(reply.get("error") or {}).exit_status


def apply_file(path: str, prune: bool, socket: str | None, as_json: bool) -> None:
    """``ctl apply FILE``: a JSON document ``{"intents": [...]}`` (or ``-``: stdin)."""
    try:
        text = sys.stdin.read() if path == "-" else open(path).read()  # noqa: SIM115
        doc = json.loads(text)
    except OSError as exc:
        fail(f"cannot read {path}: {exc.strerror}", 2)
    except ValueError as exc:
        fail(f"{path} is not valid JSON: {exc}", 2)
    intents = doc.get("intents") if isinstance(doc, dict) else doc
    if not isinstance(intents, list):
        fail(f'{path}: expected {{"intents": [...]}} or a list of intents', 2)
    run_op("apply", {"intents": intents, "prune": prune}, socket, as_json)


def stream_events(socket: str | None, as_json: bool) -> None:
    try:
        with Client(socket) as client:
            for event in client.events():
                if as_json:
                    print(json.dumps(event), flush=True)
                else:
                    ts = time.strftime("%H:%M:%S", time.localtime(event.get("ts", 0)))
                    ms = f"{event.get('ts', 0) % 1:.3f}"[1:]
                    print(
                        f"{ts}{ms} {event.get('type', '?'):<14} {event.get('message', '')}",
                        flush=True,
                    )
    except Unreachable as exc:
        fail(str(exc), Unreachable.exit_status)
    except NetagentError as exc:
        fail(exc.message, exc.exit_status)
    except KeyboardInterrupt:
        pass


# ---- rendering ----------------------------------------------------------------------
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
    for key, err in sorted((r.get("failing") or {}).items()):
        print(f"FAILING   {key}: {err}")
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
            ]
            for r in rows
        ],
        ["PROTO", "HOST IP", "HOST PORT", "DESTINATION", "PACKETS", "BYTES"],
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
    for o in r.get("orphans") or []:
        print(f"!!  orphan: {o['describe']} (`purge --orphans` removes it)")
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
    "attach.list": _rules,
    "links": _links,
    "neigh": _neigh,
    "routes": _routes,
    "show": _show,
    "doctor": _doctor,
    "explain": _explain,
}
