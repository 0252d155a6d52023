"""``netagent ctl show --graph``: a picture of the topology, drawn from ``show``'s answer.

The layout is the seed's picture (``docs/graph.md``): the host as one box; inside it, the
namespaces in a row at the top, each with its interfaces and addresses; below them the
bridges, each a wide bar with its gateway addresses, the host ends of the veth pairs on
it; interfaces attach rules took beside their bridge; at the bottom the forwards, host
ports with an arrow to the namespace interface that holds their destination. Direct
wires run between namespaces. Whatever ``show`` does not report in place is drawn red,
dashed and thick, its state and reason under its name, and the picture's caption lists
it: one sees it at once.

DOT is written here (standard library only); SVG and PNG are Graphviz's ``dot``'s work,
run with a time limit.
"""

from __future__ import annotations

import os
import subprocess
import sys

#: not typing.TYPE_CHECKING: importing typing costs ~1-3 ms (mypy reads this name alike)
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable
    from typing import Any

FORMATS = ("dot", "svg", "png")
#: seconds Graphviz may take to lay out and render
DOT_TIMEOUT = 30.0
FONT = "DejaVu Sans"
BAD = "#c0392b"
#: namespace fills: a namespace named after a colour gets it (the seed's red and blue)
NAMED = {
    "red": "#f9d6d5",
    "blue": "#d6e4f9",
    "green": "#d9f2d9",
    "orange": "#fde3c8",
    "yellow": "#fbf3c4",
    "purple": "#e8dcf5",
    "pink": "#f9dcea",
    "gray": "#e4e4e4",
    "grey": "#e4e4e4",
}
PALETTE = ("#e3ecf7", "#e6f4e6", "#f7ece0", "#efe6f5", "#e0f2f1", "#f5f5dc", "#f3e5e5")


def esc(text: object) -> str:
    """Text inside an HTML-like DOT label."""
    return (
        str(text)
        .replace("&", "&amp;")
        .replace("<", "&lt;")
        .replace(">", "&gt;")
        .replace('"', "&quot;")
    )


def quote(ident: str) -> str:
    return '"' + ident.replace("\\", "\\\\").replace('"', '\\"') + '"'


def attrs(**kw: object) -> str:
    parts = []
    for k, v in kw.items():
        if v is None:
            continue
        text = str(v)
        parts.append(f"{k}={text}" if text.startswith("<") else f"{k}={quote(text)}")
    return "[" + ", ".join(parts) + "]" if parts else ""


class Part:
    """What ``show`` says of one intent: in place or not, and why."""

    def __init__(self, item: dict[str, Any]) -> None:
        self.key = str(item.get("key", "?"))
        self.ok = bool(item.get("in_place"))
        self.state = str(item.get("state") or ("in place" if self.ok else "pending"))
        # the error first: "requested" or "an event" says less than what failed
        reasons = [str(item["error"])] if item.get("error") else []
        reasons += [str(m) for m in item.get("missing") or []]
        self.why = reasons[0] if reasons else ""

    def note(self) -> str:
        """The red line under a part's name, or nothing."""
        if self.ok:
            return ""
        why = self.why if len(self.why) <= 60 else self.why[:57] + "..."
        text = f"✗ {self.state}" + (f": {why}" if why else "")
        return f'<br/><font color="{BAD}" point-size="9">{esc(text)}</font>'

    def style(self, base: str = "") -> dict[str, object]:
        """Node attributes: red, dashed, thick when not in place."""
        styles = [s for s in base.split(",") if s]
        if self.ok:
            return {"style": ",".join(styles) or None}
        return {"style": ",".join([*styles, "dashed"]), "color": BAD, "penwidth": "2.5"}

    def edge(self) -> dict[str, object]:
        if self.ok:
            return {}
        return {"color": BAD, "style": "dashed", "penwidth": "2.5", "fontcolor": BAD}


def _label(title: str, *lines: str, note: str = "", bold: bool = True) -> str:
    head = f"<b>{esc(title)}</b>" if bold else esc(title)
    body = "".join(f'<br/><font point-size="9">{esc(line)}</font>' for line in lines if line)
    return f"<{head}{body}{note}>"


