"""netagent's CNI plugin, installed for a test's daemon and driven as libcni drives it.

:func:`install` puts the plugin binary (``netagent cni install``'s, started with
``python -I -S``) in the test directory; :func:`netagent_conf` is a network
configuration list naming the test daemon's socket and queue directory; :func:`driver`
is a libcni-style driver (``tests/support/libcni.py``) that finds netagent's plugin and
Debian's reference plugins, runs them inside the sandbox and gives every run a time
limit under 10 s.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from netagent.cni.install import install as cni_install

from .daemon import Daemon
from .libcni import CNIConfig, NetworkConfigList, SandboxExec

REFERENCE = "/usr/lib/cni"
#: seconds any one plugin run may take (the issue's limit is "under 10 s")
PLUGIN_TIMEOUT = 9.5
T = TypeVar("T")


def install(d: Daemon) -> Path:
    """The plugin binary for ``d``; returns its directory."""
    bin_dir = d.dir / "cni-bin"
    cni_install(str(bin_dir), str(d.dir / "cni-conf"), ["unused"])
    return bin_dir


def queue_dir(d: Daemon) -> Path:
    """Where the plugin queues DELs for ``d`` (the daemon reads STATE_DIR/cni-queue)."""
    return d.state_dir / "cni-queue"


def netagent_conf(
    d: Daemon,
    name: str = "nanet",
    bridge: str | None = "cni-na0",
    subnet: str | None = "10.88.0.0/16",
    version: str = "1.0.0",
    **plugin: Any,
) -> NetworkConfigList:
    """A list with netagent's plugin alone (``bridge=None``: chained, in ``plugin``)."""
    conf: dict[str, Any] = {
        "type": "netagent",
        "socket": d.socket,
        "queueDir": str(queue_dir(d)),
        "capabilities": {"portMappings": True, "ips": True, "mac": True},
    }
    if bridge is not None:
        conf.update(bridge=bridge, subnet=subnet, ipMasq=True)
    conf.update(plugin)
    return NetworkConfigList.from_dict({"cniVersion": version, "name": name, "plugins": [conf]})


def chained_conf(
    d: Daemon, name: str = "refnet", subnet: str = "10.22.0.0/24"
) -> NetworkConfigList:
    """The reference ``bridge`` plugin (host-local addresses), then netagent in
    ``portmap``'s place."""
    prefix = subnet.rsplit(".", 1)[0]
    return NetworkConfigList.from_dict(
        {
            "cniVersion": "1.0.0",
            "name": name,
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": "cni-ref0",
                    "isGateway": True,
                    "ipMasq": True,
                    "hairpinMode": True,
                    "ipam": {
                        "type": "host-local",
                        "dataDir": str(d.dir / "host-local"),
                        "ranges": [[{"subnet": subnet, "gateway": f"{prefix}.1"}]],
                        "routes": [{"dst": "0.0.0.0/0"}],
                    },
                },
                {
                    "type": "netagent",
                    "socket": d.socket,
                    "queueDir": str(queue_dir(d)),
                    "capabilities": {"portMappings": True},
                },
            ],
        }
    )


def driver(d: Daemon, bin_dir: Path) -> CNIConfig:
    return CNIConfig(
        [str(bin_dir), REFERENCE], d.dir / "cni-cache", SandboxExec(d.box), timeout=PLUGIN_TIMEOUT
    )


def timed(fn: Callable[[], T], limit: float = 10.0) -> tuple[T, float]:
    """``fn()`` and how long it took; AssertionError when it took ``limit`` or more."""
    t0 = time.monotonic()
    value = fn()
    took = time.monotonic() - t0
    assert took < limit, f"took {took:.2f} s, the limit is {limit:g} s"
    return value, took
