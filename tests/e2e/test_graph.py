"""``netagent ctl show --graph``: the real daemon's topology drawn by the real CLI, and a
part that is not in place drawn so (a read-only ``/run/netns`` in the sandbox makes
``ns add`` fail until it is writable again)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.support.daemon import Daemon
from tests.support.topology import build_seed
from tests.support.wait import wait_for

pytestmark = pytest.mark.e2e

BAD = "#c0392b"


def test_the_seed_drawn_in_dot_svg_and_png(daemon: Daemon, workdir: Path) -> None:
    build_seed(daemon)
    dot = daemon.ok("show", "--graph")
    assert dot.startswith("digraph netagent {")
    for part in (
        'subgraph "cluster_ns_red"',
        'subgraph "cluster_ns_blue"',
        '"ns/blue/veth-blue" -> "host/veth-blue-br"',
        '"host/veth-red-br" -> "br/v-net-0"',
        '"ns/blue/veth-blue" -> "fwd/fwd/tcp/80"',
        "DNAT → 192.168.15.2:80",
        "192.168.15.5/24",
        "6 parts, all in place",
    ):
        assert part in dot, part
    assert BAD not in dot
    png = workdir / "seed.png"
    out = daemon.ok("show", "--graph", "--format", "png", "--output", str(png))
    assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert out.strip() == (f"wrote {png} (png, {png.stat().st_size} bytes; 6 parts, all in place)")
    svg = workdir / "seed.svg"  # the format from the file's suffix
    reply = json.loads(daemon.ctl("--json", "show", "--output", str(svg), check=True).stdout)
    assert reply["ok"] is True
    assert reply["result"]["format"] == "svg" and reply["result"]["output"] == str(svg)
    assert reply["result"]["not_in_place"] == []
    assert "namespace blue" in svg.read_text()


def test_a_part_not_in_place_is_drawn_red_until_it_is(daemon: Daemon) -> None:
    build_seed(daemon, forward=False)
    daemon.sh("mount", "-o", "remount,ro", "/run/netns")  # the sandbox's own tmpfs
    try:
        failed = daemon.ctl("ns", "add", "purple")
        assert failed.returncode == 6, failed.stderr  # recorded, not in place
        reply = json.loads(daemon.ctl("--json", "show", "--graph", check=True).stdout)
        bad = reply["result"]["not_in_place"]
        assert [b["key"] for b in bad] == ["ns/purple"]
        assert bad[0]["state"] == "failing" and "Read-only" in bad[0]["why"]
        dot = reply["result"]["dot"]
        purple = dot[dot.index('subgraph "cluster_ns_purple"') :].split("}", 1)[0]
        assert BAD in purple and "dashed" in purple and "✗ failing" in purple
        assert "1 of 6 parts not in place:" in dot
        red = dot[dot.index('subgraph "cluster_ns_red"') :].split("}", 1)[0]
        assert BAD not in red
    finally:
        daemon.sh("mount", "-o", "remount,rw", "/run/netns")

    # the retry makes it; the picture says so
    def whole() -> str | None:
        dot = daemon.ok("show", "--graph")
        return dot if "all in place" in dot else None

    dot = wait_for("the picture to show everything in place", whole, timeout=20)
    assert BAD not in dot and re.search(r"6 parts, all in place", dot)


def test_the_cli_options_are_typers_when_not_plainly_right(daemon: Daemon) -> None:
    bad = daemon.ctl("show", "--graph", "--format", "jpeg")
    assert bad.returncode == 2
    assert "Invalid value for '--format'" in bad.stderr and "'jpeg' is not one of" in bad.stderr
    helped = daemon.ok("show", "--help")
    assert "--graph" in helped and "<dot|svg|png>" in helped and "--output" in helped
    nowhere = daemon.ctl("show", "--graph", "--output", "/nonexistent/dir/t.dot")
    assert nowhere.returncode == 2 and "cannot write /nonexistent/dir/t.dot" in nowhere.stderr
