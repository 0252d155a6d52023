"""``show --graph``: the DOT drawn from a ``show`` answer, and what Graphviz makes of it
(no root; the real daemon's answer is drawn in ``tests/e2e/test_graph.py``)."""

from __future__ import annotations

import re
from typing import Any

import pytest

from netagent.cli import graph


def item(key: str, kind: str, intent: dict[str, Any], state: str = "in place", **more: Any) -> Any:
    return {
        "key": key,
        "kind": kind,
        "describe": key,
        "in_place": state == "in place",
        "state": state,
        "missing": more.pop("missing", []),
        "error": more.pop("error", None),
        "intent": {"kind": kind, **intent},
        **more,
    }


def seed(**states: str) -> dict[str, Any]:
    """The seed's topology as ``show`` answers it; ``states``: key -> state."""
    parts = [
        item("ns/blue", "ns", {"name": "blue"}),
        item("ns/red", "ns", {"name": "red"}),
        item(
            "br/v-net-0",
            "bridge",
            {"name": "v-net-0", "addresses": ["192.168.15.5/24"], "masquerade": False},
        ),
        item(
            "plug/blue/v-net-0",
            "plug",
            {
                "ns": "blue",
                "bridge": "v-net-0",
                "addresses": ["192.168.15.2/24"],
                "ifname": "veth-blue",
                "host_ifname": "veth-blue-br",
            },
        ),
        item(
            "plug/red/v-net-0",
            "plug",
            {
                "ns": "red",
                "bridge": "v-net-0",
                "addresses": ["192.168.15.1/24"],
                "ifname": "veth-red",
                "host_ifname": "veth-red-br",
            },
        ),
        item(
            "fwd/tcp/80",
            "forward",
            {"proto": "tcp", "host_port": 80, "dest_ip": "192.168.15.2", "dest_port": 80},
        ),
    ]
    for p in parts:
        state = states.get(p["key"])
        if state is not None:
            p.update(in_place=False, state=state, missing=[f"why {p['key']}"])
    fw = {"backend": "nftables", "in_place": True, "state": "in place", "pending": []}
    return {"intents": parts, "firewall": fw, "orphans": []}


def edges(dot: str) -> set[tuple[str, str]]:
    return set(re.findall(r'^\s*"([^"]+)" -> "([^"]+)"', dot, re.M))


def test_the_seed_is_drawn_as_its_picture() -> None:
    dot = graph.to_dot(seed())
    assert dot.startswith("digraph netagent {") and dot.rstrip().endswith("}")
    assert "subgraph cluster_host" in dot
    for ns in ("red", "blue"):
        assert f'subgraph "cluster_ns_{ns}"' in dot
    # namespace end - host end - bridge, for each plug
    assert {
        ("ns/red/veth-red", "host/veth-red-br"),
        ("host/veth-red-br", "br/v-net-0"),
        ("ns/blue/veth-blue", "host/veth-blue-br"),
        ("host/veth-blue-br", "br/v-net-0"),
    } <= edges(dot)
    # the forward points into the namespace interface holding its destination, from
    # below the bridge
    assert ("ns/blue/veth-blue", "fwd/fwd/tcp/80") in edges(dot)
    assert "DNAT → 192.168.15.2:80" in dot and 'minlen="3"' in dot
    assert "192.168.15.5/24" in dot  # the gateway on its bridge
    assert "6 parts, all in place" in dot
    assert graph.BAD not in dot


def test_what_is_not_in_place_is_red_dashed_and_named() -> None:
    dot = graph.to_dot(seed(**{"plug/blue/v-net-0": "drifted", "fwd/tcp/80": "failing"}))
    lines = [ln for ln in dot.splitlines() if graph.BAD in ln]
    # the plug's interface, its host end, both of its edges, the forward and its edge
    assert any(ln.strip().startswith('"ns/blue/veth-blue" [') for ln in lines)
    assert any(ln.strip().startswith('"host/veth-blue-br" [') for ln in lines)
    assert any('"fwd/fwd/tcp/80" [' in ln for ln in lines)
    assert sum(" -> " in ln for ln in lines) == 3
    assert all("dashed" in ln for ln in lines if ln.strip().startswith('"'))
    assert "✗ drifted: why plug/blue/v-net-0" in dot
    assert "2 of 6 parts not in place:" in dot
    assert "plug/blue/v-net-0 (drifted), fwd/tcp/80 (failing)" in dot
    # what is in place is not red
    assert not any(ln.strip().startswith('"ns/red/veth-red" [') for ln in lines)


def test_a_namespace_not_in_place_and_the_firewall_not_in_place() -> None:
    show = seed(**{"ns/red": "failing"})
    show["firewall"].update(in_place=False, state="drifted")
    dot = graph.to_dot(show)
    cluster = dot[dot.index('subgraph "cluster_ns_red"') :].split("}", 1)[0]
    assert graph.BAD in cluster and "dashed" in cluster
    assert "firewall: nftables, NOT in place (drifted)" in dot
    assert f'color="{graph.BAD}"; penwidth=2.5' in dot  # the host's frame


