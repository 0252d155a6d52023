"""The CLI's start-up fast path: which argv it takes, and that it hands the same op and
arguments to the same function the typer commands use (no root)."""

from __future__ import annotations

from typing import Any

import pytest

from netagent.cli import ctl, entry


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, ...]]:
    seen: list[tuple[Any, ...]] = []
    monkeypatch.setattr(ctl, "run_op", lambda *a: seen.append(("op", *a)))
    monkeypatch.setattr(ctl, "apply_file", lambda *a: seen.append(("apply", *a)))
    monkeypatch.delenv("NETAGENT_SOCKET", raising=False)
    return seen


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["ctl", "status"], ("op", "status", {}, None, False)),
        (["ctl", "--json", "status"], ("op", "status", {}, None, True)),
        (["ctl", "status", "--json"], ("op", "status", {}, None, True)),
        (["ctl", "--socket", "/tmp/s", "show"], ("op", "show", {}, "/tmp/s", False)),
        (["ctl", "--socket=/tmp/s", "forwards"], ("op", "forward.list", {}, "/tmp/s", False)),
        (["ctl", "ns", "add", "red"], ("op", "ns.add", {"name": "red"}, None, False)),
        (
            ["ctl", "forward", "80", "10.0.0.2:80", "--proto", "udp"],
            (
                "op",
                "forward.add",
                {"host_ports": "80", "destination": "10.0.0.2:80", "proto": "udp"},
                None,
                False,
            ),
        ),
        (
            ["ctl", "plug", "red", "br0", "--address", "10.0.0.2/24", "--address=fd00::2/64"],
            (
                "op",
                "plug.add",
                {"ns": "red", "bridge": "br0", "addresses": ["10.0.0.2/24", "fd00::2/64"]},
                None,
                False,
            ),
        ),
        (
            ["ctl", "unplug", "red", "br0"],
            ("op", "plug.del", {"ns": "red", "bridge": "br0"}, None, False),
        ),
        (
            ["ctl", "attach", "add", "tap*", "br0", "--json"],
            ("op", "attach.add", {"pattern": "tap*", "bridge": "br0"}, None, True),
        ),
        (
            ["ctl", "bridge", "add", "br0", "--masquerade", "--address", "10.0.0.1/24"],
            (
                "op",
                "bridge.add",
                {"name": "br0", "masquerade": True, "addresses": ["10.0.0.1/24"]},
                None,
                False,
            ),
        ),
        (["ctl", "purge", "--yes"], ("op", "purge", {}, None, False)),
        (["ctl", "links", "--ns", "red"], ("op", "links", {"ns": "red"}, None, False)),
        (["ctl", "ns", "list"], ("op", "ns.list", {}, None, False)),
        (["ctl", "apply", "f.json", "--prune"], ("apply", "f.json", True, None, False)),
        (["ctl", "apply", "-"], ("apply", "-", False, None, False)),
        # the CLI's own options stay with the CLI
        (
            ["ctl", "show", "--graph", "--format", "png", "--output", "t.png"],
            ("op", "show", {}, None, False, {"graph": True, "format": "png", "output": "t.png"}),
        ),
        (
            ["ctl", "--json", "show", "--output=t.svg"],
            ("op", "show", {}, None, True, {"output": "t.svg"}),
        ),
    ],
)
def test_fast_path_takes(
    argv: list[str], expected: tuple[Any, ...], calls: list[tuple[Any, ...]]
) -> None:
    assert entry._fast(argv) is True
    assert calls == [expected]


@pytest.mark.parametrize(
    "argv",
    [
        ["ctl", "status", "--help"],
        ["ctl", "ns", "add", "red", "--help"],
        ["ctl", "forward", "80"],  # a missing argument: typer says so
        ["ctl", "plug", "red"],  # the bridge is required
        ["ctl", "forward", "80", "10.0.0.2:80", "--proto"],
        ["ctl", "forward", "80", "10.0.0.2:80", "--proto", "tcp", "--proto", "udp"],
        ["ctl", "purge"],  # asks first
        ["ctl", "nope"],
        ["ctl", "show", "--ns", "red"],  # --ns belongs to links/neigh/routes only
        ["ctl", "status", "--bogus"],
        ["run"],
        ["ctl"],
        ["ctl", "status", "--prune"],
        ["ctl", "show", "--format", "jpeg"],  # not one of the choices: typer says so
        ["ctl", "show", "--graph", "--format"],
    ],
)
def test_everything_else_goes_to_typer(argv: list[str], calls: list[tuple[Any, ...]]) -> None:
    assert entry._fast(argv) is False
    assert calls == []


def test_a_shell_asking_for_completions_goes_to_typer(
    monkeypatch: pytest.MonkeyPatch, calls: list[tuple[Any, ...]]
) -> None:
    monkeypatch.setenv("_NETAGENT_COMPLETE", "complete_bash")
    assert entry._fast(["ctl", "status"]) is False
    assert calls == []


def test_env_socket_is_used(monkeypatch: pytest.MonkeyPatch, calls: list[tuple[Any, ...]]) -> None:
    monkeypatch.setenv("NETAGENT_SOCKET", "/run/x.sock")
    assert entry._fast(["ctl", "status"])
    assert calls == [("op", "status", {}, "/run/x.sock", False)]


def test_fast_path_imports_no_typer() -> None:
    import subprocess
    import sys

    code = (
        "import sys; from netagent.cli import entry\n"
        "from netagent.cli import ctl\n"
        "ctl.run_op = lambda *a: None\n"
        "entry._fast(['ctl', 'status'])\n"
        "heavy = [m for m in ('typer', 'pyroute2', 'structlog', 'anyio', 'pydantic') "
        "if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    ).stdout.strip()
    assert out == ""