class Picture:
    """The DOT text of one ``show`` answer."""

    def __init__(self, show: dict[str, Any]) -> None:
        self.items: list[dict[str, Any]] = list(show.get("intents") or [])
        self.firewall: dict[str, Any] = dict(show.get("firewall") or {})
        self.orphans: list[dict[str, Any]] = list(show.get("orphans") or [])
        #: namespace -> (node id, dot line) of each interface in it
        self.ns_ifaces: dict[str, list[str]] = {}
        #: namespace -> its ``ns`` intent's part, when netagent made it
        self.ns_parts: dict[str, Part] = {}
        self.host: list[str] = []
        #: the cluster's other hosts, drawn outside this host's box
        self.peers: list[str] = []
        self.edges: list[str] = []
        #: address (no prefix) -> the interface node that holds it
        self.holders: dict[str, str] = {}
        self.bad: list[Part] = []
        self.counted = 0

    # ---- nodes ----------------------------------------------------------------------
    def _iface(self, ns: str, ifname: str, addresses: Iterable[str], part: Part) -> str:
        node = f"ns/{ns}/{ifname}"
        label = _label(ifname, *addresses, note=part.note())
        line = f"{quote(node)} {attrs(label=label, shape='box', **part.style('rounded,filled'))}"
        self.ns_ifaces.setdefault(ns, []).append(line)
        for a in addresses:
            self.holders.setdefault(str(a).split("/")[0], node)
        return node

    def _host_node(self, node: str, **kw: object) -> str:
        self.host.append(f"{quote(node)} {attrs(**kw)}")
        return node

    def _edge(self, a: str, b: str, part: Part | None = None, **kw: object) -> None:
        """An edge; a part not in place overrides its colour and style."""
        if part is not None:
            kw.update(part.edge())
        self.edges.append(f"{quote(a)} -> {quote(b)} {attrs(**kw)}")

    # ---- kinds ----------------------------------------------------------------------
    def _bridge(self, i: dict[str, Any], part: Part) -> None:
        extra = ["bridge" + (", masquerade out" if i.get("masquerade") else "")]
        self._host_node(
            f"br/{i['name']}",
            label=_label(i["name"], *i.get("addresses") or [], *extra, note=part.note()),
            shape="box",
            width="3.2",
            fillcolor="#dbe6f4",
            **part.style("filled,bold"),
        )

    def _plug(self, i: dict[str, Any], part: Part) -> None:
        inside = self._iface(i["ns"], i["ifname"], i.get("addresses") or [], part)
        host_end = self._host_node(
            f"host/{i['host_ifname']}",
            label=_label(i["host_ifname"], bold=False),
            shape="box",
            fontsize="9",
            height="0.3",
            fillcolor="#f2f2f2",
            **part.style("filled"),
        )
        self._edge(inside, host_end, dir="none", penwidth="2", label=" veth", part=part)
        self._edge(host_end, f"br/{i['bridge']}", dir="none", part=part)

    def _wire(self, i: dict[str, Any], part: Part) -> None:
        a = self._iface(i["ns_a"], i["ifname_a"], i.get("addresses_a") or [], part)
        b = self._iface(i["ns_b"], i["ifname_b"], i.get("addresses_b") or [], part)
        self._edge(
            a, b, dir="none", penwidth="2", label=" wire (veth)", constraint="false", part=part
        )

    def _attach(self, i: dict[str, Any], item: dict[str, Any], part: Part) -> None:
        bridge = f"br/{i['bridge']}"
        taken = [str(n) for n in item.get("attached") or []]
        for name in taken:
            node = self._host_node(
                f"host/{name}",
                label=_label(name, "attached", bold=False),
                shape="box",
                fillcolor="#eef5e9",
                **part.style("filled"),
            )
            self._edge(node, bridge, dir="none", label=f" {i['pattern']}", part=part)
        if not taken:  # the rule itself, so one sees it waits for interfaces
            node = self._host_node(
                f"rule/{i['bridge']}/{i['pattern']}",
                label=_label(f"attach {i['pattern']}", "nothing matched yet", note=part.note()),
                shape="note",
                fontsize="9",
                **part.style(),
            )
            self._edge(node, bridge, dir="none", style="dotted", part=part)
        for left in item.get("left_alone") or []:
            name = str(left.get("ifname", "?"))
            node = self._host_node(
                f"host/{name}",
                label=_label(name, "left alone", str(left.get("why") or "")[:60], bold=False),
                shape="box",
                style="dotted",
                fontsize="9",
            )
            self._edge(node, bridge, dir="none", style="dotted", arrowhead="none")

    def _forward(self, i: dict[str, Any], part: Part) -> None:
        count = int(i.get("count") or 1)
        first = int(i["host_port"])
        ports = str(first) if count == 1 else f"{first}-{first + count - 1}"
        dport = int(i["dest_port"])
        dports = str(dport) if count == 1 else f"{dport}-{dport + count - 1}"
        dest_ip = str(i["dest_ip"])
        on = f"{i['host_ip']}:" if i.get("host_ip") else "any host address :"
        node = self._host_node(
            f"fwd/{part.key}",
            label=_label(f"{on}{ports}/{i['proto']}", "port forward", note=part.note()),
            shape="cds",
            margin="0.25,0.06",
            fillcolor="#fde8c8",
            **part.style("filled"),
        )
        target = self.holders.get(dest_ip)
        shown = f"[{dest_ip}]:{dports}" if ":" in dest_ip else f"{dest_ip}:{dports}"
        if target is None:  # a destination no namespace here holds
            target = f"dest/{dest_ip}"
            self.host.append(
                f"{quote(target)} "
                + attrs(label=_label(dest_ip, "not in a netagent namespace"), shape="ellipse")
            )
        # drawn from the destination so the port sits below the bridges (the seed's
        # picture), the arrow pointing up into the namespace
        self._edge(
            target,
            node,
            dir="back",
            minlen="3",
            color="#d35400",
            fontcolor="#a04000",
            label=f" DNAT → {shown}",
            part=part,
        )

    def _vxlan(self, i: dict[str, Any], part: Part) -> None:
        """The host's VXLAN device, on the cluster bridge's side of the picture."""
        self._host_node(
            f"vxlan/{i['name']}",
            label=_label(
                i["name"],
                f"VXLAN {i['vni']}, udp/{i['port']}",
                f"from {i['local']}, subnet {i['subnet']}",
                note=part.note(),
            ),
            shape="box",
            fillcolor="#e0f2f1",
            **part.style("filled"),
        )

    def _peer(self, i: dict[str, Any], part: Part) -> None:
        """Another host of the cluster: outside this host's box, reached through the
        VXLAN device (red and dashed while its route, neighbour or FDB entry is not in
        place)."""
        node = f"peer/{i['subnet']}"
        self.peers.append(
            f"{quote(node)} "
            + attrs(
                label=_label(
                    f"host {i.get('host') or '?'}",
                    f"subnet {i['subnet']}",
                    f"underlay {i['underlay']}",
                    note=part.note(),
                ),
                shape="box3d",
                fillcolor="#f4f6f7",
                **part.style("filled"),
            )
        )
        self._edge(
            f"vxlan/{i['device']}",
            node,
            dir="none",
            style="bold",
            label=f" to {i['underlay']}",
            part=part,
        )

    def _other(self, item: dict[str, Any], part: Part) -> None:
        self._host_node(
            part.key,
            label=_label(
                str(item.get("kind", "?")), str(item.get("describe", "")), note=part.note()
            ),
            shape="box",
            **part.style("rounded"),
        )

    # ---- the whole ------------------------------------------------------------------
    def dot(self) -> str:
        order = {
            "ns": 0,
            "bridge": 1,
            "vxlan": 1,
            "attach": 2,
            "plug": 3,
            "wire": 4,
            "peer": 6,
            "forward": 9,
        }
        items = sorted(self.items, key=lambda it: order.get(str(it.get("kind")), 5))
        for item in items:
            part = Part(item)
            self.counted += 1
            if not part.ok:
                self.bad.append(part)
            intent = item.get("intent") or {}
            kind = item.get("kind")
            try:
                if kind == "ns":
                    self.ns_parts[str(intent["name"])] = part
                    self.ns_ifaces.setdefault(str(intent["name"]), [])
                elif kind == "bridge":
                    self._bridge(intent, part)
                elif kind == "plug":
                    self._plug(intent, part)
                elif kind == "wire":
                    self._wire(intent, part)
                elif kind == "attach":
                    self._attach(intent, item, part)
                elif kind == "forward":
                    self._forward(intent, part)
                elif kind == "vxlan":
                    self._vxlan(intent, part)
                elif kind == "peer":
                    self._peer(intent, part)
                else:
                    self._other(item, part)
            except (KeyError, ValueError):  # a shape this CLI does not know
                self._other(item, part)
        for n, orphan in enumerate(self.orphans):
            self._host_node(
                f"orphan/{n}",
                label=_label("orphan", str(orphan.get("describe", "")), "purge --orphans"),
                shape="box",
                style="dashed",
                color="#7f8c8d",
                fontcolor="#7f8c8d",
            )
        return "\n".join(self._lines()) + "\n"

    def _namespaces(self) -> list[str]:
        out = []
        for n, (ns, ifaces) in enumerate(sorted(self.ns_ifaces.items())):
            part = self.ns_parts.get(ns)
            fill = NAMED.get(ns.lower(), PALETTE[n % len(PALETTE)])
            owner = "" if part is not None else "not netagent's"
            title = f"namespace {ns}"
            note = part.note() if part is not None else ""
            label = _label(title, owner, note=note)
            style = (
                part.style("rounded,filled") if part is not None else {"style": "rounded,filled"}
            )
            out.append(f"  subgraph {quote('cluster_ns_' + ns)} {{")
            out.append(f"    {'; '.join(f'{k}={quote(str(v))}' for k, v in style.items() if v)};")
            out.append(f'    label={label}; fillcolor="{fill}"; labeljust="l"; labelloc="t";')
            if not ifaces:  # an empty namespace still shows
                empty = attrs(label="(no interfaces)", shape="plain", fontsize="9")
                out.append(f"    {quote('ns/' + ns)} {empty}")
            out += [f"    {line}" for line in ifaces]
            out.append("  }")
        return out

    def _lines(self) -> list[str]:
        fw = self.firewall
        fw_line = ""
        if fw:
            state = "in place" if fw.get("in_place") else f"NOT in place ({fw.get('state', '?')})"
            fw_line = f"firewall: {fw.get('backend', '?')}, {state}"
        fw_note = "" if not fw or fw.get("in_place") else BAD
        return [
            "digraph netagent {",
            f'  graph [fontname="{FONT}", rankdir=TB, nodesep=0.35, ranksep=0.55, '
            f'bgcolor="white", labelloc=b, label={self._caption()}];',
            f'  node [fontname="{FONT}", fontsize=11, style=filled, fillcolor=white];',
            f'  edge [fontname="{FONT}", fontsize=9, arrowsize=0.7];',
            "  subgraph cluster_host {",
            f'    label={_label("host", fw_line)}; labeljust="l"; labelloc="t"; style="rounded"; '
            f'color="{fw_note or "#7f8c8d"}"; penwidth={2.5 if fw_note else 1.2};',
            *[f"  {line}" for line in self._namespaces()],
            *[f"    {line}" for line in self.host],
            "  }",
            *[f"  {line}" for line in self.peers],
            *[f"  {line}" for line in self.edges],
            "}",
        ]

    def _caption(self) -> str:
        if not self.counted:
            return "<nothing desired yet>"
        if not self.bad:
            return f"<{self.counted} parts, all in place>"
        shown = ", ".join(f"{p.key} ({p.state})" for p in self.bad[:6])
        more = f" and {len(self.bad) - 6} more" if len(self.bad) > 6 else ""
        return (
            f'<<font color="{BAD}"><b>{len(self.bad)} of {self.counted} parts not in place:'
            f"</b> {esc(shown)}{esc(more)}</font>>"
        )


