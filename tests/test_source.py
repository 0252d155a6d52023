"""Checks over the whole source tree (no root)."""

from __future__ import annotations

import ast
from pathlib import Path

SHELL_CALLS = {"system", "popen", "getoutput", "getstatusoutput", "create_subprocess_shell"}


def test_no_shell_anywhere_in_the_source() -> None:
    """Statically too: no shell=True, os.system, os.popen or create_subprocess_shell."""
    root = Path(__file__).resolve().parents[1]
    offenders = []
    scanned = 0
    for folder in ("agent", "backends", "cli"):
        for path in (root / folder).rglob("*.py"):
            scanned += 1
            tree = ast.parse(path.read_text(), str(path))
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and node.module in ("os", "subprocess"):
                    offenders += [
                        f"{path}:{node.lineno} from {node.module} import {a.name}"
                        for a in node.names
                        if a.name in SHELL_CALLS
                    ]
                if isinstance(node, ast.Call):
                    f = node.func
                    if isinstance(f, ast.Attribute) and (
                        f.attr == "create_subprocess_shell"
                        or (
                            isinstance(f.value, ast.Name)
                            and f.value.id in ("os", "subprocess")
                            and f.attr in SHELL_CALLS
                        )
                    ):
                        offenders.append(f"{path}:{node.lineno} {f.attr}")
                    for kw in node.keywords:
                        if kw.arg == "shell" and not (
                            isinstance(kw.value, ast.Constant) and kw.value.value is False
                        ):
                            offenders.append(f"{path}:{node.lineno} shell=")
    assert scanned >= 20, f"only {scanned} source files found under {root}"
    assert offenders == []


#: no module longer than this (issue 8: one place per concern; a module that grows past
#: it holds two of them)
MAX_LINES = 600


def test_no_module_over_600_lines() -> None:
    root = Path(__file__).resolve().parents[1]
    sizes = {
        str(path.relative_to(root)): len(path.read_text().splitlines())
        for folder in ("agent", "backends", "cli", "cni", "bench", "tests", "scripts")
        if (root / folder).is_dir()
        for path in (root / folder).rglob("*.py")
    }
    assert len(sizes) >= 100, f"only {len(sizes)} modules found under {root}"
    assert {p: n for p, n in sizes.items() if n > MAX_LINES} == {}