def test_wires_attached_interfaces_ranges_foreign_destinations_orphans() -> None:
    show = seed()
    show["intents"] += [
        item("ns/green", "ns", {"name": "green"}),
        item(
            "wire/green/red",
            "wire",
            {
                "ns_a": "red",
                "addresses_a": ["10.9.0.1/30"],
                "ns_b": "green",
                "addresses_b": ["10.9.0.2/30"],
                "ifname_a": "veth-green",
                "ifname_b": "veth-red",
            },
        ),
        item(
            "rule/v-net-0/tap*",
            "attach",
            {"pattern": "tap*", "bridge": "v-net-0"},
            attached=["tap0"],
            left_alone=[{"ifname": "tap9", "why": "tap9 is on br-other"}],
        ),
        item(
            "fwd/udp/8000-8009",
            "forward",
            {
                "proto": "udp",
                "host_port": 8000,
                "count": 10,
                "dest_ip": "198.51.100.7",
                "dest_port": 9000,
                "host_ip": "203.0.113.1",
            },
        ),
        item("peer/x", "peer", {"name": "x"}, describe="a kind this CLI does not know"),
    ]
    show["orphans"] = [{"describe": "veth veth-old-br on the host"}]
    dot = graph.to_dot(show)
    assert ("ns/red/veth-green", "ns/green/veth-red") in edges(dot)
    assert ("host/tap0", "br/v-net-0") in edges(dot) and ("host/tap9", "br/v-net-0") in edges(dot)
    assert "left alone" in dot and "tap9 is on br-other" in dot
    assert "203.0.113.1:8000-8009/udp" in dot
    assert ("dest/198.51.100.7", "fwd/fwd/udp/8000-8009") in edges(dot)
    assert "DNAT → 198.51.100.7:9000-9009" in dot
    assert '"peer/x" [' in dot and "a kind this CLI does not know" in dot
    assert "veth veth-old-br on the host" in dot and "purge --orphans" in dot


def test_names_that_mean_something_to_dot_are_quoted() -> None:
    show = seed()
    show["intents"].append(
        item(
            'rule/v-net-0/a"<b>&\\',
            "attach",
            {"pattern": 'a"<b>&\\', "bridge": "v-net-0"},
            attached=[],
            left_alone=[],
        )
    )
    dot = graph.to_dot(show)
    assert '"rule/v-net-0/a\\"<b>&\\\\"' in dot  # the node id
    assert "attach a&quot;&lt;b&gt;&amp;\\" in dot  # the label
    assert graph.render(dot, "svg").startswith(b"<?xml")


def test_nothing_desired_is_a_picture_too() -> None:
    empty: dict[str, Any] = {"intents": [], "firewall": {}, "orphans": []}
    assert "nothing desired yet" in graph.to_dot(empty)


@pytest.mark.parametrize(("fmt", "magic"), [("svg", b"<?xml"), ("png", b"\x89PNG\r\n\x1a\n")])
def test_graphviz_renders_it(fmt: str, magic: bytes) -> None:
    data = graph.render(graph.to_dot(seed(**{"ns/red": "failing"})), fmt)
    assert data.startswith(magic)
    if fmt == "svg":
        text = data.decode()
        assert "namespace red" in text and "v&#45;net&#45;0" in text and graph.BAD in text


def test_the_format_follows_the_output_file() -> None:
    assert graph.choose_format(None, "t.PNG") == "png"
    assert graph.choose_format(None, "t.svg") == "svg"
    assert graph.choose_format(None, "t.gv") == "dot"
    assert graph.choose_format(None, None) == "dot"
    assert graph.choose_format("svg", "t.png") == "svg"


def test_without_graphviz_the_message_says_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(graph.GraphError, match="apt-get install graphviz"):
        graph.render("digraph {}", "png")
    assert graph.render("digraph {}", "dot") == b"digraph {}"


def test_the_cluster_hosts_are_drawn_beyond_the_vxlan_device() -> None:
    show = seed()
    show["intents"] += [
        item(
            "vxlan/netagent.1",
            "vxlan",
            {
                "name": "netagent.1",
                "vni": 1,
                "port": 4789,
                "local": "10.0.0.21",
                "subnet": "10.244.3.0/24",
                "mac": "0a:58:0a:f4:03:00",
            },
        ),
        item(
            "peer/10.244.7.0/24",
            "peer",
            {
                "subnet": "10.244.7.0/24",
                "underlay": "10.0.0.22",
                "mac": "0a:58:0a:f4:07:00",
                "host": "h2",
                "device": "netagent.1",
            },
        ),
        item(
            "peer/10.244.9.0/24",
            "peer",
            {
                "subnet": "10.244.9.0/24",
                "underlay": "10.0.0.23",
                "mac": "0a:58:0a:f4:09:00",
                "host": "h3",
                "device": "netagent.1",
            },
            state="failing",
            error="the FDB entry was refused",
        ),
    ]
    dot = graph.to_dot(show)
    assert {
        ("vxlan/netagent.1", "peer/10.244.7.0/24"),
        ("vxlan/netagent.1", "peer/10.244.9.0/24"),
    } <= edges(dot)
    # the other hosts are outside this host's box
    host_box = dot[dot.index("subgraph cluster_host") :].split("\n  }\n", 1)[0]
    assert "peer/10.244.7.0/24" not in host_box and "vxlan/netagent.1" in host_box
    assert "host h2" in dot and "underlay 10.0.0.22" in dot
    bad = [ln for ln in dot.splitlines() if graph.BAD in ln]
    assert any(ln.strip().startswith('"peer/10.244.9.0/24" [') for ln in bad)
    assert not any(ln.strip().startswith('"peer/10.244.7.0/24" [') for ln in bad)
    assert "✗ failing: the FDB entry was refused" in dot