def to_dot(show: dict[str, Any]) -> str:
    return Picture(show).dot()


def render(dot_text: str, fmt: str) -> bytes:
    """The picture in ``fmt``: DOT as is, SVG or PNG through Graphviz's ``dot``."""
    if fmt == "dot":
        return dot_text.encode()
    try:
        done = subprocess.run(
            ["dot", f"-T{fmt}"],
            input=dot_text.encode(),
            capture_output=True,
            timeout=DOT_TIMEOUT,
            check=False,
        )
    except FileNotFoundError:
        raise GraphError(
            f"Graphviz's dot is not installed, so no {fmt}: `apt-get install graphviz`, "
            "or use --format dot"
        ) from None
    except subprocess.TimeoutExpired:
        raise GraphError(f"dot did not finish within {DOT_TIMEOUT:g} s") from None
    if done.returncode != 0:
        raise GraphError(f"dot failed: {done.stderr.decode(errors='replace').strip()}")
    return done.stdout


class GraphError(Exception):
    pass


def choose_format(fmt: str | None, output: str | None) -> str:
    if fmt:
        return fmt
    suffix = os.path.splitext(output or "")[1].lower().lstrip(".")
    return suffix if suffix in FORMATS else "dot"


def show_graph(reply: dict[str, Any], local: dict[str, Any], as_json: bool) -> None:
    """Draw ``show``'s answer; write it to ``--output`` or standard output."""
    from .ctl import check, dumps_pretty, fail

    show = check(reply)
    output = local.get("output")
    fmt = choose_format(local.get("format"), output)
    picture = Picture(show)
    dot_text = picture.dot()
    if output is None and fmt != "dot" and (as_json or sys.stdout.isatty()):
        fail(f"a {fmt} picture is not for a terminal: give --output FILE", 2)
    try:
        data = render(dot_text, fmt)
    except GraphError as exc:
        fail(str(exc), 1)
    if output is not None:
        try:
            with open(output, "wb") as f:
                f.write(data)
        except OSError as exc:
            fail(f"cannot write {output}: {exc.strerror or exc}", 2)
    summary = {
        "format": fmt,
        "output": os.path.abspath(output) if output else None,
        "bytes": len(data),
        "parts": picture.counted,
        "not_in_place": [{"key": p.key, "state": p.state, "why": p.why} for p in picture.bad],
    }
    if as_json:
        if output is None:
            summary["dot"] = dot_text
        print(dumps_pretty({"ok": True, "result": summary}))
    elif output is None:
        sys.stdout.flush()
        sys.stdout.buffer.write(data)
    else:
        bad = f", {len(picture.bad)} not in place" if picture.bad else ", all in place"
        print(f"wrote {summary['output']} ({fmt}, {len(data)} bytes; {picture.counted} parts{bad})")
