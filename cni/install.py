"""``netagent cni install``: the plugin binary and network configurations in place.

The binary is a four-line Python program named ``netagent`` in the runtime's plugin
directory (``/opt/cni/bin``): it runs this interpreter with ``-I -S`` (no site-packages
and no ``PYTHON*`` variables of the runtime's environment: only the standard library
and the directory holding the ``netagent`` package), which starts in about a fifth of
the time a full interpreter start takes where site-packages hold ``.pth`` files.

Each network gets a configuration list ``10-NAME.conflist`` in the configuration
directory (``/etc/cni/net.d``), with cniVersion 1.0.0 (what libcni 1.1, in Podman 4 and
containerd 1.6, reads) and ``cniVersions`` up to 1.1.0 (which newer libcni picks). A
file that is not netagent's is never overwritten (``--force`` does). Both are written
to a temporary name and renamed, so a runtime never runs half a binary or reads half a
configuration.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .plugin import DEFAULT_SOCKET, SUPPORTED
from .queue import DEFAULT_DIR

DEFAULT_BIN_DIR = "/opt/cni/bin"
DEFAULT_CONF_DIR = "/etc/cni/net.d"
DEFAULT_NETWORK = "netagent"
BINARY = "netagent"
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*\Z")


class InstallError(Exception):
    pass


@dataclass(frozen=True)
class Network:
    name: str
    bridge: str
    subnet: str
    gateway: str


def parse_network(text: str, index: int) -> Network:
    """``NAME`` or ``NAME=SUBNET`` (the i-th network without a subnet gets
    10.85.i.0/24); the bridge is ``na-NAME`` (a short hash when that is too long)."""
    name, _, subnet = text.partition("=")
    if not _NAME_RE.match(name) or len(name) > 100:
        raise InstallError(f"network name {name!r}: use letters, digits, '_', '.' and '-'")
    try:
        net = ipaddress.ip_network(subnet or f"10.85.{index}.0/24", strict=True)
    except ValueError as exc:
        raise InstallError(f"network {name}: subnet {subnet!r} is not a subnet ({exc})") from None
    if net.num_addresses < 4:
        raise InstallError(f"network {name}: {net} is too small")
    bridge = f"na-{name}"
    if len(bridge) > 15 or not _NAME_RE.match(bridge):
        bridge = "na-" + hashlib.sha256(name.encode()).hexdigest()[:10]
    return Network(name, bridge, str(net), str(net.network_address + 1))


def conflist(
    net: Network, socket: str | None = None, queue_dir: str | None = None, masquerade: bool = True
) -> dict[str, Any]:
    plugin: dict[str, Any] = {
        "type": BINARY,
        "bridge": net.bridge,
        "subnet": net.subnet,
        "gateway": net.gateway,
        "ipMasq": masquerade,
        "capabilities": {"portMappings": True, "ips": True, "mac": True},
    }
    if socket and socket != DEFAULT_SOCKET:
        plugin["socket"] = socket
    if queue_dir and queue_dir != DEFAULT_DIR:
        plugin["queueDir"] = queue_dir
    return {
        "cniVersion": "1.0.0",
        "cniVersions": list(SUPPORTED),
        "name": net.name,
        "plugins": [plugin],
    }


def launcher(python: str | None = None) -> str:
    """The plugin binary's text: this interpreter, isolated, and this netagent."""
    import netagent

    parent = str(Path(netagent.__file__).parent.parent)
    # the interpreter itself, whichever name it was started by (python, python3, a
    # venv's link): the plugin needs only the standard library, and a second install
    # from another entry point must write the same file
    python = python or os.path.realpath(sys.executable)
    return (
        f"#!{python} -IS\n"
        "# netagent's CNI plugin, written by `netagent cni install`.\n"
        "import sys\n"
        f"sys.path.insert(0, {parent!r})\n"
        "from netagent.cni.plugin import main\n"
        "sys.exit(main())\n"
    )


def _write(path: Path, text: str, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
    try:
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def _ours(path: Path) -> bool:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    plugins = doc.get("plugins") if isinstance(doc, dict) else None
    return isinstance(plugins, list) and any(
        isinstance(p, dict) and p.get("type") == BINARY for p in plugins
    )


def install(
    bin_dir: str = DEFAULT_BIN_DIR,
    conf_dir: str = DEFAULT_CONF_DIR,
    networks: list[str] | None = None,
    socket: str | None = None,
    queue_dir: str | None = None,
    masquerade: bool = True,
    force: bool = False,
) -> list[str]:
    """Put the binary and each network's configuration in place; what was done."""
    nets = [parse_network(t, i) for i, t in enumerate(networks or [DEFAULT_NETWORK])]
    if len({n.name for n in nets}) != len(nets):
        raise InstallError("a network is named twice")
    done = []
    binary = Path(bin_dir) / BINARY
    text = launcher()
    if binary.exists() and binary.read_text(errors="replace") == text:
        done.append(f"{binary}: unchanged")
    else:
        _write(binary, text, 0o755)
        done.append(f"{binary}: written")
    for net in nets:
        path = Path(conf_dir) / f"10-{net.name}.conflist"
        body = json.dumps(conflist(net, socket, queue_dir, masquerade), indent=2) + "\n"
        if path.exists():
            if path.read_text(errors="replace") == body:
                done.append(f"{path}: unchanged")
                continue
            if not force and not _ours(path):
                raise InstallError(
                    f"{path} exists and is not netagent's; it is left alone (--force replaces it)"
                )
        _write(path, body, 0o644)
        done.append(f"{path}: network {net.name} on bridge {net.bridge}, {net.subnet}")
    return done
