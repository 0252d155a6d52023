"""Reading the systemd unit files in ``systemd/`` (assignments only: the units use no
continuation lines and no drop-ins)."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
UNITS = REPO / "systemd"
SERVICE = UNITS / "netagent.service"
SOCKET = UNITS / "netagent.socket"


def unit_settings(path: Path) -> list[tuple[str, str]]:
    """(key, value) of every assignment, in order."""
    out = []
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line[0] in "#;[":
            continue
        key, _, value = line.partition("=")
        out.append((key.strip(), value.strip()))
    return out


def setting(path: Path, key: str) -> list[str]:
    return [v for k, v in unit_settings(path) if k == key]
